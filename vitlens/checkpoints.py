"""Reading weights files: every checkpoint layout a training run produces -> one timm-keyed state dict.

Layouts understood (all read with safe loaders only: safetensors, ``torch.load(weights_only=True)``):

- timm state dicts, and timm training checkpoints (``state_dict``, ``state_dict_ema``, ``module.``
  prefixes; the ``args`` namespace timm's train.py saves beside them is allowed). When both the
  EMA and the raw weights are there, the EMA weights are used, as timm's own ``load_checkpoint``
  does by default and as DINOv2 evaluates its EMA teacher.
- The original DINOv2 release keys (``register_tokens``, ``mask_token``, ``w12``/``w3``), converted
  by timm's ``checkpoint_filter_fn`` at load time.
- DINOv2 training checkpoints: ``teacher_checkpoint.pth`` (weights under ``teacher``, keys
  ``backbone.*`` beside the ``dino_head``/``ibot_head``), a full ``model_XXXX.pth`` (keys
  ``teacher.*`` and ``student.*``: the teacher is used), and blocks chunked by ``block_chunks``
  (``blocks.<chunk>.<index>``, where ``index`` is already the global block index because DINOv2
  pads each chunk with Identity blocks).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .errors import WeightsError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# Searched in this order at each level: the teacher / EMA weights win over the raw ones.
_CHECKPOINT_WRAPPERS = ("teacher", "state_dict_ema", "model_ema", "state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP, plain wrappers, torch.compile
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # FSDP and activation checkpointing
_SUBMODELS = ("teacher.", "backbone.")  # keep only the teacher, then only its backbone (not the heads)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # blocks.<chunk>.<global index>.<rest>
_SAFE_GLOBALS = [argparse.Namespace]  # timm's train.py saves its arguments in every checkpoint


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors (safe loaders only) in timm or original DINOv2 key layout.

    Raises:
        WeightsError: missing file, unknown suffix, unreadable content, or no tensors inside.
    """
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise WeightsError(f"Weights file '{path.name}' must end in {', '.join(WEIGHT_SUFFIXES)}.")
    if not path.is_file():
        raise WeightsError(f"Weights file '{path}' does not exist.")
    return normalize_keys(_unwrap(_load(path), path), path)


def _load(path: Path) -> Any:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # every loader has its own error types for bad bytes
        if "unsupported global" in str(error).lower():  # e.g. a custom class pickled beside the tensors
            raise WeightsError(f"Weights file '{path.name}' holds Python objects besides tensors; vitlens loads only "
                               "plain state dicts (torch.load with weights_only=True).") from error
        raise WeightsError(f"Weights file '{path.name}' could not be read: it is not a valid {path.suffix} checkpoint.") from error


def _unwrap(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """Descend through wrapper dicts (``teacher``, ``state_dict_ema``, ``model``...) to the tensors."""
    while isinstance(checkpoint, dict):
        wrapper = next((key for key in _CHECKPOINT_WRAPPERS if isinstance(checkpoint.get(key), dict)), None)
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise WeightsError(f"Weights file '{path.name}' holds no state dict.")
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"Weights file '{path.name}' holds no tensors.")
    return tensors


def normalize_keys(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, keep the teacher's backbone, flatten chunked blocks.

    Raises:
        WeightsError: two keys of the file end up as the same key.
    """
    tensors = {_strip_prefixes(key): value for key, value in tensors.items()}
    for prefix in _SUBMODELS:
        if any(key.startswith(prefix) for key in tensors):
            tensors = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    flat = {_CHUNKED_BLOCK.sub(r"blocks.\1.", key): value for key, value in tensors.items()}
    if len(flat) != len(tensors):
        raise WeightsError(f"Weights file '{path.name}' has overlapping block keys (blocks.<chunk>.<index> and blocks.<index>).")
    return flat


def _strip_prefixes(key: str) -> str:
    for infix in _WRAPPER_INFIXES:
        key = key.replace(infix, "")
    for prefix in _KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def checkpoint_img_size(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The square input side a checkpoint's position embeddings were trained for, if they tell."""
    pos_embed, proj = state_dict.get("pos_embed"), state_dict.get("patch_embed.proj.weight")
    if pos_embed is None or proj is None or pos_embed.ndim != 3:
        return None
    for num_prefix in range(0, 9):  # cls and register positions, when they are in pos_embed
        side = math.isqrt(pos_embed.shape[1] - num_prefix)
        if side * side == pos_embed.shape[1] - num_prefix:
            return side * proj.shape[-1]
    return None


def load_into(model: VisionTransformer, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Load timm- or DINOv2-layout tensors; a missing classifier head is fine, anything else is not.

    Raises:
        WeightsError: a tensor is missing, unexpected, or of another shape than the model's.
    """
    name = model.default_cfg.get("architecture")
    try:
        converted = _check_shapes(checkpoint_filter_fn(state_dict, model), model, path)
        result = model.load_state_dict(converted, strict=False)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200].rstrip(" .:")
        raise WeightsError(f"Weights file '{path.name}' does not fit '{name}' ({detail}).") from error
    missing = [key for key in result.missing_keys if not key.startswith("head.")]
    unexpected = [key for key in result.unexpected_keys if not key.startswith("head.")]
    if missing or unexpected:
        detail = f"{len(missing)} missing (e.g. {missing[:2]})" if missing else f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        raise WeightsError(f"Weights file '{path.name}' does not fit '{name}': {detail} keys.")


def _check_shapes(tensors: dict[str, torch.Tensor], model: VisionTransformer, path: Path) -> dict[str, torch.Tensor]:
    """Drop classifier-head tensors of another shape (vitlens never uses the head).

    Raises:
        WeightsError: any other tensor's shape differs from the model's.
    """
    expected = model.state_dict()
    kept = {}
    for key, value in tensors.items():
        want = expected.get(key)
        if want is not None and want.shape != value.shape:
            if key.startswith("head."):
                continue
            raise WeightsError(f"Weights file '{path.name}' does not fit '{model.default_cfg.get('architecture')}': "
                               f"'{key}' is {list(value.shape)} in the file but {list(want.shape)} in the model.")
        kept[key] = value
    return kept
