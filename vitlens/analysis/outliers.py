"""High-norm outlier tokens: per-layer thresholds, masks on the patch grid, and emergence.

How ``auto`` decides (``decide_threshold``)
-------------------------------------------
Outliers are the tokens of a separate *high mode* of the patch-token norms. Whether there is one
is asked of the bulk's own upper tail, in log norm, not of its spread:

1. Non-finite norms are dropped and counted. A NaN cell is never flagged (an infinite one is, when
   there is a threshold). The finite log norms are sorted decreasingly, ``y_1 >= ... >= y_n``.
2. Every split ``k`` (the ``k`` largest above it, ``k <= n / 2``) is a candidate. If the upper tail
   is exponential in log norm (a Pareto tail, the heaviest a unimodal norm distribution plausibly
   has), the normalised spacings ``D_i = i (y_i - y_(i+1))`` are independent with one mean ``mu``
   (Renyi). ``mu_k`` is their mean over the ``M = TAIL_FACTOR sqrt(n)`` bulk spacings below the
   split (a Hill estimate, floored at ``MIN_TAIL_SCALE``), and two exact tests ask whether the
   candidates continue that tail: the gap, ``D_k / mu_k ~ F(2, 2M)``, and the height (mean log
   excess of the candidates over the largest bulk norm), ``H_k / mu_k ~ F(2k, 2M)``. The split's
   p-value is twice the smaller one.
3. A split must also be a visible mode: its lowest norm at least ``MIN_GAP_RATIO`` x the largest
   bulk norm and ``MIN_MEDIAN_RATIO`` x the bulk median. Among visible splits with a p-value
   below ``ALPHA / log2 n`` (the scan's effective number of tests, set on Pareto samples), the one
   with the widest gap (in log norm) is the threshold, at the geometric mean of the two norms
   around it. The widest gap, not the most significant one: a bulk's lone extreme token or an
   in-between token passes the test together with the mode above it, and the wider gap is the
   mode's lower edge more often (calibration: bulk tokens flagged in 0-0.7% of sparse-mode draws
   at 37x37 and above, against 0.3-1.3% when the Renyi-normalised gap chose).
4. Under ``MIN_TAIL_TOKENS`` norms (grids up to 5x5) there is no tail to fit: the widest log gap in
   the top half is accepted when it is at least ``TINY_GAP_RATIO``.

Why this rule: the previous one (widest gap in the top quarter against the spread of the *low*
bulk) looked at one gap, which is often *inside* a sparse high mode spread over 3.5-10x the
median, and judged it against a spread that says nothing about how far the bulk's tail reaches;
it missed most 518 px images and any mode above a quarter of the tokens. The tail tests judge the
candidate mode's gap and height against the bulk's own tail: exact on Pareto tails, conservative
on lighter ones (normal, lognormal, gamma bulks fall faster than exponential in log norm).
docs/outliers.md has the calibration table (``python -m vitlens.calibrate``) and where it falls short.
``auto_thresholds`` applies the same rule (the same float operations) to many rows at once for sweeps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betainc

from ..capture import Trace
from ..errors import OptionError

ALPHA = 0.01  # family-wise false-alarm level of the tail test on a Pareto-tailed bulk
MIN_TAIL_TOKENS = 36  # below this many finite norms there is no tail to fit (TINY_GAP_RATIO decides)
MIN_MEDIAN_RATIO = 2.0  # the lowest outlier is at least this many times the bulk median
MIN_GAP_RATIO = 1.1  # ... and this many times the largest bulk norm
TINY_GAP_RATIO = 2.5  # on tiny grids: lowest outlier / largest bulk norm
MIN_TAIL_SCALE = 0.02  # floor on the bulk's tail scale (log norm), so a constant bulk is not infinitely tight
TAIL_FACTOR = 2.0  # M = TAIL_FACTOR sqrt(n) bulk tokens estimate the bulk's tail scale


@dataclass(frozen=True)
class ThresholdDecision:
    """Why ``auto`` drew (or did not draw) a threshold in one set of norms.

    Attributes:
        threshold: The norm above which tokens are outliers; None when there is no high mode.
        split_low: Largest bulk norm at the best candidate split (None when there was none).
        split_high: Smallest norm above that split.
        count_above: Tokens above the split.
        measure: What was tested: ``tail p-value``, ``gap ratio`` (tiny grids) or ``fixed``.
        value: The measure at the best split.
        needed: The value it had to beat (p-value below it, gap ratio at or above it).
        accepted: Whether the split became the threshold.
        dropped: Non-finite norms left out.
        reason: One sentence saying all of this.
    """

    threshold: float | None
    split_low: float | None
    split_high: float | None
    count_above: int
    measure: str
    value: float | None
    needed: float | None
    accepted: bool
    dropped: int
    reason: str

    def to_dict(self) -> dict:
        """JSON-ready fields (``--json``)."""
        return {"split_low": self.split_low, "split_high": self.split_high, "count_above": self.count_above,
                "measure": self.measure, "value": self.value, "needed": self.needed, "accepted": self.accepted,
                "dropped": self.dropped}


@dataclass(frozen=True, eq=False)
class OutlierResult:
    """Outliers of one layer.

    Attributes:
        threshold: Norm above which a patch token is an outlier; None when there is no high mode.
        mask: True at outlier cells (never at a NaN cell).  # [row, col]
        decision: How the threshold was chosen.
    """

    threshold: float | None
    mask: np.ndarray
    decision: ThresholdDecision | None = None

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
        norm_median: Median finite patch-token norm.  # [layer]
        norm_max: Largest finite patch-token norm.  # [layer]
        decisions: How each layer's threshold was chosen.  # [layer]
    """

    thresholds: np.ndarray
    masks: np.ndarray
    norm_median: np.ndarray
    norm_max: np.ndarray
    decisions: tuple[ThresholdDecision, ...] = ()

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
        decision = self.decisions[index] if self.decisions else None
        return OutlierResult(None if np.isnan(threshold) else float(threshold), self.masks[index], decision)


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
    """The norm separating a high mode from the bulk, or None if there is none (see the module doc)."""
    return decide_threshold(norms).threshold


