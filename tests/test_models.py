"""Model loading: random weights, weights files in timm and original DINOv2 layout, the hub, errors."""
from __future__ import annotations

import os
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitlens.errors import HubUnavailableError, UnknownModelError, WeightsError
from vitlens.layout import TokenLayout
from vitlens.models import PRESETS, load_model, resolve_spec, weights_fingerprint

PLAIN, REG = "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"


def _trained(name: str, model_args: dict, seed: int = 7):
    """A tiny model whose weights differ from what ``load_model(..., "random")`` builds."""
    loaded = load_model(name, "random", model_args=model_args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return loaded


def _features(loaded, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model.forward_features(x)


def _one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message and message.endswith("."), message
    assert len(message) < 400, message
    return message


@pytest.fixture(params=[PLAIN, REG], ids=["plain", "reg4"])
def trained(request, tiny_args):
    return _trained(request.param, tiny_args)


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(tiny_args, pixels):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_model(PLAIN, "random", model_args=tiny_args)
    b = load_model(PLAIN, "random", model_args=tiny_args)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(_features(a, pixels(a)), _features(b, pixels(b)))
    assert a.fingerprint == b.fingerprint and a.weights == "random"
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_timm_layout_file_reproduces_the_source(trained, tmp_path, tiny_args, pixels, suffix):
    path = tmp_path / f"weights{suffix}"
    state = trained.model.state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_model(trained.spec.name, path, model_args=tiny_args)
    x = pixels(trained, seed=1)
    assert torch.equal(_features(loaded, x), _features(trained, x))
    fresh = load_model(trained.spec.name, "random", model_args=tiny_args)
    assert not torch.allclose(_features(fresh, x), _features(trained, x))  # the file was really used
    assert loaded.weights == path.name
    assert loaded.fingerprint.startswith("file:")


def test_wrapped_and_prefixed_checkpoint_loads(trained, tmp_path, tiny_args, pixels):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in trained.model.state_dict().items()}}, path)
    loaded = load_model(trained.spec.name, path, model_args=tiny_args)
    x = pixels(trained)
    assert torch.equal(_features(loaded, x), _features(trained, x))


def test_file_is_loaded_at_its_own_grid(trained, tmp_path, pixels):
    """Without img_size the model is built for the checkpoint's grid, so nothing is resampled."""
    path = tmp_path / "weights.safetensors"
    save_file(trained.model.state_dict(), str(path))
    loaded = load_model(trained.spec.name, path, model_args=dict(depth=4, embed_dim=64, num_heads=4))
    assert loaded.native_size == (56, 56)
    x = pixels(trained)
    assert torch.equal(_features(loaded, x), _features(trained, x))


