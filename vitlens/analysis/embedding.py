"""Where outlier tokens sit among the others: a 2-D PCA or UMAP of one layer's tokens over images.

The vectors are ``Trace.states[layer]`` (block outputs before the final norm), so the traces must
have been captured with that layer in ``state_layers``. Patch tokens and prefix tokens (CLS,
registers) are embedded together and returned separately, each point with where it came from.
PCA works on the centred vectors and is instant; UMAP takes seconds. On raw vectors PCA mostly
sorts tokens by norm (an outlier's norm is ten times its neighbours'); with ``normalize`` every
token is scaled to unit length first, so both methods compare directions only (cosine geometry:
UMAP then uses the cosine metric, else the Euclidean one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..capture import Trace
from ..errors import OptionError
from .outliers import find_outliers

METHODS = ("pca", "umap")
MIN_UMAP_POINTS = 10  # UMAP's neighbour graph needs a few points


@dataclass(frozen=True, eq=False)
class TokenEmbedding:
    """2-D coordinates of one layer's tokens over several images.

    Attributes:
        method: ``pca`` or ``umap``.
        layer: Block index.
        coords: Patch-token coordinates.  # [point, 2]
        image: Index of each patch token's trace in the input list.  # [point]
        row: Grid row of each patch token.  # [point]
        col: Grid column of each patch token.  # [point]
        norm: L2 norm of each patch token (before the final norm).  # [point]
        outlier: Whether each patch token is an outlier of its image's layer.  # [point]
        prefix_coords: Prefix-token coordinates; empty when prefix tokens were left out.  # [prefix point, 2]
        prefix_image: Index of each prefix token's trace.  # [prefix point]
        prefix_names: ``cls``, ``reg0``, ... of each prefix point.
        explained: PCA's explained variance ratio of the two axes; None for UMAP.  # [2]
        normalized: Whether the vectors were scaled to unit length first (cosine geometry).
    """

    method: str
    layer: int
    coords: np.ndarray
    image: np.ndarray
    row: np.ndarray
    col: np.ndarray
    norm: np.ndarray
    outlier: np.ndarray
    prefix_coords: np.ndarray
    prefix_image: np.ndarray
    prefix_names: list[str]
    explained: np.ndarray | None = None
    normalized: bool = False

    @property
    def num_points(self) -> int:
        return int(self.coords.shape[0])


def layer_states(trace: Trace, layer: int) -> np.ndarray:
    """One layer's token vectors as float32.  # [token, channel]

    Raises:
        OptionError: the layer's states were not captured.
    """
    if -trace.num_layers <= layer < 0:
        layer %= trace.num_layers
    if layer not in trace.states:
        kept = ", ".join(map(str, sorted(trace.states))) or "none"
        raise OptionError(f"Token vectors of layer {layer} were not captured (captured layers: {kept}).")
    return np.asarray(trace.states[layer], dtype=np.float32)


def token_embedding(
        traces: Sequence[Trace],
        layer: int,
        method: str = "pca",
        threshold: float | None = None,
        include_prefix: bool = True,
        seed: int = 0,
        normalize: bool = False,
) -> TokenEmbedding:
    """Embed the tokens of one layer of several images in 2-D.

    Args:
        traces: Captures of one model that kept ``layer`` in their states.
        layer: Block index.
        method: ``pca`` or ``umap``.
        threshold: Outlier norm threshold, or None for each image's ``auto`` threshold.
        include_prefix: Embed CLS and the registers too.
        seed: UMAP's random state (PCA is deterministic up to sign, which is fixed).
        normalize: Scale every token vector to unit L2 norm first (cosine geometry), so
            directions, not norms, decide where tokens land.

    Raises:
        OptionError: unknown method, no traces, states missing, mixed widths, too few points.
    """
    if method not in METHODS:
        raise OptionError(f"Embedding method must be one of {', '.join(METHODS)}, not '{method}'.")
    if not traces:
        raise OptionError("Choose at least one image to embed.")
    if -traces[0].num_layers <= layer < 0:
        layer %= traces[0].num_layers
    patches, prefixes = _gather(traces, layer, include_prefix)
    vectors = np.concatenate([patches["vectors"], prefixes["vectors"]])  # [point, channel]
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    norms_grids = [trace.patch_norms()[layer] for trace in traces]
    outlier = np.concatenate([find_outliers(grid, threshold).mask.ravel() for grid in norms_grids])
    coords, explained = (_pca(vectors) if method == "pca" else (_umap(vectors, seed, "cosine" if normalize else "euclidean"), None))
    count = patches["vectors"].shape[0]
    return TokenEmbedding(
        method=method,
        layer=layer,
        coords=coords[:count],
        image=patches["image"],
        row=patches["row"],
        col=patches["col"],
        norm=np.concatenate([grid.ravel() for grid in norms_grids]).astype(np.float32),
        outlier=outlier,
        prefix_coords=coords[count:],
        prefix_image=prefixes["image"],
        prefix_names=prefixes["names"],
        explained=explained,
        normalized=normalize,
    )


def _gather(traces: Sequence[Trace], layer: int, include_prefix: bool) -> tuple[dict, dict]:
    """Patch and prefix vectors of every trace with where each one came from."""
    patch_vectors, images, rows, cols = [], [], [], []
    prefix_vectors, prefix_images, prefix_names = [], [], []
    all_states = [layer_states(trace, layer) for trace in traces]  # [token, channel] each
    if len({states.shape[-1] for states in all_states}) != 1:
        raise OptionError("All traces must come from one model to share an embedding.")
    for index, (trace, states) in enumerate(zip(traces, all_states)):
        layout = trace.layout
        grid_rows, grid_cols = np.divmod(np.arange(layout.num_patches), layout.grid[1])
        patch_vectors.append(states[layout.patches])
        images.append(np.full(layout.num_patches, index))
        rows.append(grid_rows)
        cols.append(grid_cols)
        if include_prefix:
            prefix_vectors.append(states[:layout.num_prefix])
            prefix_images.append(np.full(layout.num_prefix, index))
            prefix_names.extend(layout.prefix_names())
    width = patch_vectors[0].shape[1]
    patches = {"vectors": np.concatenate(patch_vectors), "image": np.concatenate(images),
               "row": np.concatenate(rows), "col": np.concatenate(cols)}
    prefixes = {"vectors": np.concatenate(prefix_vectors) if prefix_vectors else np.zeros((0, width), np.float32),
                "image": np.concatenate(prefix_images) if prefix_images else np.zeros(0, np.int64),
                "names": prefix_names}
    return patches, prefixes


def _pca(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components, signs fixed so the largest loading is positive."""
    centred = vectors.astype(np.float64) - vectors.mean(axis=0, dtype=np.float64)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:2]
    if components.shape[0] < 2:  # a single point or a single channel
        components = np.vstack([components, np.zeros((2 - components.shape[0], vectors.shape[1]))])
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    variance = singular**2
    total = variance.sum()
    explained = np.zeros(2)
    explained[:min(2, variance.size)] = variance[:2] / total if total > 0 else 0.0
    return (centred @ components.T).astype(np.float32), explained


def _umap(vectors: np.ndarray, seed: int, metric: str) -> np.ndarray:
    if vectors.shape[0] < MIN_UMAP_POINTS:
        raise OptionError(f"UMAP needs at least {MIN_UMAP_POINTS} tokens; use PCA for {vectors.shape[0]}.")
    import umap  # slow import (numba); only when asked for

    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, vectors.shape[0] - 1), min_dist=0.1,
                        metric=metric, random_state=seed, n_jobs=1)
    return reducer.fit_transform(vectors).astype(np.float32)
