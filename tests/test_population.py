"""Population analyses over sweep results folders written by the test (known shares, emergence, grid maps)."""
import numpy as np
import pytest

from population_fixtures import (TRAIN_CELLS, TRAIN_EMERGES, TRAIN_IMAGES, TRAIN_LAYER, TRAIN_STEPS, results_rows,
                                 training_results, write_results)
from vitlens.analysis.population import (LIST_COLUMNS, dataset_summary, model_profiles, outlier_frequency, read_results, series_of,
                                         training_series)
from vitlens.errors import ResultsError


def test_training_series_finds_the_emergence_step_and_layer_and_nothing_before(tmp_path):
    frame = read_results(training_results(tmp_path / "run"))
    series = training_series(frame, "tiny_model")
    assert series.steps == list(TRAIN_STEPS)
    assert series.steps[series.first_checkpoint] == TRAIN_EMERGES and series.first_layer == TRAIN_LAYER
    emerged = TRAIN_STEPS.index(TRAIN_EMERGES)
    assert np.all(series.share[:emerged] == 0) and np.all(series.share[emerged:, :TRAIN_LAYER] == 0)
    planted = (2 + 1 + 2) / (3 * 24)  # two cells in a.png and sub/c.png, one in b.png, of 3 x 24 patches
    assert np.allclose(series.share[emerged:, TRAIN_LAYER:], planted)
    assert np.all(series.norm_max[emerged:, TRAIN_LAYER:] == 100) and np.all(series.norm_max[:emerged] < 12)
    assert np.all((series.norm_median > 9) & (series.norm_median < 11))


def test_series_are_ordered_by_step_whatever_the_file_order(tmp_path):
    cells = lambda step, image, layer: []  # noqa: E731
    tables = [results_rows("m", f"ckpt_{step}.pth", step, ["x.png"], 2, (2, 2), cells) for step in (300, 20, 1000)]
    tables.append(results_rows("m", "hub", None, ["x.png"], 2, (2, 2), cells))
    frame = read_results(write_results(tmp_path / "r", tables))
    assert [s.step for s in series_of(frame)] == [20, 300, 1000, None]
    assert [s.label for s in series_of(frame)] == ["step 20", "step 300", "step 1000", "hub"]
    assert training_series(frame, "m").first_checkpoint is None


def test_model_profiles_use_relative_depth_and_the_last_checkpoint(tmp_path):
    small = results_rows("small", "hub", None, ["x.png"], 4, (2, 2), lambda s, i, layer: [0] if layer >= 2 else [])
    large = results_rows("large_reg4", "hub", None, ["x.png"], 8, (2, 2), lambda s, i, layer: [], num_registers=4)
    frame = read_results(write_results(tmp_path / "r", [small, large]))
    profiles = {p.series.model: p for p in model_profiles(frame)}
    assert np.allclose(profiles["small"].depth, [0.25, 0.5, 0.75, 1.0]) and profiles["large_reg4"].depth.size == 8
    assert np.allclose(profiles["small"].share, [0, 0, 0.25, 0.25]) and profiles["small"].max_share == 0.25
    assert profiles["large_reg4"].max_share == 0 and profiles["large_reg4"].series.num_registers == 4
    trained = read_results(training_results(tmp_path / "run"))
    [profile] = model_profiles(trained)
    assert profile.series.step == TRAIN_STEPS[-1]


def test_dataset_summary_pools_histograms_grid_maps_and_ranks_images(tmp_path):
    frame = read_results(training_results(tmp_path / "run"), LIST_COLUMNS)
    last = series_of(frame)[-1]
    summary = dataset_summary(frame, last, [TRAIN_LAYER, TRAIN_LAYER + 1], count=2)
    assert summary.norms.total == 3 * 2 * 24  # every patch token of 3 images x 2 layers
    outliers = summary.norms.counts[summary.norms.edges[:-1] >= 50].sum()
    assert outliers == 2 * (2 + 1 + 2) and summary.norms.threshold == 50.0
    frequency = summary.cells.frequency
    assert frequency.shape == (4, 6) and frequency.ravel()[TRAIN_CELLS[0]] == 1.0
    assert frequency.ravel()[TRAIN_CELLS[1]] == pytest.approx(2 / 3) and frequency.sum() == pytest.approx(5 / 3)
    assert [t.image for t in summary.top] == ["a.png", "sub/c.png"] and summary.top[0].num_outliers == 4
    assert summary.overall_share == pytest.approx(10 / 144)
    assert summary.share[:TRAIN_LAYER].sum() == 0 and set(TRAIN_IMAGES) >= {t.image for t in summary.top}


def test_grid_map_counts_only_the_most_common_grid(tmp_path):
    wide = results_rows("m", "hub", None, ["w1.png", "w2.png"], 1, (2, 3), lambda s, i, layer: [5])
    tall = results_rows("m", "hub", None, ["t.png"], 1, (3, 2), lambda s, i, layer: [0])
    frame = read_results(write_results(tmp_path / "r", [wide, tall]), LIST_COLUMNS)
    cells = outlier_frequency(frame, series_of(frame)[0], [0])
    assert cells.frequency.shape == (2, 3) and cells.frequency[1, 2] == 1.0 and cells.frequency.sum() == 1.0
    assert (cells.rows_used, cells.rows_skipped) == (2, 1)


def test_a_folder_that_is_not_sweep_results_is_one_clear_error(tmp_path):
    with pytest.raises(ResultsError, match="no sweep results"):
        read_results(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"model": ["m"]}), str(tmp_path / "x.parquet"))
    with pytest.raises(ResultsError, match="no column weights"):
        read_results(tmp_path)
