"""``auto`` thresholds of many sets of norms at once (a sweep's every layer of every image of a batch).

``auto_thresholds`` gives, for each row, exactly the threshold ``outliers.decide_threshold`` gives
(the same statistics, the same float operations in the same order), without its per-row Python
cost or its reasons: rows of finite norms with enough tokens for the tail rule run as a few
array operations over all rows together; any other row (non-finite norms, tiny grids, all norms
equal) goes through ``decide_threshold`` itself. ``tests/test_outliers_batch.py`` checks the two
agree on every row; a change of the rule in ``outliers`` must be made here too.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import betainc

from .outliers import (ALPHA, MIN_GAP_RATIO, MIN_MEDIAN_RATIO, MIN_TAIL_SCALE, MIN_TAIL_TOKENS, _tail_size,
                       decide_threshold, effective_tests)


def auto_thresholds(norms: np.ndarray) -> np.ndarray:
    """``decide_threshold(row).threshold`` of every row, NaN where there is no high mode.

    Args:
        norms: Sets of norms of one size, e.g. patch-token norms of every (image, layer).  # [row, value]

    Returns:
        Thresholds.  # [row]
    """
    values = np.asarray(norms, dtype=np.float64)
    thresholds = np.full(values.shape[0], math.nan)
    log_norms = np.log(np.maximum(np.sort(values, axis=1)[:, ::-1], 1e-30))  # [row, value], decreasing
    batched = np.isfinite(values).all(axis=1) & (values.shape[1] >= MIN_TAIL_TOKENS)
    if values.shape[1]:
        batched &= log_norms[:, 0] - log_norms[:, -1] >= 1e-9
    for row in np.flatnonzero(~batched):  # the per-row rule's special cases
        threshold = decide_threshold(values[row]).threshold
        thresholds[row] = math.nan if threshold is None else threshold
    rows = np.flatnonzero(batched)
    if rows.size:
        thresholds[rows] = _tail_thresholds(log_norms[rows])
    return thresholds


def _tail_thresholds(log_norms: np.ndarray) -> np.ndarray:
    """``outliers._tail_split``'s threshold for each row of decreasing, finite log norms.  # [row, value] -> [row]"""
    count = log_norms.shape[1]
    tail = _tail_size(count)
    size = min(count // 2, count - tail - 1)
    gaps = log_norms[:, :size] - log_norms[:, 1:size + 1]  # [row, K]
    rows, k = np.nonzero(gaps >= math.log(MIN_GAP_RATIO))  # candidate splits, by row then k
    k = k + 1
    remaining = count - k
    bulk_median = (log_norms[rows, k + (remaining - 1) // 2] + log_norms[rows, k + remaining // 2]) / 2
    visible = log_norms[rows, k - 1] - bulk_median >= math.log(MIN_MEDIAN_RATIO)
    rows, k, gaps = rows[visible], k[visible], gaps[rows[visible], k[visible] - 1]  # [P] splits that are visible modes
    thresholds = np.full(log_norms.shape[0], math.nan)
    if not rows.size:
        return thresholds
    ranks = k[:, None] + np.arange(1, tail + 1)  # [P, M]
    spacings = ranks * (log_norms[rows[:, None], ranks - 1] - log_norms[rows[:, None], ranks])
    scale = np.maximum(spacings.mean(axis=1), MIN_TAIL_SCALE)
    sums = log_norms[:, :count // 2 + 1].cumsum(axis=1)
    height = (sums[rows, k - 1] / k - log_norms[rows, k]) / scale
    gap = k * gaps / scale
    p_values = 2 * np.minimum(betainc(tail, k, tail / (tail + k * height)), (1 + gap / tail) ** -tail)
    passed = p_values < ALPHA / effective_tests(count)
    score = np.where(passed, gaps, -np.inf)
    for row in np.unique(rows[passed]):  # the widest gap among the row's significant splits (first on ties)
        splits = np.flatnonzero(rows == row)
        best = int(k[splits[np.argmax(score[splits])]])
        low, high = math.exp(log_norms[row, best]), math.exp(log_norms[row, best - 1])
        thresholds[row] = math.sqrt(low * high)
    return thresholds
