"""LOST object discovery (Siméoni et al., BMVC 2021) on one image's patch features, and corLoc.

Follows the authors' ``object_discovery.lost``: the similarity graph is ``A = F F^T`` over patch
features (keys of the last block by default); the *seed* is the patch with the fewest positive
correlations (the lowest degree; an object covers less of the image than the background); the
seed expands to those of the ``k`` lowest-degree patches that correlate positively with it; the
box is the bounding box of the connected component (4-neighbourhood) of ``sum(A[expansion]) > 0``
that holds the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFAULT_K = 100  # LOST's k_patches
IOU_CORRECT = 0.5


@dataclass(frozen=True, eq=False)
class LostResult:
    """LOST on one image, in patch-grid coordinates.

    Attributes:
        seed: (row, col) of the seed patch.
        box: (row0, col0, row1, col1) of the discovered object, row1/col1 exclusive.
        degree: Positive correlations of each patch (the seed has the fewest).  # [row, col]
        mask: The seed's connected component.  # [row, col]
        expansion: Flat row-major indices of the patches the seed expanded to (the seed included).
    """

    seed: tuple[int, int]
    box: tuple[int, int, int, int]
    degree: np.ndarray
    mask: np.ndarray
    expansion: np.ndarray


def lost(features: np.ndarray, grid: tuple[int, int], k: int = DEFAULT_K) -> LostResult:
    """Discover one object from patch features.

    Args:
        features: One vector per patch, row-major (prefix tokens removed).  # [patch, channel]
        grid: (rows, cols) of the patches.
        k: Lowest-degree patches considered for the seed expansion.

    Raises:
        ValueError: ``features`` does not have one row per grid cell, or ``k`` < 1.
    """
    rows, cols = grid
    if features.ndim != 2 or features.shape[0] != rows * cols:
        raise ValueError(f"expected {rows * cols} patch features for grid {grid}, got shape {features.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    x = features.astype(np.float32)  # as LOST's own float32 torch computation
    similarity = x @ x.T  # [patch, patch]
    degree = _degree(similarity)
    order = np.argsort(degree, kind="stable")  # lowest degree first; ties: the earlier patch
    seed = int(order[0])
    candidates = order[:k]
    expansion = candidates[similarity[seed, candidates] > 0]
    correlation = similarity[expansion].sum(axis=0).reshape(rows, cols)  # [row, col]
    mask = _seed_component(correlation > 0, divmod(seed, cols))
    return LostResult(seed=divmod(seed, cols), box=_bounding_box(mask), degree=degree.reshape(rows, cols),
                      mask=mask, expansion=expansion)


def _degree(similarity: np.ndarray) -> np.ndarray:
    """Number of positive correlations of each patch with the others.  # [patch]"""
    positive = similarity > 0
    np.fill_diagonal(positive, False)
    return positive.sum(axis=1)


def _seed_component(foreground: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``foreground`` holding ``seed``; the seed alone if it is background.

    LOST raises in that case ("should not happen"): the seed correlates positively with itself,
    so only patches whose features sum against it can leave it out.
    """
    labels, _ = ndimage.label(foreground)
    label = labels[seed]
    if label == 0:
        mask = np.zeros(foreground.shape, dtype=bool)
        mask[seed] = True
        return mask
    return labels == label


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes``, all (x0, y0, x1, y1) with x1/y1 exclusive.

    Args:
        box: The prediction.  # [4]
        boxes: Ground truth.  # [box, 4]

    Returns:
        IoU per ground-truth box.  # [box]
    """
    box, boxes = np.asarray(box, dtype=np.float64), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(min=0)
    height = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(min=0)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def corloc(ious: list[float]) -> float | None:
    """Fraction of images whose best IoU reaches ``IOU_CORRECT``; None for no images."""
    if not ious:
        return None
    return float(np.mean(np.asarray(ious) >= IOU_CORRECT))
