"""Every checkpoint layout a training run writes loads to the same weights as the timm state dict it came from."""
from __future__ import annotations

import argparse
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from vitlens.checkpoints import read_state_dict
from vitlens.models import load_model

PLAIN, REG = "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"
StateDict = dict[str, torch.Tensor]


def _perturbed(name: str, model_args: dict, seed: int) -> StateDict:
    """A tiny model's timm state dict that differs from the seeded random weights."""
    model = load_model(name, "random", model_args=model_args).model
    generator = torch.Generator().manual_seed(seed)
    return {key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
            for key, value in model.state_dict().items()}


def _dinov2_release(timm_state: StateDict) -> StateDict:
    """timm keys -> the original DINOv2 release keys (mask_token; registers and the CLS position in pos_embed)."""
    out = dict(timm_state)
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, dim), out["pos_embed"]], dim=1)  # CLS position 0: cls_token unchanged
    return out


def _heads(prefix: str) -> StateDict:
    return {f"{prefix}dino_head.mlp.0.weight": torch.randn(8, 64), f"{prefix}ibot_head.last_layer.weight_g": torch.randn(8, 1)}


def _chunked(state: StateDict, chunks: int, depth: int) -> StateDict:
    """DINOv2's block_chunks: ``blocks.<chunk>.<global index>`` (each chunk padded with Identity blocks)."""
    size = depth // chunks
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks."):].split(".", 1)
            key = f"blocks.{int(index) // size}.{index}.{rest}"
        out[key] = value
    return out


def _prefixed(prefix: str, state: StateDict) -> StateDict:
    return {prefix + key: value for key, value in state.items()}


def _teacher_checkpoint(source: StateDict, other: StateDict, depth: int) -> dict:
    return {"teacher": {**_prefixed("backbone.", _dinov2_release(source)), **_heads("")}}


def _teacher_checkpoint_chunked(source: StateDict, other: StateDict, depth: int) -> dict:
    return {"teacher": {**_prefixed("backbone.", _chunked(_dinov2_release(source), 2, depth)), **_heads("")}}


def _dinov2_full(source: StateDict, other: StateDict, depth: int) -> dict:
    model = {**_prefixed("student.backbone.", _chunked(_dinov2_release(other), 2, depth)), **_heads("student."),
             **_prefixed("teacher.backbone.", _chunked(_dinov2_release(source), 2, depth)), **_heads("teacher.")}
    return {"model": model, "optimizer": {"state": {}, "param_groups": []}, "iteration": 12499}


def _timm_train(source: StateDict, other: StateDict, depth: int) -> dict:
    return {"epoch": 3, "arch": "vit", "state_dict": other, "state_dict_ema": source,
            "optimizer": {"state": {}}, "args": argparse.Namespace(lr=0.1, model="vit"), "version": 2}


def _timm_train_ddp(source: StateDict, other: StateDict, depth: int) -> dict:
    return {"epoch": 3, "state_dict": _prefixed("module.", source), "args": argparse.Namespace(lr=0.1)}


LAYOUTS: dict[str, Callable[[StateDict, StateDict, int], object]] = {
    "timm": lambda source, other, depth: source,
    "dinov2_release": lambda source, other, depth: _dinov2_release(source),
    "dinov2_teacher_checkpoint": _teacher_checkpoint,
    "dinov2_teacher_block_chunks": _teacher_checkpoint_chunked,
    "dinov2_full_model_teacher_and_student": _dinov2_full,
    "timm_train_ema_preferred": _timm_train,
    "timm_train_ddp_module_prefix": _timm_train_ddp,
}


@pytest.mark.parametrize("name", [PLAIN, REG], ids=["plain", "reg4"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_the_source_weights(layout, name, tmp_path, tiny_args):
    source, other = _perturbed(name, tiny_args, seed=1), _perturbed(name, tiny_args, seed=2)
    path = tmp_path / "run" / "training_1249" / "teacher_checkpoint.pth"
    path.parent.mkdir(parents=True)
    torch.save(LAYOUTS[layout](source, other, tiny_args["depth"]), path)
    loaded = load_model(name, path, model_args=tiny_args).model.state_dict()
    assert set(loaded) == set(source)
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key


def test_safetensors_in_dinov2_release_layout(tmp_path, tiny_args):
    source = _perturbed(REG, tiny_args, seed=3)
    path = tmp_path / "dinov2_vits14_reg4.safetensors"
    save_file(_dinov2_release(source), str(path))
    loaded = load_model(REG, path, model_args=tiny_args).model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in source.items())


def test_chunked_blocks_keep_their_global_index(tmp_path, tiny_args):
    source = _perturbed(PLAIN, tiny_args, seed=4)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": _prefixed("backbone.", _chunked(source, 2, 4))}, path)
    tensors = read_state_dict(path)
    assert torch.equal(tensors["blocks.3.norm1.weight"], source["blocks.3.norm1.weight"])
    assert not any(key.startswith(("blocks.1.3", "backbone.", "dino_head")) for key in tensors)



def test_a_training_checkpoint_far_larger_than_its_backbone_loads(tmp_path, tiny_args):
    """Real DINOv2 ``model_XXXX.pth`` files hold two heads with 65,536 prototypes each plus the
    student's optimizer moments: for a small backbone that is many times its own size."""
    source, other = _perturbed(PLAIN, tiny_args, seed=5), _perturbed(PLAIN, tiny_args, seed=6)
    checkpoint = _dinov2_full(source, other, tiny_args["depth"])
    prototypes = {f"{role}.dino_head.last_layer.weight": torch.zeros(65536, 128) for role in ("teacher", "student")}
    checkpoint["model"].update(prototypes)
    moments = {"exp_avg": torch.zeros(65536, 128), "exp_avg_sq": torch.zeros(65536, 128)}
    checkpoint["optimizer"] = {"state": {0: moments}, "param_groups": []}
    path = tmp_path / "model_0012499.pth"
    torch.save(checkpoint, path)
    assert path.stat().st_size > 100 * 2**20
    loaded = load_model(PLAIN, path, model_args=tiny_args).model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in source.items())
