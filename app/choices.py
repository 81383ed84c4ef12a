"""Model and weights choices the deployment offers, and what a weights choice means.

A weights choice is ``hub``, ``synthetic``, ``random``, ``file:<name>`` (a file in
``Settings.weights_dir``), ``upload:<name>`` (a file uploaded in the browser) or
``sweep:<results folder>|<weights>`` (a checkpoint a sweep in ``Settings.results_dir`` ran: the
operator chose those files); a path typed in the browser is never one.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import timm

from resources import settings
from vitlens.analysis.population import weights_in
from vitlens.errors import UnknownModelError, VitlensError, WeightsError
from vitlens.models import PRESETS, WEIGHT_SUFFIXES, ModelSpec, file_digest, resolve_spec

WEIGHTS_UPLOAD_PREFIX = "upload:"
WEIGHTS_FILE_PREFIX = "file:"
SWEEP_WEIGHTS_PREFIX = "sweep:"  # sweep:<results folder>|<weights as the sweep wrote them>
NAMED_WEIGHTS = ("hub", "synthetic", "random")  # weights choices that are not files
RANDOM_NOTE = "random weights: no artifacts expected"
SYNTHETIC_NOTE = "synthetic demo: planted artifacts"
SYNTHETIC_TWIN_NOTE = "synthetic demo, registers: no planted artifacts"


def presets() -> list[ModelSpec]:
    """The presets this deployment offers."""
    allowed = settings().allowed_models
    return [spec for spec in PRESETS.values() if allowed is None or spec.name in allowed]


def check_model(name: str) -> ModelSpec:
    """The spec of a preset or timm ViT name the deployment offers.

    Raises:
        UnknownModelError: empty, unknown, or not offered here.
    """
    name = name.strip()
    if not name:
        raise UnknownModelError("Choose a model: a preset or a timm Vision Transformer name.")
    settings().check_model(name)
    return resolve_spec(name)


def pair_of(name: str) -> str | None:
    """The same model with (or without) registers: the preset's pair, or the timm name swapped; for a
    preset without such a twin (DINOv3), the model it is compared with (``ModelSpec.compare``)."""
    if name in PRESETS:
        pair = PRESETS[name].pair or PRESETS[name].compare
    elif "_reg4_dinov2" in name:
        pair = name.replace("_reg4_dinov2", "_dinov2")
    elif "_dinov2" in name:
        pair = name.replace("_dinov2", "_reg4_dinov2")
    else:
        return None
    allowed = settings().allowed_models
    if pair is None or (allowed is not None and pair not in allowed):
        return None
    return pair if pair in PRESETS or timm.is_model(pair.split(".")[0]) else None


def patch_size(spec: ModelSpec) -> int:
    """Patch size from the timm architecture name (``patch14`` -> 14); 16 when it does not say."""
    match = re.search(r"patch(\d+)", spec.arch)
    return int(match.group(1)) if match else 16


def weights_files() -> list[str]:
    """Weights files the operator put in ``Settings.weights_dir`` (names only)."""
    return settings().weights_files()


def _uploaded_weights_dir() -> Path:
    return settings().cache_dir / "uploaded_weights"


def add_weights_upload(name: str, content: bytes) -> str:
    """Keep an uploaded weights file; returns its weights choice ``upload:<digest><suffix>``.

    Uploaded files share ``Settings.max_uploaded_weights`` bytes: the least recently used
    others are deleted to make room.

    Raises:
        WeightsError: wrong suffix, empty, or larger than the whole budget.
    """
    suffix = Path(name).suffix.lower()
    limit = settings().max_uploaded_weights
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"Weights file '{name}' must end in {', '.join(WEIGHT_SUFFIXES)}.")
    if not content:
        raise WeightsError(f"Weights file '{name}' is empty.")
    if len(content) > limit:
        raise WeightsError(f"Weights file '{name}' is {len(content) / 2**20:,.0f} MiB; this server keeps uploaded weights "
                           f"up to {limit / 2**20:,.0f} MiB.")
    folder = _uploaded_weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    file_name = hashlib.sha256(content).hexdigest()[:16] + suffix
    path = folder / file_name
    if not path.exists():
        temporary = folder / f".{file_name}.{os.getpid()}.tmp"
        temporary.write_bytes(content)
        os.replace(temporary, path)
    _touch(path)
    prune_uploaded_weights(limit, keep=path)
    return WEIGHTS_UPLOAD_PREFIX + file_name


def _touch(path: Path) -> None:
    now = time.time_ns()  # explicit: "now" from the file system can be as coarse as a clock tick
    os.utime(path, ns=(now, now))


def prune_uploaded_weights(limit: int, keep: Path | None = None) -> list[str]:
    """Delete the least recently used uploaded weights files until they take at most ``limit`` bytes."""
    files = sorted((p for p in _uploaded_weights_dir().glob("*") if p.is_file() and p != keep),
                   key=lambda p: p.stat().st_mtime_ns)
    used = sum(p.stat().st_size for p in files) + (keep.stat().st_size if keep is not None else 0)
    deleted = []
    for path in files:
        if used <= limit:
            break
        used -= path.stat().st_size
        path.unlink(missing_ok=True)
        deleted.append(path.name)
    return deleted


def weights_path(weights: str) -> str:
    """What ``load_model`` takes: ``hub``, ``synthetic``, ``random`` or a path; never a path typed in the browser.

    Raises:
        WeightsError: a file choice that is not a plain name in the weights folder (or uploads).
    """
    if weights in NAMED_WEIGHTS:
        return weights
    if weights.startswith(WEIGHTS_FILE_PREFIX):
        return settings().resolve_weights(weights[len(WEIGHTS_FILE_PREFIX):])
    if weights.startswith(WEIGHTS_UPLOAD_PREFIX):
        name = weights[len(WEIGHTS_UPLOAD_PREFIX):]
        path = _uploaded_weights_dir() / name
        if name != Path(name).name or name.startswith(".") or not path.is_file():
            raise WeightsError("The uploaded weights file is not on this server any more; upload it again.")
        _touch(path)  # recently used: pruned last
        return str(path)
    if weights.startswith(SWEEP_WEIGHTS_PREFIX):
        return sweep_checkpoint(weights)
    raise WeightsError(f"Weights must be hub, synthetic, random or a weights file, not '{weights[:80]}'.")


def sweep_weights(folder: str, weights: str) -> str:
    """The weights choice of a checkpoint that results folder ``folder`` holds rows of."""
    return f"{SWEEP_WEIGHTS_PREFIX}{folder}|{weights}"


def sweep_checkpoint(choice: str) -> str:
    """What ``load_model`` takes for a ``sweep:`` choice: only weights the results folder names.

    Raises:
        WeightsError: results are not enabled, the folder does not name these weights, or the file is gone.
    """
    folder, _, weights = choice[len(SWEEP_WEIGHTS_PREFIX):].partition("|")
    try:
        path = settings().resolve_results(folder)
    except VitlensError as error:
        raise WeightsError(str(error)) from error
    if weights not in weights_in(path):
        raise WeightsError(f"Results folder '{folder}' has no rows of weights '{weights[-80:]}'.")
    if weights not in NAMED_WEIGHTS and not Path(weights).is_file():
        raise WeightsError(f"The checkpoint '{weights[-80:]}' of results folder '{folder}' is not on this server any more.")
    return weights


def weights_label(weights: str, registers: bool | None = None) -> str:
    """How the weights are named in titles and legends; the synthetic demo says what it is
    (``registers``: whether the model has registers, None when unknown)."""
    if weights == "hub":
        return "pretrained"
    if weights == "random":
        return RANDOM_NOTE
    if weights == "synthetic":
        return {True: SYNTHETIC_TWIN_NOTE, False: SYNTHETIC_NOTE, None: "synthetic demo"}[registers]
    if weights.startswith(SWEEP_WEIGHTS_PREFIX):
        folder, _, path = weights[len(SWEEP_WEIGHTS_PREFIX):].partition("|")
        return f"{folder}: {'/'.join(Path(path).parts[-2:])}"
    return weights.split(":", 1)[-1]


def weights_id(weights: str) -> str:
    """Weights plus, for files, their content digest (so a replaced file is not served stale, even one
    of the same size with its times set back; ``file_digest`` hashes again only when the file changed)."""
    path = weights_path(weights)
    if path in NAMED_WEIGHTS:
        return weights
    return f"{weights}:{file_digest(Path(path))}"
