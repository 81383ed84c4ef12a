"""``auto`` on the calibration families (fixed seeds), non-finite norms, pooled images, tiny and
non-square grids, the issue's concrete cases and the synthetic demo at 518 px."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from vitlens import calibrate
from vitlens.analysis.outliers import auto_threshold, decide_threshold, find_outliers, layer_outliers
from vitlens.calibrate import BULK, FAMILIES, OUTLIER
from vitlens.capture import capture
from vitlens.models import load_model
from vitlens.synthetic import demo_cells, demo_layer

FAMILY = {family.name: family for family in FAMILIES}


def _draw(name: str, grid: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    return FAMILY[name].sample(np.random.default_rng(seed), grid[0] * grid[1])


@pytest.mark.parametrize("name,grid", [
    ("uniform_bulk", (16, 16)), ("uniform_bulk", (74, 74)), ("lognormal_5_10x", (37, 37)),
    ("lognormal_5_10x", (24, 40)), ("sparse_mode", (37, 37)), ("sparse_mode", (74, 74)),
    ("sparse_mode_between", (74, 74)), ("quarter_to_half", (2, 2)), ("quarter_to_half", (4, 4)),
    ("quarter_to_half", (8, 8)), ("pooled_lognormal_5_10x", (16, 16)),
])
@pytest.mark.parametrize("seed", range(4))
def test_planted_high_modes_are_found_whole_and_alone(name, grid, seed):
    norms, labels = _draw(name, grid, seed)
    threshold = auto_threshold(norms)
    assert threshold is not None, decide_threshold(norms).reason
    assert (norms[labels == OUTLIER] > threshold).all(), decide_threshold(norms).reason
    assert not (norms[labels == BULK] > threshold).any(), decide_threshold(norms).reason


@pytest.mark.parametrize("name", ["normal", "lognormal", "gamma", "pooled_lognormal"])
@pytest.mark.parametrize("grid", [(16, 16), (37, 37), (20, 31)])
@pytest.mark.parametrize("seed", range(3))
def test_unimodal_bulks_have_no_outliers(name, grid, seed):
    norms, _ = _draw(name, grid, seed)
    decision = decide_threshold(norms)
    assert decision.threshold is None and not decision.accepted, decision.reason
    assert decision.reason.startswith("no separate high mode")


@pytest.mark.parametrize("name", ["pareto3", "abs_t3"])
@pytest.mark.parametrize("grid", [(16, 16), (37, 37)])
def test_heavy_tailed_bulks_rarely_have_outliers(name, grid):
    """The target is at most 5% of draws on Pareto 3 and |t3| (about 1% measured); 100 fixed draws allow 5."""
    flagged = [seed for seed in range(100) if auto_threshold(_draw(name, grid, seed)[0]) is not None]
    assert len(flagged) <= 5, flagged


def test_the_issue_case_thirteen_high_tokens_and_two_in_between():
    """13 tokens at 7x the median plus two at 45 and 60 over a median of 14 (the demo at 518 px): found."""
    rng = np.random.default_rng(0)
    bulk = 14.0 * rng.lognormal(0.0, 0.12, 1369 - 15)
    high = 14.0 * 7.0 * rng.uniform(0.95, 1.05, 13)
    norms = np.concatenate([bulk, high, [45.0, 60.0]])
    decision = decide_threshold(norms)
    assert decision.accepted, decision.reason
    assert bulk.max() < decision.threshold < 60.0
    assert decision.count_above in (14, 15)


def test_the_issue_case_pooled_mode_over_a_bulk_ending_at_27():
    """Several images pooled: a clear mode at 57-100 over a bulk ending at 27."""
    rng = np.random.default_rng(1)
    bulks = [np.clip(scale * rng.lognormal(0.0, 0.25, 256 - 5), None, 27.0) for scale in (9.0, 11.0, 13.0, 15.0)]
    modes = [rng.uniform(57.0, 100.0, 5) for _ in bulks]
    norms = np.concatenate(bulks + modes)
    threshold = auto_threshold(norms)
    assert threshold is not None and 27.0 < threshold < 57.0


def test_non_finite_norms_are_dropped_counted_and_never_flagged():
    rng = np.random.default_rng(2)
    grid = rng.lognormal(np.log(20.0), 0.2, (16, 16))
    grid[3, 4] = grid[9, 9] = 200.0  # real outliers
    grid[0, 0], grid[5, 5] = np.nan, np.inf
    result = find_outliers(grid)
    assert result.threshold is not None and math.isfinite(result.threshold)
    assert result.decision.dropped == 2
    assert result.mask[3, 4] and result.mask[9, 9] and not result.mask[0, 0]
    assert "no separate" not in result.decision.reason


def test_all_nan_norms_give_no_threshold():
    decision = decide_threshold(np.full((4, 4), np.nan))
    assert decision.threshold is None and decision.dropped == 16
    assert not find_outliers(np.full((4, 4), np.nan)).mask.any()


def test_layer_outliers_with_a_nan_cell(planted, pixels):
    trace = capture(planted.loaded, pixels(planted.loaded, seed=1))[0]
    norms = trace.norms.copy()
    norms[:, -1] = np.nan  # the last patch token of every layer
    broken = layer_outliers(dataclasses.replace(trace, norms=norms))
    expected = planted.mask()
    expected[-1, -1] = False
    assert np.array_equal(broken.masks[-1], expected)
    assert np.isfinite(broken.norm_median).all() and np.isfinite(broken.thresholds[planted.layer:]).all()
    assert all(decision.dropped == 1 for decision in broken.decisions)


@pytest.mark.parametrize("grid,high", [((2, 2), 1), ((2, 2), 2), ((3, 3), 2), ((3, 3), 4)])
def test_tiny_grids(grid, high):
    rng = np.random.default_rng(high)
    norms = rng.lognormal(np.log(10.0), 0.1, grid[0] * grid[1])
    norms[:high] *= 8.0
    result = find_outliers(norms.reshape(grid))
    assert result.count == high, result.decision.reason
    assert result.decision.measure == "gap ratio"
    assert auto_threshold(rng.lognormal(np.log(10.0), 0.1, grid[0] * grid[1])) is None


def test_a_decision_says_what_it_tested():
    rng = np.random.default_rng(3)
    norms = np.concatenate([rng.lognormal(np.log(14.0), 0.15, 1000), [150.0, 160.0, 170.0]])
    decision = decide_threshold(norms)
    assert decision.accepted and decision.measure == "tail p-value" and decision.value < decision.needed
    assert decision.split_low < decision.threshold < decision.split_high == pytest.approx(150.0)
    assert decision.reason.startswith(f"gap {150.0 / decision.split_low:.2f}x between")
    assert decision.to_dict()["count_above"] == 3
    fixed = find_outliers(norms.reshape(1, -1), threshold=100.0).decision
    assert fixed.measure == "fixed" and fixed.count_above == 3


def test_the_synthetic_demo_at_518_px_finds_its_planted_cells():
    loaded = load_model("vit_small_patch14_dinov2", "synthetic", model_args=dict(depth=6, embed_dim=64, num_heads=4))
    pixels = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    found = layer_outliers(capture(loaded, pixels)[0])
    layer = demo_layer(6)
    assert found.counts[:layer].sum() == 0
    cells = np.array(demo_cells((37, 37)))
    for block in range(layer, 6):
        flagged = np.argwhere(found.masks[block])
        assert len(flagged) >= len(cells), found.decisions[block].reason
        distance = np.abs(flagged[:, None, :] - cells[None, :, :]).max(axis=2).min(axis=1)  # to the nearest planted cell
        assert (distance <= 2).all(), flagged


def test_calibration_runs_and_prints_its_table(capsys):
    cell = calibrate.run_cell(FAMILY["uniform_bulk"], (16, 16), draws=5, seed=0)
    assert cell.found == 1.0 and cell.recovered == 1.0 and cell.bulk_flagged == 0.0 and cell.passed
    assert calibrate.main(["--draws", "5", "--families", "normal", "uniform_bulk", "--grids", "16x16"]) == 0
    out = capsys.readouterr().out
    assert "| normal | 16x16 | 5 | 0.0% |" in out and "| uniform_bulk | 16x16 | 5 | 100.0% | 100.0% | 0.0% | 0.000% | yes |" in out


def test_a_detector_that_flags_everything_fails_the_calibration():
    cell = calibrate.run_cell(FAMILY["normal"], (16, 16), draws=5, seed=0, detector=lambda norms: 0.0)
    assert cell.found == 1.0 and not cell.passed


@pytest.mark.slow
@pytest.mark.parametrize("grid", [(37, 37), (74, 74)])
def test_calibration_benchmark(grid):
    """A reduced docs/outliers.md table (100 draws a cell): the targets it reports as met, and the
    small share of draws where an extreme bulk token (a lognormal bulk's z > 4 tail) is flagged too."""
    for family in FAMILIES:
        if family.name in ("quarter_to_half", "sparse_mode_between"):
            continue  # small grids only / below target (see docs/outliers.md)
        cell = calibrate.run_cell(family, grid, draws=100, seed=1)
        if family.positive:
            assert cell.found >= 0.99 and cell.recovered >= 0.99 and cell.bulk_flagged <= 0.03, cell
        else:
            assert cell.passed, cell


def test_detector_is_fast_at_74x74():
    import time

    norms, _ = _draw("uniform_bulk", (74, 74), 0)
    start = time.perf_counter()
    for _ in range(20):
        auto_threshold(norms)
    assert (time.perf_counter() - start) / 20 < 0.02  # about 1-3 ms; generous for a shared CI machine
