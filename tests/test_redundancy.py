"""Neighbour redundancy of outlier vs normal cells on synthetic maps with a known answer."""
from __future__ import annotations

import numpy as np
import pytest

from vitlens.analysis.redundancy import auroc, redundancy


def test_outliers_on_the_most_redundant_cells_separate_perfectly():
    rng = np.random.default_rng(0)
    similarities = [rng.uniform(0.0, 0.5, size=(6, 7)) for _ in range(3)]
    masks = [np.zeros((6, 7), dtype=bool) for _ in range(3)]
    for similarity, mask, cell in zip(similarities, masks, [(0, 0), (5, 6), (2, 3)]):
        similarity[cell] = 0.9
        mask[cell] = True
    result = redundancy(similarities, masks)
    assert result.auroc == 1.0
    assert result.outlier.tolist() == [0.9, 0.9, 0.9] and result.normal.size == 3 * 42 - 3
    assert result.summary()["num_outlier"] == 3 and result.num_images == 3


def test_outliers_placed_at_random_do_not_separate():
    rng = np.random.default_rng(1)
    similarities = [rng.uniform(size=(16, 16)) for _ in range(40)]
    masks = [rng.uniform(size=(16, 16)) < 0.05 for _ in range(40)]
    assert redundancy(similarities, masks).auroc == pytest.approx(0.5, abs=0.05)


def test_no_outliers_gives_no_auroc():
    result = redundancy([np.ones((2, 2))], [np.zeros((2, 2), dtype=bool)])
    assert result.auroc is None and result.summary()["outlier_mean"] is None


def test_auroc_counts_ordered_pairs():
    assert auroc(np.array([0.2, 0.8]), np.array([0.5])) == 0.5


def test_shapes_must_match():
    with pytest.raises(ValueError):
        redundancy([np.ones((2, 2))], [np.zeros((2, 3), dtype=bool)])