def _to_original_dinov2(model) -> dict[str, torch.Tensor]:
    """Inverse of timm's ``_convert_dinov2``: keys as in facebookresearch/dinov2 checkpoints."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    if model.reg_token is not None:
        cls_position = torch.randn(1, 1, model.embed_dim, generator=torch.Generator().manual_seed(3)) * 0.1
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)  # cls position included
    return state


def test_original_dinov2_layout_reproduces_the_source(trained, tmp_path, tiny_args, pixels):
    state = _to_original_dinov2(trained.model)
    assert "blocks.0.ls1.gamma" in state and "mask_token" in state
    assert state["pos_embed"].shape[1] == 1 + 16
    tag = "_reg4" if trained.model.reg_token is not None else ""
    path = tmp_path / f"dinov2_vits14{tag}_pretrain.pth"
    torch.save(state, path)
    x = pixels(trained, seed=2)
    loaded = load_model(trained.spec.name, path, model_args=tiny_args)
    torch.testing.assert_close(_features(loaded, x), _features(trained, x), rtol=1e-5, atol=1e-5)
    loaded = load_model(trained.spec.name, path, model_args=dict(depth=4, embed_dim=64, num_heads=4))
    assert loaded.native_size == (56, 56)
    torch.testing.assert_close(_features(loaded, x), _features(trained, x), rtol=1e-5, atol=1e-5)


def test_checkpoint_with_another_classifier_head_loads(tmp_path, pixels):
    args = dict(depth=2, embed_dim=64, num_heads=4, img_size=64)
    source = _trained("vit_tiny_patch16_224", dict(args, num_classes=21))
    path = tmp_path / "finetuned.safetensors"
    save_file(source.model.state_dict(), str(path))
    loaded = load_model("vit_tiny_patch16_224", path, model_args=args)
    x = pixels(source)
    assert torch.equal(_features(loaded, x), _features(source, x))


def _write(kind: str, directory, tiny_args) -> object:
    if kind == "random_bytes_pth":
        path = directory / "noise.pth"
        path.write_bytes(os.urandom(4096))
    elif kind == "random_bytes_safetensors":
        path = directory / "noise.safetensors"
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path = directory / "notes.pt"
        path.write_text("these are not weights\n")
    elif kind == "empty":
        path = directory / "empty.safetensors"
        path.write_bytes(b"")
    elif kind == "pickled_object":
        path = directory / "evil.pth"
        torch.save({"model": {"blocks": object()}, "fn": print}, path)
    elif kind == "no_tensors":
        path = directory / "meta.pth"
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif kind == "other_architecture":
        path = directory / "tiny16.safetensors"
        other = load_model("vit_tiny_patch16_224", "random", model_args=dict(depth=4, embed_dim=64, num_heads=4, img_size=64))
        save_file(other.model.state_dict(), str(path))
    elif kind == "other_width":
        path = directory / "narrow.pth"
        torch.save(load_model(PLAIN, "random", model_args=dict(tiny_args, embed_dim=32)).model.state_dict(), path)
    elif kind == "other_depth":
        path = directory / "deeper.pth"
        torch.save(load_model(PLAIN, "random", model_args=dict(tiny_args, depth=6)).model.state_dict(), path)
    elif kind == "with_registers":
        path = directory / "reg.safetensors"
        save_file(load_model(REG, "random", model_args=tiny_args).model.state_dict(), str(path))
    elif kind == "unknown_suffix":
        path = directory / "weights.bin"
        torch.save(load_model(PLAIN, "random", model_args=tiny_args).model.state_dict(), path)
    elif kind == "missing":
        path = directory / "nowhere.pth"
    elif kind == "directory":
        path = directory / "folder.pth"
        path.mkdir()
    else:
        raise ValueError(kind)
    return path


@pytest.mark.parametrize("kind", ["random_bytes_pth", "random_bytes_safetensors", "text", "empty", "pickled_object",
                                  "no_tensors", "other_architecture", "other_width", "other_depth", "with_registers",
                                  "unknown_suffix", "missing", "directory"])
def test_unusable_weights_file_is_one_weights_error(tmp_path, tiny_args, kind):
    path = _write(kind, tmp_path, tiny_args)
    with pytest.raises(WeightsError) as error:
        load_model(PLAIN, path, model_args=tiny_args)
    assert path.name in _one_sentence(error)


def test_weights_fingerprint_of_a_missing_file(tmp_path):
    with pytest.raises(WeightsError) as error:
        weights_fingerprint(resolve_spec(PLAIN), tmp_path / "gone.safetensors")
    _one_sentence(error)


@pytest.mark.parametrize("name", ["not_a_model", "vit_small_patch14_dinov2.no_such_tag", "", "dinov2_vitx14"])
def test_unknown_model_names(name, tiny_args):
    with pytest.raises(UnknownModelError) as error:
        load_model(name, "random", model_args=tiny_args)
    _one_sentence(error)
    with pytest.raises(UnknownModelError):
        resolve_spec(name)


def test_a_timm_model_that_is_not_a_vit():
    with pytest.raises(UnknownModelError) as error:
        load_model("resnet18", "random")
    assert "not a Vision Transformer" in _one_sentence(error)


def test_unknown_tag_with_hub_weights_is_unknown_model():
    with pytest.raises(UnknownModelError):
        load_model("vit_small_patch14_dinov2.no_such_tag", "hub")


def test_presets_resolve_offline_and_pair_up():
    for name, spec in PRESETS.items():
        assert resolve_spec(name) is spec
        assert timm.is_model(spec.arch.split(".")[0]) and timm.models.get_pretrained_cfg(spec.arch) is not None
        if spec.pair is not None:
            assert PRESETS[spec.pair].pair == name
            assert ("reg4" in spec.arch) != ("reg4" in PRESETS[spec.pair].arch)
        if spec.compare is not None:
            assert spec.pair is None and PRESETS[spec.compare].pair is not None


def test_dinov3_presets_cover_s_b_l_hplus_with_storage_registers_as_registers():
    from vitlens.layout import TokenLayout

    dinov3 = {name: spec for name, spec in PRESETS.items() if "dinov3" in spec.arch}
    assert sorted(spec.arch.split("_patch")[0] for spec in dinov3.values()) == [
        "vit_base", "vit_huge_plus", "vit_large", "vit_small"]
    for spec in dinov3.values():
        assert spec.arch.endswith(".lvd1689m") and "no register-free twin" in spec.label
        assert "reg4" in PRESETS[spec.compare].arch
    model = timm.create_model(PRESETS["dinov3_vits16"].arch.split(".")[0], depth=1, pretrained=False)
    layout = TokenLayout.from_model(model, (2, 2))
    assert (layout.num_cls, layout.num_registers) == (1, 4)


def test_unreachable_hub_fails_fast_with_advice():
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as error:
        load_model("dinov2_vits14_reg4", "hub")
    assert time.monotonic() - start < 5
    message = _one_sentence(error)
    assert "pre-fetch" in message and "python -m vitlens fetch dinov2_vits14_reg4" in message
    assert weights_fingerprint(resolve_spec("dinov2_vits14_reg4"), "hub") is None


def test_hub_weights_come_from_the_local_cache_without_network(tmp_path, tiny_args, pixels):
    import huggingface_hub.constants

    source = _trained(REG, tiny_args)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = os.path.join(huggingface_hub.constants.HF_HUB_CACHE, "models--timm--vit_small_patch14_reg4_dinov2.lvd142m")
    os.makedirs(os.path.join(repo_dir, "snapshots", revision))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as handle:
        handle.write(revision)
    save_file(source.model.state_dict(), os.path.join(repo_dir, "snapshots", revision, "model.safetensors"))
    loaded = load_model("dinov2_vits14_reg4", "hub", model_args=tiny_args)
    x = pixels(source)
    assert torch.equal(_features(loaded, x), _features(source, x))
    assert loaded.fingerprint == f"hub:timm/vit_small_patch14_reg4_dinov2.lvd142m@{revision}"
    assert weights_fingerprint(loaded.spec, "hub") == loaded.fingerprint


def test_fingerprints_follow_file_content(tmp_path, tiny_args):
    spec = resolve_spec(PLAIN)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_trained(PLAIN, tiny_args, seed=1).model.state_dict(), str(a))
    save_file(_trained(PLAIN, tiny_args, seed=2).model.state_dict(), str(b))
    fa, fb = weights_fingerprint(spec, a, tiny_args), weights_fingerprint(spec, b, tiny_args)
    assert fa != fb
    assert weights_fingerprint(spec, a, tiny_args) == fa  # stable
    assert load_model(PLAIN, a, model_args=tiny_args).fingerprint == fa
    copy = tmp_path / "copy_of_a.safetensors"
    copy.write_bytes(a.read_bytes())
    assert weights_fingerprint(spec, copy, tiny_args) == fa  # content, not name
    time.sleep(0.01)
    a.write_bytes(b.read_bytes())  # same path, new content
    assert weights_fingerprint(spec, a, tiny_args) == fb


def test_random_fingerprint_names_the_architecture_arguments(tiny_args):
    spec = resolve_spec(PLAIN)
    assert weights_fingerprint(spec, "random", tiny_args) != weights_fingerprint(spec, "random", dict(tiny_args, depth=5))
    assert load_model(PLAIN, "random", model_args=tiny_args).fingerprint == weights_fingerprint(spec, "random", tiny_args)


def test_loaded_model_properties(tiny_vit_reg):
    assert tiny_vit_reg.patch_size == 14
    assert tiny_vit_reg.native_size == (56, 56)
    assert tiny_vit_reg.mean == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert tiny_vit_reg.device == torch.device("cpu")
    assert tiny_vit_reg.key == f"{tiny_vit_reg.spec.arch}|{tiny_vit_reg.fingerprint}"


@pytest.mark.parametrize("name,args,expected", [
    (PLAIN, dict(depth=1, embed_dim=32, num_heads=2, img_size=28), (1, 0)),
    (REG, dict(depth=1, embed_dim=32, num_heads=2, img_size=28), (1, 4)),
    ("test_vit2", dict(img_size=32), (0, 1)),
    ("vit_tiny_patch16_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32), (1, 0)),
])
def test_token_layout_is_read_from_the_model(name, args, expected):
    loaded = load_model(name, "random", model_args=args)
    layout = TokenLayout.from_model(loaded.model, (2, 3))
    assert (layout.num_cls, layout.num_registers) == expected
    assert layout.num_prefix == loaded.model.num_prefix_tokens
    assert layout.num_tokens == layout.num_prefix + 6
    assert layout.registers == slice(expected[0], sum(expected))
    assert layout.cls_index == (0 if expected[0] else None)
    values = torch.arange(layout.num_tokens).numpy()
    assert layout.patch_grid(values).tolist() == [[layout.num_prefix + i for i in range(3)],
                                                  [layout.num_prefix + 3 + i for i in range(3)]]
    with pytest.raises(ValueError):
        layout.patch_grid(values[:-1])


def test_blocks_without_standard_attention_are_refused_by_name():
    with pytest.raises(UnknownModelError, match="ParallelScalingBlock"):
        load_model("vit_pwee_patch16_reg1_gap_256", "random", model_args=dict(depth=1))


def test_checkpoint_with_python_objects_is_refused_with_weights_only_reason(tmp_path):
    import datetime

    path = tmp_path / "training_checkpoint.pth"  # (timm's own argparse.Namespace is allowed: tests/test_checkpoints.py)
    torch.save({"model": {"pos_embed": torch.zeros(1, 2, 3)}, "saved": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(WeightsError, match="holds Python objects besides tensors"):
        load_model("vit_tiny_patch16_224", path)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a valid .pth checkpoint"):
        load_model("vit_tiny_patch16_224", tmp_path / "garbage.pth")
