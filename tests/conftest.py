"""Shared fixtures: tiny timm ViTs built through ``load_model``, a planted-outlier model, test images.

The planted-outlier model comes from ``vitlens.synthetic`` (the same construction as the
dashboard's synthetic demo): known cells, known block.

Every test runs with its own empty trace cache and an unreachable Hugging Face hub, so nothing
is ever downloaded and no test sees another test's cached traces.
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.models import LoadedModel, load_model
from vitlens.synthetic import Planted, plant_outliers  # noqa: F401 (re-exported for the tests)

TINY_ARGS = dict(depth=4, embed_dim=64, num_heads=4, img_size=56)  # grid 4x4
PLANTED_ARGS = dict(depth=6, embed_dim=64, num_heads=4, img_size=112)  # grid 8x8
PLANTED_LAYER = 3
PLANTED_CELLS = ((1, 2), (7, 0), (2, 6))
UNREACHABLE_HUB = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh trace cache and an empty, unreachable Hugging Face hub for every test."""
    import huggingface_hub.constants

    hf_home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("VITLENS_CACHE_DIR", str(tmp_path_factory.mktemp("vitlens_cache")))
    monkeypatch.setenv("VITLENS_DEVICE", "cpu")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))


@pytest.fixture
def tiny_vit() -> LoadedModel:
    """DINOv2-style ViT without registers: 4 blocks, 64 channels, 4 heads, 56 px (grid 4x4)."""
    return load_model("vit_small_patch14_dinov2", "random", model_args=TINY_ARGS)


@pytest.fixture
def tiny_vit_reg() -> LoadedModel:
    """The same with 4 registers (token order: cls, 4 registers, patches)."""
    return load_model("vit_small_patch14_reg4_dinov2", "random", model_args=TINY_ARGS)


@pytest.fixture(params=["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"], ids=["plain", "reg4"])
def tiny_model(request: pytest.FixtureRequest) -> LoadedModel:
    """Each tiny DINOv2-style ViT in turn, with and without registers."""
    return load_model(request.param, "random", model_args=TINY_ARGS)


@pytest.fixture(params=["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"], ids=["plain", "reg4"])
def planted(request: pytest.FixtureRequest) -> Planted:
    """Tiny DINOv2-style ViT (6 blocks, grid 8x8) with outliers at ``PLANTED_CELLS`` from block 3."""
    loaded = load_model(request.param, "random", model_args=PLANTED_ARGS)
    return plant_outliers(loaded, PLANTED_CELLS, PLANTED_LAYER)


def random_pixels(loaded: LoadedModel, seed: int = 0, size: tuple[int, int] | None = None, batch: int = 1) -> torch.Tensor:
    """Normalised-looking random input at ``size`` (default: the model's own).  # [batch, 3, height, width]"""
    height, width = size or loaded.native_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


def image_bytes(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def rewrite_keeping_size_and_times(path: Path, data: bytes) -> None:
    """Overwrite ``path`` in place with ``data`` of the same size, then set its access and
    modification times back: what (path, size, mtime) alone cannot tell from the old file."""
    before = path.stat()
    assert len(data) == before.st_size and data != path.read_bytes()
    time.sleep(0.05)  # past the kernel's timestamp tick, as any real rewrite is
    with open(path, "r+b") as handle:  # same inode
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colourful RGB test picture (gradients plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture
def tiny_args() -> dict:
    return dict(TINY_ARGS)


@pytest.fixture
def plant() -> Callable[..., Planted]:
    """``plant_outliers`` (for models other than the ``planted`` fixture's)."""
    return plant_outliers


@pytest.fixture
def pixels() -> Callable[..., torch.Tensor]:
    """``random_pixels(loaded, seed=0, size=None, batch=1)``."""
    return random_pixels


@pytest.fixture
def encode() -> Callable[..., bytes]:
    """``image_bytes(image, fmt="PNG", **save_args)``: a PIL image as file bytes."""
    return image_bytes


@pytest.fixture
def make_photo() -> Callable[..., Image.Image]:
    """``photo(width=64, height=48, seed=0)``: a smooth colourful RGB picture."""
    return photo


@pytest.fixture
def png_file(tmp_path) -> Callable[..., object]:
    """Writes ``photo(width, height, seed)`` as a PNG in the test's tmp dir and returns its path."""
    def write(width: int = 64, height: int = 48, seed: int = 0, name: str | None = None):
        path = tmp_path / (name or f"photo_{width}x{height}_{seed}.png")
        path.write_bytes(image_bytes(photo(width, height, seed)))
        return path
    return write
