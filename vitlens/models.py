"""Model presets and loading: Hugging Face hub, a local weights file, random weights, or the synthetic demo."""
from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import os
import socket
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg

from .adapters import check_model
from .checkpoints import WEIGHT_SUFFIXES, checkpoint_img_size, load_into, read_state_dict  # noqa: F401 (WEIGHT_SUFFIXES re-exported)
from .errors import HubUnavailableError, UnknownModelError, WeightsError
from .synthetic import SYNTHETIC_SIDE, SYNTHETIC_VERSION, plant_demo

RANDOM_SEED = 0
_HUB_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ModelSpec:
    """A named model: a timm architecture (with pretrained tag) and its register counterpart.

    Attributes:
        name: Short name used in the CLI, the app and cache keys.
        arch: timm model name, with the pretrained tag (``arch.tag``) where there is one.
        label: Human readable name.
        pair: Name of the same model with (or without) registers, if one exists.
        compare: A preset to show side by side when there is no such pair (DINOv3 -> the DINOv2
            of about the same size, with registers).
    """

    name: str
    arch: str
    label: str
    pair: str | None = None
    compare: str | None = None


def _dinov2_presets() -> list[ModelSpec]:
    sizes = {"s": ("small", "ViT-S/14"), "b": ("base", "ViT-B/14"), "l": ("large", "ViT-L/14"), "g": ("giant", "ViT-g/14")}
    specs = []
    for short, (timm_size, label) in sizes.items():
        plain, reg = f"dinov2_vit{short}14", f"dinov2_vit{short}14_reg4"
        specs.append(ModelSpec(plain, f"vit_{timm_size}_patch14_dinov2.lvd142m", f"DINOv2 {label}", reg))
        specs.append(ModelSpec(reg, f"vit_{timm_size}_patch14_reg4_dinov2.lvd142m", f"DINOv2 {label} + 4 registers", plain))
    return specs


def _dinov3_presets() -> list[ModelSpec]:
    """DINOv3 (trained with 4 storage registers, RoPE), each compared with the DINOv2 of about its size."""
    sizes = {"s": ("small", "ViT-S/16", "s"), "b": ("base", "ViT-B/16", "b"), "l": ("large", "ViT-L/16", "l"),
             "hplus": ("huge_plus", "ViT-H+/16", "g")}
    return [ModelSpec(f"dinov3_vit{short}16", f"vit_{timm_size}_patch16_dinov3.lvd1689m",
                      f"DINOv3 {label} + 4 registers (no register-free twin)", compare=f"dinov2_vit{dinov2}14_reg4")
            for short, (timm_size, label, dinov2) in sizes.items()]


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in _dinov2_presets() + _dinov3_presets() + [
        ModelSpec("deit3_vitb16", "deit3_base_patch16_224.fb_in22k_ft_in1k", "DeiT-III ViT-B/16"),
        ModelSpec("deit3_vitl16", "deit3_large_patch16_224.fb_in22k_ft_in1k", "DeiT-III ViT-L/16"),
        ModelSpec("openclip_vitb16", "vit_base_patch16_clip_224.laion2b", "OpenCLIP ViT-B/16 (LAION-2B)"),
        ModelSpec("clip_vitb16", "vit_base_patch16_clip_224.openai", "CLIP ViT-B/16 (OpenAI)"),
    ]
}


def resolve_spec(name: str) -> ModelSpec:
    """Return the preset called ``name``, or a spec for any timm Vision Transformer name.

    Raises:
        UnknownModelError: ``name`` is neither a preset nor a timm ViT architecture.
    """
    if name in PRESETS:
        return PRESETS[name]
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise UnknownModelError(f"Unknown model '{name}': use a preset (python -m vitlens models) or a timm ViT name.")
    if tag and not _known_tag(name):
        raise UnknownModelError(f"Unknown model '{name}': timm has no pretrained tag '{tag}' for '{arch}'.")
    return ModelSpec(name=name, arch=name, label=name)


def _known_tag(name: str) -> bool:
    try:
        get_pretrained_cfg(name)  # raises for an unknown tag of a known architecture
    except RuntimeError:
        return False
    return True


