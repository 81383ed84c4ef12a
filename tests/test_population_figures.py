"""Population figures (app/population_figures.py) without streamlit: values, the first checkpoint, panels."""
import sys

import numpy as np
import pytest

from app_fixtures import APP
from population_fixtures import TRAIN_EMERGES, TRAIN_LAYER, TRAIN_STEPS, results_rows, training_results, write_results

sys.path.insert(0, str(APP))
import population_figures as pf  # noqa: E402
from vitlens.analysis.population import (LIST_COLUMNS, dataset_summary, model_profiles, read_results,  # noqa: E402
                                         series_of, training_series)


def _training(tmp_path):
    return training_series(read_results(training_results(tmp_path / "run")), "tiny_model")


def test_training_heatmap_shows_shares_and_outlines_the_first_checkpoint(tmp_path):
    series = _training(tmp_path)
    fig = pf.training_heatmap(series)
    heat, cells = fig.data
    assert list(heat.y) == [f"step {s}" for s in TRAIN_STEPS] and np.allclose(np.array(heat.z), series.share * 100)
    first = TRAIN_STEPS.index(TRAIN_EMERGES)
    [box] = fig.layout.shapes
    assert (box.y0, box.y1) == (first - 0.5, first + 0.5)
    assert f"layer {TRAIN_LAYER}" in fig.layout.annotations[0].text
    assert len(cells.x) == len(TRAIN_STEPS) * 6 and (cells.x[6 * first + 4], cells.y[6 * first + 4]) == (4, f"step {TRAIN_EMERGES}")


def test_training_lines_draw_chosen_layers_against_step_with_the_first_step_marked(tmp_path):
    series = _training(tmp_path)
    fig = pf.training_lines(series, [1, TRAIN_LAYER])
    shares = [t for t in fig.data if t.legendgroup and ":" not in t.name]
    assert [t.name for t in shares] == ["layer 1", f"layer {TRAIN_LAYER}"] and list(shares[0].x) == list(TRAIN_STEPS)
    assert max(shares[0].y) == 0 and max(shares[1].y) > 0
    assert [s.x0 for s in fig.layout.shapes] == [TRAIN_EMERGES, TRAIN_EMERGES]
    assert fig.layout.yaxis2.type == "log"


def test_depth_figure_puts_models_with_registers_on_the_right(tmp_path):
    plain = results_rows("vit_s", "hub", None, ["x.png"], 4, (2, 2), lambda s, i, layer: [1] if layer > 1 else [])
    reg = results_rows("vit_s_reg4", "hub", None, ["x.png"], 4, (2, 2), lambda s, i, layer: [], num_registers=4)
    fig = pf.depth_figure(model_profiles(read_results(write_results(tmp_path / "r", [plain, reg]))))
    sides = {t.name.split(" ")[0]: t.xaxis for t in fig.data}
    assert sides == {"vit_s": "x", "vit_s_reg4": "x2"}
    assert [a.text for a in fig.layout.annotations] == ["without registers", "with registers"]  # both kinds: no note
    assert list(fig.data[0].y) == [0, 0, 25, 25]


def test_dataset_figures_use_log_bins_and_one_grid_map_per_folder(tmp_path):
    frame = read_results(training_results(tmp_path / "run"), LIST_COLUMNS)
    summary = dataset_summary(frame, series_of(frame)[-1], [TRAIN_LAYER])
    hist = pf.norm_counts_figure([("run", summary.norms)])
    assert sum(hist.data[0].y) == summary.norms.total and hist.layout.shapes[0].x0 == pytest.approx(np.log10(50))
    assert list(hist.layout.xaxis.ticktext) == ["1", "10", "100", "1000"]  # norms near 10 and 100 (its bin ends at 10^2.05)
    maps = pf.cell_frequency_figure([("a", summary.cells), ("b", summary.cells)])
    assert len(maps.data) == 2 and np.array(maps.data[0].z).shape == (4, 6) and np.array(maps.data[0].z).max() == 100
    share = pf.layer_share_figure([("run", summary.share)])
    assert list(share.data[0].y[:TRAIN_LAYER]) == [0] * TRAIN_LAYER
