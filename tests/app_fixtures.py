"""Fixtures for the analysis, figure and app tests: synthetic traces, a tiny registered ViT pair.

The synthetic traces have planted outliers at known cells and layers, so tests can check that
analyses and figures put them where they are. The tiny ViTs are DINOv2-style timm models (6
blocks, 64 channels, grid 8x8 at 112 px) registered under their own names, so the app can load
them by name with random weights, or from a weights file with outliers planted by the core
``vitlens.synthetic.plant_outliers``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
from timm.models import register_model

from vitlens.capture import Trace
from vitlens.layout import TokenLayout

TINY = "vitlens_test_tiny_patch14_dinov2"  # named like timm's DINOv2 ViTs, so the app pairs them
TINY_REG = "vitlens_test_tiny_patch14_reg4_dinov2"
TINY_GAP = "vitlens_test_tiny_patch14_gap"  # average-pooled (fc_norm after pooling): no per-token final norm
TINY_SIDE = 112  # the tiny models' native input: grid 8 x 8
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"


def synthetic_trace(
        grid: tuple[int, int] = (3, 4),
        num_registers: int = 2,
        num_layers: int = 3,
        num_heads: int = 2,
        outliers: dict[int, list[tuple[int, int]]] | None = None,
        width: int = 8,
        seed: int = 0,
        cls: bool = True,
) -> Trace:
    """A trace with norms near 10 and planted outliers (norm 100) at ``{layer: [(row, col), ...]}``.

    States (every layer) point along channel 0 for normal tokens and channel 1 for outliers, so
    an embedding separates them; attention is uniform except that CLS gives half of its
    attention to the outliers of each layer (head 0 only).
    """
    rng = np.random.default_rng(seed)
    layout = TokenLayout(num_cls=int(cls), num_registers=num_registers, grid=grid)
    tokens, prefix = layout.num_tokens, layout.num_prefix
    norms = (10 + rng.uniform(-1, 1, (num_layers, tokens))).astype(np.float32)
    states = {}
    attention = np.full((num_layers, num_heads, prefix, tokens), 1 / tokens, dtype=np.float32)
    for layer in range(num_layers):
        cells = (outliers or {}).get(layer, [])
        indices = [prefix + row * grid[1] + col for row, col in cells]
        norms[layer, indices] = 100.0
        vectors = rng.normal(0, 0.05, (tokens, width)).astype(np.float32)
        vectors[:, 0] += 1.0
        vectors[indices, 0] -= 1.0
        vectors[indices, 1] += 1.0
        vectors *= (norms[layer] / np.linalg.norm(vectors, axis=1))[:, None]
        states[layer] = vectors.astype(np.float16)
        if cls and indices:
            attention[layer, 0, 0] = 0.5 / (tokens - len(indices))
            attention[layer, 0, 0, indices] = 0.5 / len(indices)
    return Trace(layout=layout, input_size=(grid[0] * 14, grid[1] * 14), norms=norms,
                 final_norms=np.full(tokens, 20.0, dtype=np.float32), attention=attention,
                 neighbor_similarity=np.zeros(grid, dtype=np.float32), states=states)


def register_tiny_models() -> None:
    """Register the tiny DINOv2-style pair and an average-pooled twin with timm (idempotent)."""
    if timm.is_model(TINY_GAP):
        return
    from timm.models.vision_transformer import vit_small_patch14_dinov2, vit_small_patch14_reg4_dinov2

    def tiny_args(kwargs: dict) -> dict:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return {"depth": 6, "embed_dim": 64, "num_heads": 4, "img_size": TINY_SIDE, **kwargs}

    def vitlens_test_tiny_patch14_dinov2(pretrained: bool = False, **kwargs):
        return vit_small_patch14_dinov2(pretrained=False, **tiny_args(kwargs))

    def vitlens_test_tiny_patch14_reg4_dinov2(pretrained: bool = False, **kwargs):
        return vit_small_patch14_reg4_dinov2(pretrained=False, **tiny_args(kwargs))

    def vitlens_test_tiny_patch14_gap(pretrained: bool = False, **kwargs):
        return vit_small_patch14_dinov2(pretrained=False, **tiny_args({"global_pool": "avg", **kwargs}))

    register_model(vitlens_test_tiny_patch14_dinov2)
    register_model(vitlens_test_tiny_patch14_reg4_dinov2)
    register_model(vitlens_test_tiny_patch14_gap)


def planted_weights(path: Path, name: str, cells, layer: int) -> Path:
    """Save tiny-model weights with outliers at ``cells`` from block ``layer`` (``vitlens.synthetic.plant_outliers``)."""
    from safetensors.torch import save_file

    from vitlens.models import load_model
    from vitlens.synthetic import plant_outliers

    register_tiny_models()
    loaded = load_model(name, "random")
    plant_outliers(loaded, cells, layer)
    save_file({key: value.contiguous() for key, value in loaded.model.state_dict().items()}, str(path))
    return path


def tiny_pair_weights(folder: Path, cells, layer: int) -> Path:
    """``folder`` with the planted tiny model (``tiny_planted.safetensors``) and a clean twin with
    registers (``tiny_reg4.safetensors``): the app's weights folder in tests."""
    from safetensors.torch import save_file

    from vitlens.models import load_model

    folder.mkdir(exist_ok=True)
    planted_weights(folder / "tiny_planted.safetensors", TINY, cells, layer)
    clean = load_model(TINY_REG, "random").model
    save_file({key: value.contiguous() for key, value in clean.state_dict().items()}, str(folder / "tiny_reg4.safetensors"))
    return folder


def png_bytes(width: int = TINY_SIDE, height: int = TINY_SIDE, seed: int = 0) -> bytes:
    """A smooth colourful PNG (conftest.photo)."""
    from conftest import image_bytes, photo

    return image_bytes(photo(width, height, seed))
