"""What the prefix tokens (CLS, registers) attend to, and how much of CLS's attention the outliers take.

Attention comes from ``Trace.attention`` (softmax of each prefix query over all tokens, per layer
and head), so nothing here needs the model. Token order is the trace's ``TokenLayout``:
[cls, registers..., patches row-major].

Block ``l``'s attention is computed from its *input*, the output of block ``l - 1``, while
``Trace.norms[l]`` (and so the outlier masks) are block ``l``'s *output*. Attention to outliers
therefore pairs block ``l`` with the outliers of layer ``l - 1``: the tokens that were outliers
when its queries and keys were made. Block 0's input (patch and position embeddings) has no
captured norms, so it has no outlier mask (None, NaN in per-block arrays), not an empty one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..capture import Trace
from ..errors import OptionError
from ..layout import TokenLayout
from .outliers import LayerOutliers


@dataclass(frozen=True, eq=False)
class AttentionMaps:
    """Attention of each prefix query in one layer, split into patches (on the grid) and prefix tokens.

    Attributes:
        layer: Block index.
        head: Head index, or None for the mean over heads.
        names: Prefix query names in order: ``cls``, ``reg0``, ...
        maps: Attention of each prefix query to each patch.  # [prefix, row, col]
        to_prefix: Attention of each prefix query to each prefix token.  # [query, key]
    """

    layer: int
    head: int | None
    names: list[str]
    maps: np.ndarray
    to_prefix: np.ndarray

    @property
    def patch_mass(self) -> np.ndarray:
        """Share of each query's attention that goes to patches.  # [prefix]"""
        return self.maps.sum(axis=(1, 2))

    def map(self, name: str) -> np.ndarray:
        """The grid of one prefix query, by name.  # [row, col]"""
        if name not in self.names:
            raise OptionError(f"This model has no '{name}' token; its prefix tokens are {', '.join(self.names)}.")
        return self.maps[self.names.index(name)]


@dataclass(frozen=True, eq=False)
class ClsOutlierAttention:
    """Where CLS attention goes in each block: to patches that were outliers in the block's input
    (block ``l - 1``'s output), to the other patches, to prefix tokens.

    Masses are shares of CLS's attention (they sum to 1 per block). Block 0 has no outlier mask
    (its input has no captured norms), so its outlier and normal masses and count are NaN.

    Attributes:
        head: Head index, or None for the mean over heads.
        outlier_mass: Attention to patches that were outliers in the block's input.  # [block]
        normal_mass: Attention to the other patches.  # [block]
        patch_mass: Attention to all patches.  # [block]
        prefix_mass: Attention to CLS itself and the registers.  # [block]
        num_outliers: Outlier patches in the block's input (float: NaN for block 0).  # [block]
        num_patches: Patches per block.
    """

    head: int | None
    outlier_mass: np.ndarray
    normal_mass: np.ndarray
    patch_mass: np.ndarray
    prefix_mass: np.ndarray
    num_outliers: np.ndarray
    num_patches: int

    @property
    def expected_outlier_mass(self) -> np.ndarray:
        """The baseline: what the outliers would get if CLS spread its attention on patches evenly
        (their share of the patches times the attention on patches).  # [block]"""
        return self.num_outliers / self.num_patches * self.patch_mass

    @property
    def outlier_per_token(self) -> np.ndarray:
        """Mean attention per outlier patch; NaN in blocks without input outliers and block 0.  # [block]"""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.num_outliers > 0, self.outlier_mass / self.num_outliers, np.nan)

    @property
    def normal_per_token(self) -> np.ndarray:
        """Mean attention per normal patch; NaN for block 0.  # [block]"""
        normal = self.num_patches - self.num_outliers
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(normal > 0, self.normal_mass / normal, np.nan)


def _check_index(value: int, count: int, what: str) -> int:
    if not -count <= value < count:
        raise OptionError(f"{what.capitalize()} {value} is out of range: this model has {count} {what}s (0 to {count - 1}).")
    return value % count


def _heads(attention: np.ndarray, head: int | None) -> np.ndarray:
    """Select one head or average them: ``[..., head, query, token]`` -> ``[..., query, token]``."""
    if head is None:
        return attention.mean(axis=-3)
    return attention[..., _check_index(head, attention.shape[-3], "head"), :, :]


def attention_maps(trace: Trace, layer: int, head: int | None = None) -> AttentionMaps:
    """The attention maps of every prefix token in one layer.

    Args:
        trace: One image's capture.
        layer: Block index (negative counts from the end).
        head: One head, or None for the mean over heads.

    Raises:
        OptionError: layer or head out of range.
    """
    layer = _check_index(layer, trace.num_layers, "layer")
    attention = _heads(trace.attention[layer], head)  # [prefix, token]
    layout = trace.layout
    return AttentionMaps(
        layer=layer,
        head=head,
        names=layout.prefix_names(),
        maps=layout.patch_grid(attention),
        to_prefix=attention[:, :layout.num_prefix],
    )


