"""High-norm outlier tokens: per-layer thresholds, masks on the patch grid, and emergence.

``auto`` looks for a separate high mode in the patch-token norms: the widest gap (in log norm)
among the top ``MAX_OUTLIER_FRACTION`` of tokens, accepted only when it is wide compared with
the spread of the bulk and the norms on either side differ by a clear factor. A unimodal layer
has no such gap, so it yields no outliers rather than the few largest tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..capture import Trace
from ..errors import OptionError

MAX_OUTLIER_FRACTION = 0.25  # outliers are a minority (about 2% in DINOv2 ViT-g)
MIN_GAP_SPREADS = 3.0  # the gap must be this many robust standard deviations of the bulk's log norms
MIN_NORM_RATIO = 1.5  # smallest outlier norm / largest normal norm


@dataclass(frozen=True, eq=False)
class OutlierResult:
    """Outliers of one layer.

    Attributes:
        threshold: Norm above which a patch token is an outlier; None when there is no high mode.
        mask: True at outlier cells.  # [row, col]
    """

    threshold: float | None
    mask: np.ndarray

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    @property
    def fraction(self) -> float:
        return self.count / self.mask.size

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(row, col) of each outlier, row-major."""
        return [(int(row), int(col)) for row, col in np.argwhere(self.mask)]


@dataclass(frozen=True, eq=False)
class LayerOutliers:
    """Outliers of every layer of one trace.

    Attributes:
        thresholds: Per layer; NaN where there is no high mode.  # [layer]
        masks: Outlier cells.  # [layer, row, col]
        norm_median: Median patch-token norm.  # [layer]
        norm_max: Largest patch-token norm.  # [layer]
    """

    thresholds: np.ndarray
    masks: np.ndarray
    norm_median: np.ndarray
    norm_max: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return self.masks.sum(axis=(1, 2))

    @property
    def fractions(self) -> np.ndarray:
        return self.counts / self.masks[0].size

    @property
    def first_layer(self) -> int | None:
        """The first layer with any outlier, or None."""
        layers = np.flatnonzero(self.counts)
        return int(layers[0]) if layers.size else None

    def layer(self, index: int) -> OutlierResult:
        threshold = self.thresholds[index]
        return OutlierResult(None if np.isnan(threshold) else float(threshold), self.masks[index])


def parse_threshold(text: str | float | None) -> float | None:
    """``auto`` (or None) -> None; a positive number -> that number.

    Raises:
        OptionError: anything else.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"Threshold must be 'auto' or a positive number, not '{text}'.") from None
    if not math.isfinite(value) or value <= 0:
        raise OptionError(f"Threshold must be 'auto' or a positive number, not '{text}'.")
    return value


def auto_threshold(norms: np.ndarray) -> float | None:
    """The norm separating a high mode from the bulk, or None if the norms are unimodal."""
    log_norms = np.log(np.maximum(np.sort(norms.ravel()).astype(np.float64), 1e-12))
    count = log_norms.size
    first_candidate = max(1, math.ceil(count * (1 - MAX_OUTLIER_FRACTION)))
    if first_candidate >= count:
        return None
    gaps = np.diff(log_norms)[first_candidate - 1:]  # gap below each candidate outlier
    best = int(np.argmax(gaps))
    split = first_candidate + best  # index of the smallest outlier
    bulk = log_norms[:first_candidate]
    spread = 1.4826 * np.median(np.abs(bulk - np.median(bulk)))
    if gaps[best] < max(MIN_GAP_SPREADS * spread, math.log(MIN_NORM_RATIO)):
        return None
    return float(math.exp((log_norms[split - 1] + log_norms[split]) / 2))


def find_outliers(patch_norms: np.ndarray, threshold: float | None = None) -> OutlierResult:
    """Outliers among patch-token norms on the grid.

    Args:
        patch_norms: One layer's patch-token norms.  # [row, col]
        threshold: A fixed norm, or None for ``auto``.
    """
    if threshold is None:
        threshold = auto_threshold(patch_norms)
    mask = patch_norms > threshold if threshold is not None else np.zeros(patch_norms.shape, dtype=bool)
    return OutlierResult(threshold, mask)


def layer_outliers(trace: Trace, threshold: float | None = None) -> LayerOutliers:
    """Outliers of every layer (norms before the final norm); ``threshold`` None means ``auto``."""
    grids = trace.patch_norms()  # [layer, row, col]
    results = [find_outliers(grid, threshold) for grid in grids]
    return LayerOutliers(
        thresholds=np.array([np.nan if r.threshold is None else r.threshold for r in results], dtype=np.float32),
        masks=np.stack([r.mask for r in results]),
        norm_median=np.median(grids, axis=(1, 2)).astype(np.float32),
        norm_max=grids.max(axis=(1, 2)).astype(np.float32),
    )