def decide_threshold(norms: np.ndarray) -> ThresholdDecision:
    """``auto`` on any set of norms (one image's grid, or several pooled), with its reasons."""
    values = np.asarray(norms, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    dropped = values.size - finite.size
    log_norms = np.log(np.maximum(np.sort(finite)[::-1], 1e-30))  # [n], decreasing
    if log_norms.size < 4 or log_norms[0] - log_norms[-1] < 1e-9:
        what = "fewer than 4 finite norms" if log_norms.size < 4 else "all norms are equal"
        return _no_split(f"no separate high mode: {what}", dropped)
    if log_norms.size < MIN_TAIL_TOKENS:
        return _tiny_split(log_norms, dropped)
    return _tail_split(log_norms, dropped)


def effective_tests(count: int) -> float:
    """How many independent splits the scan over ``k`` is worth (Bonferroni factor), for ``count`` norms."""
    return max(1.0, math.log2(count))


def _tail_size(count: int) -> int:
    """``M``: bulk tokens whose spacings estimate the bulk's tail scale."""
    return min(max(round(TAIL_FACTOR * math.sqrt(count)), 4), 200)


def _tail_split(log_norms: np.ndarray, dropped: int) -> ThresholdDecision:
    """The decision of the tail rule (module doc, steps 2-3) for one set of decreasing, finite log norms."""
    count = log_norms.size
    needed = ALPHA / effective_tests(count)
    splits = _significance(log_norms[None])
    if not splits.k.size:  # no visible split: report the widest gap of the top half
        gaps = log_norms[:count // 2] - log_norms[1:count // 2 + 1]
        widest = int(np.argmax(gaps)) + 1
        bulk_median = float(_bulk_medians(log_norms[None], 0, widest))
        return _tail_decision(log_norms, widest, None, needed, False, bulk_median, dropped)
    passed = splits.p_values < needed
    best = int(np.argmax(np.where(passed, splits.gaps, -np.inf))) if passed.any() else int(np.argmin(splits.p_values))
    return _tail_decision(log_norms, int(splits.k[best]), float(splits.p_values[best]), needed, True,
                          float(splits.bulk_median[best]), dropped)


@dataclass(frozen=True)
class _Splits:
    """The splits that are visible modes, of many rows of decreasing log norms, with their tail p-values."""

    rows: np.ndarray  # [split] the row each split belongs to
    k: np.ndarray  # [split] tokens above the split
    gaps: np.ndarray  # [split] log gap below the k-th largest
    bulk_median: np.ndarray  # [split] median log norm below the split
    p_values: np.ndarray  # [split] bulk-tail p-value (module doc, step 2)


def _significance(log_norms: np.ndarray) -> _Splits:
    """Steps 2-3 of the module doc for every row at once.  # log_norms: [row, value], decreasing, finite"""
    count = log_norms.shape[1]
    tail = _tail_size(count)
    size = min(count // 2, count - tail - 1)  # candidates k = 1..size
    all_gaps = log_norms[:, :size] - log_norms[:, 1:size + 1]  # [row, K], gap below the k-th largest
    rows, k = np.nonzero(all_gaps >= math.log(MIN_GAP_RATIO))  # wide enough to be seen
    k = k + 1
    bulk_median = _bulk_medians(log_norms, rows, k)
    visible = log_norms[rows, k - 1] - bulk_median >= math.log(MIN_MEDIAN_RATIO)
    rows, k, bulk_median = rows[visible], k[visible], bulk_median[visible]
    gaps = all_gaps[rows, k - 1]
    ranks = k[:, None] + np.arange(1, tail + 1)  # [split, M]
    spacings = ranks * (log_norms[rows[:, None], ranks - 1] - log_norms[rows[:, None], ranks])  # D_i=i(y_i-y_(i+1))
    scale = np.maximum(spacings.mean(axis=1), MIN_TAIL_SCALE)  # mu_k: Hill estimate of the tail scale
    sums = log_norms[:, :count // 2 + 1].cumsum(axis=1)
    height = (sums[rows, k - 1] / k - log_norms[rows, k]) / scale  # H_k / mu_k ~ F(2k, 2M)
    gap = k * gaps / scale  # D_k / mu_k ~ F(2, 2M)
    p_values = 2 * np.minimum(betainc(tail, k, tail / (tail + k * height)), (1 + gap / tail) ** -tail)
    return _Splits(rows, k, gaps, bulk_median, p_values)


def auto_thresholds(norms: np.ndarray) -> np.ndarray:
    """``auto_threshold`` of every row at once (a sweep's every layer of every image), NaN for no high mode.

    Rows of finite norms with enough tokens for the tail rule share one pass of array operations;
    any other row (non-finite norms, tiny grids, all norms equal) goes through ``decide_threshold``.

    Args:
        norms: Sets of norms of one size.  # [row, value]

    Returns:
        Thresholds.  # [row]
    """
    values = np.asarray(norms, dtype=np.float64)
    thresholds = np.full(values.shape[0], math.nan)
    log_norms = np.log(np.maximum(np.sort(values, axis=1)[:, ::-1], 1e-30))  # [row, value], decreasing
    batched = np.isfinite(values).all(axis=1) & (values.shape[1] >= MIN_TAIL_TOKENS)
    if values.shape[1]:
        batched &= log_norms[:, 0] - log_norms[:, -1] >= 1e-9
    for row in np.flatnonzero(~batched):
        threshold = decide_threshold(values[row]).threshold
        thresholds[row] = math.nan if threshold is None else threshold
    rows = np.flatnonzero(batched)
    if rows.size:
        thresholds[rows] = _tail_thresholds(log_norms[rows])
    return thresholds


def _tail_thresholds(log_norms: np.ndarray) -> np.ndarray:
    """``_tail_split``'s threshold for each row.  # [row, value] -> [row]"""
    splits = _significance(log_norms)
    passed = splits.p_values < ALPHA / effective_tests(log_norms.shape[1])
    score = np.where(passed, splits.gaps, -np.inf)
    thresholds = np.full(log_norms.shape[0], math.nan)
    for row in np.unique(splits.rows[passed]):  # the widest gap among the row's significant splits
        candidates = np.flatnonzero(splits.rows == row)
        best = int(splits.k[candidates[np.argmax(score[candidates])]])
        thresholds[row] = math.sqrt(math.exp(log_norms[row, best]) * math.exp(log_norms[row, best - 1]))
    return thresholds


def _bulk_medians(log_norms: np.ndarray, rows: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
    """Median of ``log_norms[row, k:]`` for each (row, k).  # log_norms: [row, value], decreasing"""
    remaining = log_norms.shape[1] - k  # bulk sizes
    return (log_norms[rows, k + (remaining - 1) // 2] + log_norms[rows, k + remaining // 2]) / 2


def _tail_decision(log_norms: np.ndarray, k: int, p_value: float | None, needed: float, visible: bool,
                   bulk_median: float, dropped: int) -> ThresholdDecision:
    low, high = math.exp(log_norms[k]), math.exp(log_norms[k - 1])
    accepted = visible and p_value < needed
    gap, above = f"gap {high / low:.2f}x between {low:.4g} and {high:.4g}", f"{k} token{'s' * (k > 1)} above"
    test = f"bulk-tail p-value {p_value:.1g} (needs < {needed:.1g})" if visible else ""
    if accepted:
        reason = f"{gap}, {above} at {high / math.exp(bulk_median):.1f}x the bulk median; {test}"
    elif not visible:
        reason = (f"no separate high mode: the widest {gap} ({above}) is not a visible mode (needs a "
                  f"{MIN_GAP_RATIO:g}x gap and {MIN_MEDIAN_RATIO:g}x the bulk median; has "
                  f"{high / math.exp(bulk_median):.2f}x the median)")
    else:
        reason = f"no separate high mode: {gap}, {above}; the bulk's own tail explains them: {test}"
    return ThresholdDecision(math.sqrt(low * high) if accepted else None, low, high, k, "tail p-value", p_value,
                             needed, accepted, dropped, reason)


def _tiny_split(log_norms: np.ndarray, dropped: int) -> ThresholdDecision:
    """Few tokens: the widest log gap among the top half, accepted when at least ``TINY_GAP_RATIO``."""
    half = log_norms.size // 2
    gaps = log_norms[:half] - log_norms[1:half + 1]  # gap below each of the top half
    k = int(np.argmax(gaps)) + 1
    low, high = math.exp(log_norms[k]), math.exp(log_norms[k - 1])
    accepted = high / low >= TINY_GAP_RATIO
    split = f"gap {high / low:.2f}x between {low:.4g} and {high:.4g}; {k} token{'s' * (k > 1)} above"
    rule = f"{log_norms.size} tokens are too few to fit a tail: the gap must be at least {TINY_GAP_RATIO:g}x"
    reason = f"{split} ({rule})" if accepted else f"no separate high mode: {split} ({rule})"
    return ThresholdDecision(math.sqrt(low * high) if accepted else None, low, high, k, "gap ratio", high / low,
                             TINY_GAP_RATIO, accepted, dropped, reason)


def _no_split(reason: str, dropped: int) -> ThresholdDecision:
    return ThresholdDecision(None, None, None, 0, "none", None, None, False, dropped, reason)


def fixed_decision(threshold: float, norms: np.ndarray) -> ThresholdDecision:
    """The record of a threshold the user fixed."""
    dropped = int((~np.isfinite(norms)).sum())
    return ThresholdDecision(threshold, None, None, int((norms > threshold).sum()), "fixed", None, None, True, dropped,
                             f"fixed threshold {threshold:g} (not auto)")


def find_outliers(patch_norms: np.ndarray, threshold: float | None = None) -> OutlierResult:
    """Outliers among patch-token norms on the grid.

    Args:
        patch_norms: One layer's patch-token norms.  # [row, col]
        threshold: A fixed norm, or None for ``auto``.
    """
    decision = fixed_decision(threshold, patch_norms) if threshold is not None else decide_threshold(patch_norms)
    cut = decision.threshold
    mask = patch_norms > cut if cut is not None else np.zeros(patch_norms.shape, dtype=bool)  # NaN > cut is False
    return OutlierResult(cut, mask, decision)


def layer_outliers(trace: Trace, threshold: float | None = None) -> LayerOutliers:
    """Outliers of every layer (norms before the final norm); ``threshold`` None means ``auto``."""
    grids = trace.patch_norms()  # [layer, row, col]
    results = [find_outliers(grid, threshold) for grid in grids]
    finite = np.where(np.isfinite(grids), grids, np.nan)
    return LayerOutliers(
        thresholds=np.array([np.nan if r.threshold is None else r.threshold for r in results], dtype=np.float32),
        masks=np.stack([r.mask for r in results]),
        norm_median=_nan_reduce(np.nanmedian, finite),
        norm_max=_nan_reduce(np.nanmax, finite),
        decisions=tuple(r.decision for r in results),
    )


def _nan_reduce(reduce, grids: np.ndarray) -> np.ndarray:
    """``reduce`` over each layer's finite norms; NaN for a layer with none.  # [layer]"""
    flat = grids.reshape(grids.shape[0], -1)
    has = np.isfinite(flat).any(axis=1)
    out = np.full(flat.shape[0], np.nan, dtype=np.float32)
    if has.any():
        out[has] = reduce(flat[has], axis=1)
    return out
