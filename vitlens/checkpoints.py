"""Reading weights files: every checkpoint layout a training run produces -> one timm-keyed state dict.

Layouts understood (all read with safe loaders only: safetensors, ``torch.load(weights_only=True)``):

- timm state dicts, and timm training checkpoints (``state_dict``, ``state_dict_ema``, ``module.``
  prefixes; the ``args`` namespace timm's train.py saves beside them is allowed). When both the
  EMA and the raw weights are there, the EMA weights are used, as timm's own ``load_checkpoint``
  does by default and as DINOv2 evaluates its EMA teacher.
- The original DINOv2 release keys (``register_tokens``, ``mask_token``, ``w12``/``w3``), converted
  by timm's ``checkpoint_filter_fn`` of the model's family at load time (``vitlens.adapters``;
  for Eva models this also reads the original DINOv3, EVA-02 and PE releases).
- DINOv2 training checkpoints: ``teacher_checkpoint.pth`` (weights under ``teacher``, keys
  ``backbone.*`` beside the ``dino_head``/``ibot_head``), a full ``model_XXXX.pth`` (keys
  ``teacher.*`` and ``student.*``: the teacher is used), and blocks chunked by ``block_chunks``
  (``blocks.<chunk>.<index>``, where ``index`` is already the global block index because DINOv2
  pads each chunk with Identity blocks).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_for
from .errors import WeightsError
from .files import check_regular

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# Searched in this order at each level: the teacher / EMA weights win over the raw ones.
_CHECKPOINT_WRAPPERS = ("teacher", "state_dict_ema", "model_ema", "state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP, plain wrappers, torch.compile
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # FSDP and activation checkpointing
_SUBMODELS = ("teacher.", "backbone.")  # keep only the teacher, then only its backbone (not the heads)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # blocks.<chunk>.<global index>.<rest>
_SAFE_GLOBALS = [argparse.Namespace]  # timm's train.py saves its arguments in every checkpoint
# A bound on the file, not on the architecture: a training checkpoint also holds heads (DINO's
# 65,536 prototypes dwarf a small backbone), the student and optimizer state. Records are stored,
# never compressed, so what a file declares cannot exceed its own size.
DEFAULT_MAX_WEIGHTS_BYTES = 64 * 2**30
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors format's own header limit
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_state_dict(path: Path, max_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors (safe loaders only) in timm or original DINOv2 key layout.

    The file is checked before any loader sees it (``check_weights_file``): a device, a pipe,
    an oversized file or a zip bomb is refused without being read.

    Args:
        path: A .safetensors/.pth/.pt file.
        max_bytes: Most bytes the file, and the tensors it declares, may take.

    Raises:
        WeightsError: missing or special file, unknown suffix, too large, compressed records,
            unreadable content, or no tensors inside.
    """
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise WeightsError(f"Weights file '{path.name}' must end in {', '.join(WEIGHT_SUFFIXES)}.")
    check_weights_file(path, max_bytes)
    return normalize_keys(_unwrap(_load(path), path), path)


def check_weights_file(path: Path, max_bytes: int) -> None:
    """Refuse a weights file whose loading could hang or take more memory than ``max_bytes``.

    A zip checkpoint (``torch.save``) must hold only stored records whose declared sizes add
    up to at most ``max_bytes``: ``torch.save`` never compresses, while ``torch.load`` would
    inflate a deflated record of a few MB to many GB. A safetensors header must be small and
    declare tensors that fit in the file and in ``max_bytes``.

    Raises:
        WeightsError: not a regular file, larger than ``max_bytes``, compressed zip records,
            declared sizes over the limit, or an inconsistent safetensors header.
    """
    size = check_regular(path, max_bytes, WeightsError, "Weights file")
    if path.suffix.lower() == ".safetensors":
        _check_safetensors_header(path, size, max_bytes)
    elif zipfile.is_zipfile(path):
        _check_zip_records(path, max_bytes)


def _check_zip_records(path: Path, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise WeightsError(f"Weights file '{path.name}' is a damaged zip archive.") from error
    if any(record.compress_type != zipfile.ZIP_STORED or record.file_size != record.compress_size for record in records):
        raise WeightsError(f"Weights file '{path.name}' holds compressed records, which torch.save never writes and which "
                           "could inflate far beyond the file's size; re-save it with torch.save.")
    _check_declared(path, sum(record.file_size for record in records), max_bytes)


def _check_safetensors_header(path: Path, size: int, max_bytes: int) -> None:
    bad = WeightsError(f"Weights file '{path.name}' could not be read: it is not a valid .safetensors checkpoint "
                       "(its header is inconsistent).")
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise bad
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as error:
            raise bad from error
    if not isinstance(header, dict):
        raise bad
    declared = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            count = math.prod(entry["shape"]) * _SAFETENSORS_ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as error:
            raise bad from error
        if not 0 <= start <= end <= size - 8 - length or end - start != count:
            raise bad
        declared += count
    _check_declared(path, declared, max_bytes)


def _check_declared(path: Path, declared: int, max_bytes: int) -> None:
    if declared > max_bytes:
        raise WeightsError(f"Weights file '{path.name}' declares {declared / 2**20:,.0f} MiB of data, more than the "
                           f"limit of {max_bytes / 2**20:,.0f} MiB.")


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


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Load timm- or DINOv2-layout tensors; a missing classifier head is fine, anything else is not.

    Raises:
        WeightsError: a tensor is missing, unexpected, or of another shape than the model's.
    """
    name = model.default_cfg.get("architecture")
    try:
        converted = _check_shapes(adapter_for(model).filter_checkpoint(state_dict, model), model, path)
        result = model.load_state_dict(converted, strict=False)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200].rstrip(" .:")
        raise WeightsError(f"Weights file '{path.name}' does not fit '{name}' ({detail}).") from error
    missing = [key for key in result.missing_keys if not key.startswith("head.")]
    unexpected = [key for key in result.unexpected_keys if not key.startswith("head.")]
    if missing or unexpected:
        detail = f"{len(missing)} missing (e.g. {missing[:2]})" if missing else f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        raise WeightsError(f"Weights file '{path.name}' does not fit '{name}': {detail} keys.")


def _check_shapes(tensors: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
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