def head_maps(trace: Trace, layer: int, query: str) -> np.ndarray:
    """Every head's attention of one prefix query (``cls``, ``reg0``, ...) over the patches.  # [head, row, col]

    Raises:
        OptionError: layer out of range, or no such prefix token.
    """
    layer = _check_index(layer, trace.num_layers, "layer")
    names = trace.layout.prefix_names()
    if query not in names:
        raise OptionError(f"This model has no '{query}' token; its prefix tokens are {', '.join(names) or 'none'}.")
    return trace.layout.patch_grid(trace.attention[layer, :, names.index(query)])


@dataclass(frozen=True, eq=False)
class PatchAttention:
    """What one patch attends to and who attends to it in one block, per head.

    Attributes:
        layer: Block index.
        cell: The patch (row, col).
        prefix_names: ``cls``, ``reg0``, ... in token order.
        gives: The patch's attention to every patch.  # [head, row, col]
        gives_prefix: The patch's attention to each prefix token.  # [head, prefix]
        gets: Every patch's attention to the patch.  # [head, row, col]
        gets_prefix: Each prefix token's attention to the patch.  # [head, prefix]
    """

    layer: int
    cell: tuple[int, int]
    prefix_names: list[str]
    gives: np.ndarray
    gives_prefix: np.ndarray
    gets: np.ndarray
    gets_prefix: np.ndarray


def patch_attention(weights: np.ndarray, layout: TokenLayout, layer: int, cell: tuple[int, int]) -> PatchAttention:
    """Split one block's full attention (``vitlens.capture.full_attention``) around one patch.

    Args:
        weights: Softmax attention of every query over every token.  # [head, query, token]
        layout: Token order of that pass.
        layer: The block it came from.
        cell: The patch (row, col).

    Raises:
        OptionError: the cell is outside the grid.
    """
    rows, cols = layout.grid
    row, col = cell
    if not (0 <= row < rows and 0 <= col < cols):
        raise OptionError(f"Patch ({row}, {col}) is outside the {rows} x {cols} grid.")
    token = layout.num_prefix + row * cols + col
    prefix = slice(0, layout.num_prefix)
    return PatchAttention(layer=layer, cell=(row, col), prefix_names=layout.prefix_names(),
                          gives=layout.patch_grid(weights[:, token]), gives_prefix=weights[:, token, prefix],
                          gets=layout.patch_grid(weights[:, :, token]), gets_prefix=weights[:, prefix, token])


POOL_QUERY = "attention-pool query"


def pool_attention_map(trace: Trace, head: int | None = None) -> AttentionMaps | None:
    """Where the attention-pool head (SigLIP-style ``global_pool='map'``) looks: its query's attention.

    The pool reads the output of the last block (after the final norm), so ``layer`` is the last
    block. It has its own number of heads (``trace.pool_attention.shape[0]``).

    Args:
        trace: One image's capture.
        head: One of the pool's heads, or None for their mean.

    Returns:
        The maps (one per latent query, named ``attention-pool query``), or None without such a head.

    Raises:
        OptionError: head out of range.
    """
    if trace.pool_attention is None:
        return None
    attention = _heads(trace.pool_attention, head)  # [query, token]
    layout = trace.layout
    names = [POOL_QUERY] if len(attention) == 1 else [f"{POOL_QUERY} {i}" for i in range(len(attention))]
    return AttentionMaps(layer=trace.num_layers - 1, head=head, names=names, maps=layout.patch_grid(attention),
                         to_prefix=attention[:, :layout.num_prefix])


def input_outlier_mask(outliers: LayerOutliers, block: int) -> np.ndarray | None:
    """The outliers of block ``block``'s input (layer ``block - 1``'s output); None for block 0,
    whose input (patch and position embeddings) has no captured norms.  # [row, col]"""
    return outliers.masks[block - 1] if block > 0 else None


def cls_outlier_attention(trace: Trace, outliers: LayerOutliers, head: int | None = None) -> ClsOutlierAttention:
    """How much of CLS's attention goes to the patches that were outliers in each block's input.

    Args:
        trace: One image's capture.
        outliers: Outliers of the same trace (``layer_outliers``), which fixes the threshold.
        head: One head, or None for the mean over heads.

    Raises:
        OptionError: the model has no class token, or the head is out of range.
    """
    layout = trace.layout
    if layout.cls_index is None:
        raise OptionError("This model has no class token, so there is no CLS attention to measure.")
    if outliers.masks.shape != (trace.num_layers, *layout.grid):
        raise ValueError(f"outlier masks {outliers.masks.shape} do not match the trace {(trace.num_layers, *layout.grid)}")
    cls = _heads(trace.attention, head)[:, layout.cls_index].astype(np.float64)  # [block, token]
    to_patches = layout.patch_grid(cls)  # [block, row, col]
    patch_mass = to_patches.sum(axis=(1, 2))
    inputs = outliers.masks[:-1]  # block l's input is layer l-1's output  # [block - 1, row, col]
    outlier_mass = np.concatenate([[np.nan], (to_patches[1:] * inputs).sum(axis=(1, 2))])
    return ClsOutlierAttention(
        head=head,
        outlier_mass=outlier_mass,
        normal_mass=patch_mass - outlier_mass,
        patch_mass=patch_mass,
        prefix_mass=cls[:, :layout.num_prefix].sum(axis=1),
        num_outliers=np.concatenate([[np.nan], inputs.sum(axis=(1, 2))]),
        num_patches=layout.num_patches,
    )
