"""The one settings object, read from the environment by the entry points (CLI, app, worker)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .images import DEFAULT_MAX_PIXELS
from .store import DEFAULT_SIZE_LIMIT


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitlens"


@dataclass(frozen=True)
class Settings:
    """Deployment settings. Environment variables: ``VITLENS_<FIELD>`` in upper case.

    Attributes:
        cache_dir: Where traces (and the job queue) live; shared by app, worker and CLI.
        cache_size: Cache size limit in bytes.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        max_pixels: Largest image (width x height) accepted for decoding.
        max_side: Largest capture side in pixels.
        allowed_models: Model names the app offers and accepts; None: any preset or timm ViT.
        weights_dir: Folder the app may load local weights files from; None: no local files.
    """

    cache_dir: Path = _default_cache_dir()
    cache_size: int = DEFAULT_SIZE_LIMIT
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = 1036
    allowed_models: tuple[str, ...] | None = None
    weights_dir: Path | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def get(name: str, default):
            return env.get(f"VITLENS_{name.upper()}", default)

        allowed = get("allowed_models", None)
        weights_dir = get("weights_dir", None)
        return cls(
            cache_dir=Path(get("cache_dir", defaults.cache_dir)),
            cache_size=int(get("cache_size", defaults.cache_size)),
            device=get("device", defaults.device),
            max_pixels=int(get("max_pixels", defaults.max_pixels)),
            max_side=int(get("max_side", defaults.max_side)),
            allowed_models=tuple(name.strip() for name in allowed.split(",") if name.strip()) if allowed else None,
            weights_dir=Path(weights_dir) if weights_dir else None,
        )