@dataclass
class LoadedModel:
    """A model in eval mode with what is needed to feed it and to name its results.

    Attributes:
        spec: What was asked for.
        model: The timm model (any family ``vitlens.adapters`` reads), in eval mode.
        weights: How the weights were chosen: ``hub``, ``random``, ``synthetic`` or the file name.
        fingerprint: Identifies the exact weights (content hash, hub revision, random seed or
            synthetic demo version).
        lock: Held while a forward pass runs; capture briefly changes the model's input size.
    """

    spec: ModelSpec
    model: torch.nn.Module
    weights: str
    fingerprint: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def patch_size(self) -> int:
        """Pixels per patch side (for a hybrid CNN stem, its whole stride)."""
        return self.model.patch_embed.feat_ratio()

    @property
    def native_size(self) -> tuple[int, int]:
        """The (height, width) the position embeddings were trained for."""
        return tuple(self.model.patch_embed.img_size)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.model.pretrained_cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.model.pretrained_cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def key(self) -> str:
        """Cache key part: architecture plus weights fingerprint."""
        return f"{self.spec.arch}|{self.fingerprint}"


def load_model(
        name: str,
        weights: str | os.PathLike = "hub",
        device: str | torch.device = "cpu",
        model_args: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build a model and load its weights.

    Args:
        name: A preset name or any timm Vision Transformer name.
        weights: ``hub`` (pretrained, Hugging Face cache first), ``random`` (seeded),
            ``synthetic`` (random weights at 224 px with high-norm tokens planted at fixed cells
            from the middle block, for models without registers; see ``vitlens.synthetic``;
            not a trained model), or a path to a .safetensors/.pth/.pt file in any layout
            ``vitlens.checkpoints`` reads (timm, DINOv2 release, DINOv2 and timm training checkpoints).
        device: Where the model runs.
        model_args: Extra timm constructor arguments (tests use them for tiny models).

    Raises:
        UnknownModelError, WeightsError, HubUnavailableError.
    """
    spec = resolve_spec(name)
    model_args = dict(model_args or {})
    if str(weights) == "hub":
        model, fingerprint = _from_hub(spec, model_args)
        label = "hub"
    elif str(weights) == "random":
        model, fingerprint = _random(spec, model_args)
        label = "random"
    elif str(weights) == "synthetic":
        model, fingerprint = _synthetic(spec, model_args)
        label = "synthetic"
    else:
        path = Path(weights)
        model, fingerprint = _from_file_or_release(spec, path, model_args)
        label = path.name
    model.eval().requires_grad_(False).to(device)
    return LoadedModel(spec=spec, model=model, weights=label, fingerprint=fingerprint)


def weights_fingerprint(spec: ModelSpec, weights: str | os.PathLike, model_args: Mapping[str, Any] | None = None) -> str | None:
    """What ``load_model`` would report as the fingerprint, without building the model.

    None when it cannot be known before loading (hub weights not downloaded yet).
    """
    model_args = dict(model_args or {})
    if str(weights) == "random":
        return _random_fingerprint(model_args)
    if str(weights) == "synthetic":
        return _synthetic_fingerprint(model_args)
    if str(weights) == "hub":
        repo = _hub_repo(spec)
        cached = _cached_hub_file(repo)
        return _hub_fingerprint(repo, cached) if cached else None
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"Weights file '{path}' does not exist.")
    return _file_fingerprint(path, model_args)


def _random_fingerprint(model_args: dict) -> str:
    return f"random:seed{RANDOM_SEED}:{_library_versions()}:{sorted(model_args.items())}"


def _synthetic_fingerprint(model_args: dict) -> str:
    return f"synthetic:v{SYNTHETIC_VERSION}:seed{RANDOM_SEED}:{_library_versions()}:{sorted(model_args.items())}"


def _library_versions() -> str:
    """What turns a seed into weights: torch's generator and timm's initialisation."""
    return f"torch{torch.__version__}:timm{timm.__version__}"


def _hub_fingerprint(repo: str, cached: Path) -> str:
    return f"hub:{repo}@{cached.parent.name}"  # .../snapshots/<revision>/<file>


def _file_fingerprint(path: Path, model_args: dict) -> str:
    return f"file:{file_digest(path)}:{sorted(model_args.items())}"


def _create(spec: ModelSpec, model_args: dict, **kwargs: Any) -> torch.nn.Module:
    try:
        model = timm.create_model(spec.arch, **model_args, **kwargs)
    except (RuntimeError, ValueError, TypeError) as error:
        if isinstance(error, RuntimeError) and "pretrained" in str(error).lower():
            raise HubUnavailableError(f"timm has no pretrained weights for '{spec.arch}'; use a weights file or random weights.") from error
        raise UnknownModelError(f"Could not build '{spec.arch}': {error}") from error
    check_model(model, spec.name)
    return model


def _random(spec: ModelSpec, model_args: dict) -> tuple[torch.nn.Module, str]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = _create(spec, model_args, pretrained=False)
    return model, _random_fingerprint(model_args)


def _synthetic(spec: ModelSpec, model_args: dict) -> tuple[torch.nn.Module, str]:
    """Random weights built for ``SYNTHETIC_SIDE`` px, with the demo's outliers planted (no registers only)."""
    model, _ = _random(spec, {"img_size": SYNTHETIC_SIDE, **model_args})
    plant_demo(model)
    return model, _synthetic_fingerprint(model_args)


def _hub_repo(spec: ModelSpec) -> str:
    """The Hugging Face repo id timm downloads ``spec`` from."""
    cfg = get_pretrained_cfg(spec.arch)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise HubUnavailableError(f"timm knows no hub weights for '{spec.arch}'; use a weights file or random weights.")
    return repo


def _cached_hub_file(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in _HUB_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(spec: ModelSpec, model_args: dict) -> tuple[torch.nn.Module, str]:
    """Load pretrained weights, from the local Hugging Face cache when they are there."""
    repo = _hub_repo(spec)
    cached = _cached_hub_file(repo)
    if cached is None:
        if not _hub_reachable():
            raise HubUnavailableError(
                f"Cannot reach the Hugging Face hub to fetch '{repo}'; pre-fetch it on a connected machine with "
                f"`python -m vitlens fetch {spec.name}` (or `hf download {repo}`) and copy HF_HOME here, "
                "or use a local weights file or random weights.")
        try:
            _create(spec, model_args, pretrained=True)
        except OSError as error:
            raise HubUnavailableError(f"Downloading '{repo}' from the Hugging Face hub failed: {error}") from error
        cached = _cached_hub_file(repo)
        if cached is None:
            raise HubUnavailableError(f"The download of '{repo}' left no weights file in the Hugging Face cache.")
    model = _create(spec, model_args, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
    return model, _hub_fingerprint(repo, cached)


def _from_file_or_release(spec: ModelSpec, path: Path, model_args: dict) -> tuple[torch.nn.Module, str]:
    """``_from_file``; when it fails, the tensors and model it built are freed before the error goes up.

    The error's traceback holds the frames that held them, so whoever keeps the error (a log
    record, a page's state) would otherwise keep hundreds of MB per failed attempt.
    """
    try:
        return _from_file(spec, path, model_args)
    except Exception as error:  # re-raised below, after its frames let go of the tensors
        failure = error
    release_frames(failure)
    raise failure


def release_frames(error: BaseException) -> None:
    """Clear the local variables of the finished frames behind ``error`` (and its causes), collect
    the cycles they formed, and hand freed heap memory back to the operating system."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """glibc keeps freed small blocks in its arenas; ``malloc_trim`` returns them (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _from_file(spec: ModelSpec, path: Path, model_args: dict) -> tuple[torch.nn.Module, str]:
    state_dict = read_state_dict(path)
    build_args = dict(model_args)
    if "img_size" not in build_args and (img_size := checkpoint_img_size(state_dict)) is not None:
        build_args["img_size"] = img_size  # build at the checkpoint's own grid: no resampling at load
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = _create(spec, build_args, pretrained=False)
    load_into(model, state_dict, path)
    return model, _file_fingerprint(path, model_args)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits), remembered while the file is unchanged.

    "Unchanged" includes the inode change time, which every write sets and no user can set
    back (unlike the modification time), and the file's identity (device, inode), so a
    same-size rewrite with its times restored, or another file renamed over it, is hashed again.
    """
    stat = path.stat()
    return _digest(path.resolve(), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_dev, stat.st_ino)


@functools.lru_cache(maxsize=64)
def _digest(path: Path, size: int, mtime_ns: int, ctime_ns: int, device: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
