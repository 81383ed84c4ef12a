"""Synthetic demo weights: a random ViT with planted high-norm tokens. Not a trained model.

The artifacts vitlens looks for (a few patch tokens with about 10x the norm of their
neighbours from a middle layer on) appear only in large ViTs trained long enough, so random
weights show none. This module builds a model that has them *by construction*, as ground
truth for the tests and as the offline demo of the dashboard (``weights="synthetic"`` in
``vitlens.models.load_model``):

1. A unit direction ``d`` of the residual stream is removed from everything that writes the
   input tokens: the patch embedding, the class and register tokens, the position embeddings.
2. The position embeddings then carry ``+2 d`` at the chosen cells and ``-2 d`` at every other
   patch position. Every patch token has the same ``|component|`` along ``d``, so the norms
   stay unimodal before the planted block.
3. Two MLP neurons of block ``k`` read ``d`` (a clamped ReLU, ``relu(z) - relu(z - 5)``,
   saturated at the chosen cells and zero elsewhere) and write ``norm * v`` for a random unit
   vector ``v``. Later blocks carry the large tokens on through the residual stream.

Step 2 is exact only on the grid the position embeddings were made for: at another input size
they are resampled, which blurs the single-cell ``+2 d`` spikes (at 112 px nothing fires; on a
3:2 picture some cells are lost; at 518 px neighbours fire too). So the model also carries a
forward hook on ``model.norm_pre`` (its output: the tokens with position embeddings added) that
sets every patch token's component along ``d`` to exactly ``+2`` at the chosen cells *moved to
the current grid* (``cells_on_grid``: same relative position) and ``-2`` elsewhere. On the
native grid it changes nothing (unless a pre-norm, as in CLIP, rescaled the tokens after the
position embeddings; it undoes that along ``d``); on any other grid of at least 2 x 2 cells the same four
demo cells, and only they, become high-norm tokens, whatever the side, aspect and picture. The
hook is not in the state dict: a saved planted model keeps step 2, exact at its native grid only.

This mimics *where* and *from which layer* the paper's artifact tokens show up, nothing more:
the planted tokens sit at fixed positions whatever the image shows, and attention, CLS and
every other weight are those of a random model. A model with registers gets nothing planted;
it is the demo's clean twin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from .adapters import adapter_for
from .errors import WeightsError

if TYPE_CHECKING:
    from .models import LoadedModel

SYNTHETIC_VERSION = 2  # bump when the demo's weights or planting change; part of the weights fingerprint
SYNTHETIC_SIDE = 224  # the demo model's native input
DEMO_GRID = (16, 16)  # DEMO_CELLS are cells of this grid (224 px at patch 14)
# Near the border, where photographs tend to have background; on any grid of at least 2 x 2
# cells they stay four distinct cells (see demo_cells).
DEMO_CELLS = ((2, 12), (3, 1), (9, 14), (12, 2))
PLANT_SEED = 1
Cells = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Planted:
    """A model whose outliers are known: ``cells`` become high-norm tokens at block ``layer``."""

    loaded: LoadedModel
    cells: Cells
    layer: int

    def mask(self, grid: tuple[int, int] | None = None) -> np.ndarray:
        """True at the planted cells of ``grid`` (default: the model's native grid).  # [row, col]"""
        native = tuple(self.loaded.model.patch_embed.grid_size)
        grid = grid or native
        mask = np.zeros(grid, dtype=bool)
        for row, col in cells_on_grid(self.cells, native, grid):
            mask[row, col] = True
        return mask


def plant_outliers(loaded: LoadedModel, cells: Sequence[tuple[int, int]], layer: int, norm: float = 100.0) -> Planted:
    """Plant high-norm tokens at ``cells`` (of the model's native grid) from block ``layer`` on;
    at other input sizes, at the same relative positions (``cells_on_grid``).

    Changes ``loaded.model`` in place; see the module docstring for how.

    Raises:
        WeightsError: the model has no absolute position embeddings or no plain MLP in that block.
    """
    plant(loaded.model, cells, layer, norm)
    return Planted(loaded=loaded, cells=tuple(tuple(cell) for cell in cells), layer=layer)


def plant(model: VisionTransformer, cells: Sequence[tuple[int, int]], layer: int, norm: float = 100.0,
          cells_grid: tuple[int, int] | None = None) -> None:
    """``plant_outliers`` on a bare timm ViT (in place).

    Args:
        model: The ViT.
        cells: (row, col) cells of ``cells_grid``.
        layer: The block that makes them high-norm.
        norm: Norm the planted neurons write.
        cells_grid: The grid ``cells`` belong to (default: the model's native grid); every grid
            gets them at the same relative positions.

    Raises:
        WeightsError: the model has no absolute position embeddings or no plain MLP in that block.
    """
    _check_plantable(model, layer)
    d, v = _directions(model.embed_dim)
    native = tuple(model.patch_embed.grid_size)
    cells_grid = cells_grid or native
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        _remove_direction(model, d)
        model.pos_embed[0, num_prefix:] += 2.0 * _signs(cells_on_grid(cells, cells_grid, native), native)[:, None] * d
        _write_neurons(model.blocks[layer], d, v, norm)
    model.norm_pre.register_forward_hook(_PlantOnEveryGrid(model.patch_embed, tuple(cells), cells_grid, d))


def demo_layer(depth: int) -> int:
    """The block the demo plants at: the middle one (6 of 12)."""
    return depth // 2


def cells_on_grid(cells: Sequence[tuple[int, int]], source: tuple[int, int], grid: tuple[int, int]) -> Cells:
    """``cells`` of the ``source`` grid moved to ``grid`` at the same relative positions (the cell
    of ``grid`` that holds each cell's top-left corner); cells that fall together are kept once."""
    moved = ((row * grid[0] // source[0], col * grid[1] // source[1]) for row, col in cells)
    return tuple(dict.fromkeys(moved))


def demo_cells(grid: tuple[int, int]) -> Cells:
    """The demo's planted cells on ``grid``: ``DEMO_CELLS`` at the same relative positions. Four
    distinct cells on any grid of at least 2 x 2 (any two of them differ in a row or a column
    that stays apart at 2 cells), and on a one-row or one-column grid of at least 8 cells."""
    return cells_on_grid(DEMO_CELLS, DEMO_GRID, grid)


def plant_demo(model: VisionTransformer) -> tuple[Cells, int] | None:
    """The demo's artifacts in a freshly built random model: ``demo_cells`` from ``demo_layer``.

    Returns the planted cells and block, or None for a model with registers (left clean).

    Raises:
        WeightsError: the model cannot be planted (see ``plant``).
    """
    if adapter_for(model).prefix(model).num_registers:
        return None
    cells, layer = demo_cells(tuple(model.patch_embed.grid_size)), demo_layer(len(model.blocks))
    plant(model, DEMO_CELLS, layer, cells_grid=DEMO_GRID)
    return cells, layer


def _check_plantable(model: VisionTransformer, layer: int) -> None:
    name = model.default_cfg.get("architecture", type(model).__name__)
    if not isinstance(model, VisionTransformer):
        raise WeightsError(f"The synthetic demo plants into timm VisionTransformer blocks, and '{name}' is a timm "
                           f"{type(model).__name__}.")
    if model.pos_embed is None:
        raise WeightsError(f"The synthetic demo plants through absolute position embeddings, which '{name}' has not.")
    if not 0 <= layer < len(model.blocks):
        raise WeightsError(f"Cannot plant at block {layer}: '{name}' has {len(model.blocks)} blocks.")
    mlp = model.blocks[layer].mlp
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, torch.nn.Linear) or mlp.fc1.bias is None or mlp.fc1.out_features < 2:
        raise WeightsError(f"The synthetic demo plants through a plain MLP, and block {layer} of '{name}' "
                           f"has a {type(mlp).__name__}.")


def _signs(cells: Sequence[tuple[int, int]], grid: tuple[int, int]) -> torch.Tensor:
    """+1 at ``cells``, -1 at every other cell, row-major.  # [patch]"""
    sign = -torch.ones(grid[0] * grid[1])
    for row, col in cells:
        sign[row * grid[1] + col] = 1.0
    return sign


class _PlantOnEveryGrid:
    """Forward hook on ``model.norm_pre``: sets each patch token's component along ``d`` to +2 at
    the planted cells of the current grid and -2 elsewhere (what the native position embeddings
    give on their own grid, and resampled ones only approximately on others)."""

    def __init__(self, patch_embed: torch.nn.Module, cells: Cells, cells_grid: tuple[int, int], d: torch.Tensor) -> None:
        self.patch_embed, self.cells, self.cells_grid, self.d = patch_embed, cells, cells_grid, d

    def __call__(self, module: torch.nn.Module, args: tuple, tokens: torch.Tensor) -> torch.Tensor:
        grid = tuple(self.patch_embed.grid_size)
        signs = _signs(cells_on_grid(self.cells, self.cells_grid, grid), grid).to(tokens)  # [patch]
        if tokens.shape[1] < signs.numel():
            raise RuntimeError(f"{tokens.shape[1]} tokens cannot fill the {grid[0]}x{grid[1]} grid")
        # patches come last, whatever was put before them (prefix tokens, a test-time register)
        prefix, patches = tokens[:, :-signs.numel()], tokens[:, -signs.numel():]  # [batch, token, channel]
        d = self.d.to(tokens)
        patches = patches + (2.0 * signs - patches @ d)[..., None] * d
        return torch.cat([prefix, patches], dim=1)


def _directions(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``d``: unit, zero mean over channels (LayerNorm centring keeps it); ``v``: unit.  # [channel] each"""
    generator = torch.Generator().manual_seed(PLANT_SEED)
    d = torch.randn(dim, generator=generator)
    d = (d - d.mean()) / (d - d.mean()).norm()
    v = torch.randn(dim, generator=generator)
    return d, v / v.norm()


def _remove_direction(model: VisionTransformer, d: torch.Tensor) -> None:
    """Project ``d`` out of the patch embedding, class/register tokens and position embeddings."""
    dim = model.embed_dim
    weight = model.patch_embed.proj.weight.view(dim, -1)
    weight -= d[:, None] * (d @ weight)[None]
    if model.patch_embed.proj.bias is not None:
        model.patch_embed.proj.bias -= d * (d @ model.patch_embed.proj.bias)
    for token in (model.cls_token, model.reg_token):
        if token is not None:
            token -= (token @ d)[..., None] * d
    pos = model.pos_embed[0]  # [position, channel]
    pos -= (pos @ d)[:, None] * d


def _write_neurons(block: torch.nn.Module, d: torch.Tensor, v: torch.Tensor, norm: float) -> None:
    """Two neurons whose difference is a clamped ReLU of ``d``, writing ``norm * v`` when saturated.

    The block's LayerScale (if any) is folded into the MLP's output weights and set to 1, so
    the planted neurons write at full scale and the other neurons keep their (small) share.
    """
    mlp = block.mlp
    if hasattr(block.ls2, "gamma"):
        mlp.fc2.weight *= block.ls2.gamma[:, None]
        if mlp.fc2.bias is not None:
            mlp.fc2.bias *= block.ls2.gamma
        block.ls2.gamma.fill_(1.0)
    mlp.fc1.weight[:2] = 20.0 * d
    mlp.fc1.bias[:2] = torch.tensor([-5.0, -10.0])
    mlp.fc2.weight[:, 0] = norm / 5 * v
    mlp.fc2.weight[:, 1] = -norm / 5 * v
