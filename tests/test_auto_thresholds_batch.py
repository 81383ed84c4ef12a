"""``auto_thresholds`` gives every row exactly ``decide_threshold``'s threshold (the same floats, not close ones)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vitlens.analysis.outliers import auto_thresholds, decide_threshold
from vitlens.calibrate import FAMILIES, MAIN_GRIDS, SMALL_GRIDS


def _expected(rows: np.ndarray) -> np.ndarray:
    return np.array([math.nan if (t := decide_threshold(row).threshold) is None else t for row in rows])


@pytest.mark.parametrize("grid", [*MAIN_GRIDS[:3], *SMALL_GRIDS[-2:]], ids=str)
def test_every_calibration_family_gets_the_per_row_threshold_exactly(grid: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(grid))
    count = grid[0] * grid[1]
    draws = [family.sample(rng, count)[0] for family in FAMILIES for _ in range(6)]
    rows = np.stack([draw for draw in draws if draw.size == count]).astype(np.float32)  # pooled draws may differ in size
    assert len(rows) >= len(draws) - 12
    expected = _expected(rows)
    found = auto_thresholds(rows)
    assert np.array_equal(found, expected, equal_nan=True)
    if count >= 256:
        assert np.isfinite(expected).sum() >= 20 and np.isnan(expected).sum() >= 20  # both outcomes are exercised


def test_special_rows_take_the_per_row_rule() -> None:
    rng = np.random.default_rng(1)
    rows = rng.lognormal(3, 0.2, size=(5, 64)).astype(np.float32)
    rows[0, :3] = 400  # a clear high mode
    rows[1, 5] = np.nan
    rows[1, :3] = 400
    rows[2, 7] = np.inf
    rows[3] = 10.0  # all equal
    rows[4, :60] = np.nan  # four finite norms left
    expected = _expected(rows)
    assert np.array_equal(auto_thresholds(rows), expected, equal_nan=True)
    assert np.isfinite(expected[:2]).all() and np.isnan(expected[3])
