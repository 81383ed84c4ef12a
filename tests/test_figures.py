"""Figure builders (app/figures.py): shapes, axis ranges, outlines at the right cells, labels."""
import sys

import numpy as np
import plotly.graph_objects as go
import pytest

from app_fixtures import APP, synthetic_trace

sys.path.insert(0, str(APP))
import figures  # noqa: E402
from figures import EmergenceCurve, NormHistogram, Overlay, Table  # noqa: E402
from vitlens.analysis.attention import cls_outlier_attention  # noqa: E402
from vitlens.analysis.embedding import token_embedding  # noqa: E402
from vitlens.analysis.outliers import layer_outliers  # noqa: E402

CELLS = [(0, 1), (2, 3), (1, 0)]


def _mask(shape=(3, 4), cells=CELLS) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for row, col in cells:
        mask[row, col] = True
    return mask


def _outlined_cells(trace) -> set[tuple[int, int]]:
    """Centres of the closed squares of an outline trace, as (row, col)."""
    xs, ys = list(trace.x), list(trace.y)
    cells = set()
    for start in range(0, len(xs), 6):
        square_x, square_y = xs[start:start + 5], ys[start:start + 5]
        assert xs[start + 5] is None and square_x[0] == square_x[-1] and square_y[0] == square_y[-1]
        assert max(square_x) - min(square_x) == 1 and max(square_y) - min(square_y) == 1
        cells.add((int(np.mean(square_y[:4])), int(np.mean(square_x[:4]))))
    return cells


def _trace_named(fig, name):
    return [t for t in fig.data if t.name == name]


def test_overlay_outlines_exactly_the_outlier_cells():
    values = np.arange(12, dtype=float).reshape(3, 4)
    overlay = Overlay("m", values, image=figures.image_uri(_picture()), mask=_mask())
    fig = figures.overlay_figure(overlay, opacity=0.4)
    heat = fig.data[0]
    assert heat.type == "heatmap" and np.asarray(heat.z).shape == (3, 4)
    assert heat.opacity == 0.4
    assert "row %{y}, col %{x}" in heat.hovertemplate and "norm" in heat.hovertemplate
    (outline,) = _trace_named(fig, "outlier cells")
    assert _outlined_cells(outline) == set(CELLS)
    assert outline.line.color == figures.OUTLINE


def test_overlay_axes_are_cells_with_row_zero_on_top():
    fig = figures.overlay_figure(Overlay("m", np.zeros((5, 7))))
    assert list(fig.layout.xaxis.range) == [-0.5, 6.5]
    assert list(fig.layout.yaxis.range) == [4.5, -0.5]
    assert fig.layout.yaxis.scaleanchor == "x"
    assert not _trace_named(fig, "outlier cells")  # no mask, no outline


def test_overlay_background_spans_the_grid_and_colourbar_names_the_norm():
    overlay = Overlay("m", np.ones((2, 3)), image=figures.image_uri(_picture()), colorbar=figures.norm_label(True))
    fig = figures.overlay_figure(overlay)
    (background,) = fig.layout.images
    assert (background.x, background.y, background.sizex, background.sizey) == (-0.5, -0.5, 3, 2)
    assert background.source.startswith("data:image/jpeg;base64,")
    bar = [t for t in fig.data if t.type == "scatter" and t.marker.showscale]
    assert bar[0].marker.colorbar.title.text == "token norm (post-final-norm)"
    assert figures.norm_label(False) == "token norm (pre-final-norm)"


def test_image_uri_caps_the_size():
    import base64
    import io

    from PIL import Image

    uri = figures.image_uri(_picture(1000, 500), max_side=200)
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.size == (200, 100)


def test_overlay_height_follows_the_grid_and_the_colour_bar_spans_the_plot():
    square = figures.overlay_figure(Overlay("m", np.zeros((16, 16))), width=460)
    wide = figures.overlay_figure(Overlay("m", np.zeros((11, 16))), width=460)
    plot_width = 460 - square.layout.margin.l - square.layout.margin.r - figures.COLOURBAR_PX
    for fig, rows in ((square, 16), (wide, 11)):
        plot_height = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
        assert fig.layout.width == 460 and plot_height == pytest.approx(plot_width * rows / 16, abs=1)
        (bar,) = [t for t in fig.data if t.type == "scatter" and t.marker.showscale]
        assert bar.marker.colorbar.len == 1 and bar.marker.colorbar.lenmode == "fraction"
    assert wide.layout.height < square.layout.height


def test_overlay_grid_one_panel_per_map_on_one_colour_scale():
    overlays = [Overlay(f"q{i}", np.full((3, 4), float(i)), mask=_mask(cells=[(i, i)])) for i in range(3)]
    fig = figures.overlay_grid(overlays, columns=2, colorbar="attention")
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert len(heats) == 3 and {h.coloraxis for h in heats} == {"coloraxis"}
    assert fig.layout.coloraxis.colorbar.title.text == "attention"
    outlines = _trace_named(fig, "outlier cells")
    assert [_outlined_cells(o) for o in outlines] == [{(0, 0)}, {(1, 1)}, {(2, 2)}]
    assert [o.xaxis for o in outlines] == ["x", "x2", "x3"]
    assert list(fig.layout.yaxis3.range) == [2.5, -0.5]
    assert len(fig.layout.images) == 0


def test_overlay_grid_gives_each_map_its_own_scale_and_colour_bar():
    overlays = [Overlay(f"q{i}", np.arange(12, dtype=float).reshape(3, 4) * 10.0 ** -i) for i in range(3)]
    fig = figures.overlay_grid(overlays, columns=3, shared_scale=False, width=900)
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert [h.coloraxis for h in heats] == ["coloraxis", "coloraxis2", "coloraxis3"]
    axes = [fig.layout.coloraxis, fig.layout.coloraxis2, fig.layout.coloraxis3]
    assert [(a.cmin, a.cmax) for a in axes] == [(0.0, 11.0), (0.0, 1.1), (0.0, pytest.approx(0.11))]
    for axis, suffix in zip(axes, ["", "2", "3"]):  # each bar beside its own map, as tall as the map's domain
        x_domain, y_domain = fig.layout[f"xaxis{suffix}"].domain, fig.layout[f"yaxis{suffix}"].domain
        assert x_domain[1] < axis.colorbar.x < x_domain[1] + 0.02
        assert axis.colorbar.len == pytest.approx(y_domain[1] - y_domain[0])


def test_histogram_counts_every_token_and_draws_each_threshold():
    rng = np.random.default_rng(0)
    plain = NormHistogram("plain", np.concatenate([rng.normal(20, 2, 980), rng.normal(200, 10, 20)]), threshold=100.0)
    regs = NormHistogram("reg4", rng.normal(20, 2, 1000), threshold=None)
    fig = figures.histogram_figure([plain, regs], log_y=True, bins=40)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == ["plain", "reg4"]
    assert all(sum(b.y) == 1000 for b in bars)
    assert all(b.opacity < 0.5 for b in bars)  # translucent: the second model's bars do not hide the first's
    outlines = [t for t in fig.data if t.type == "scatter"]
    assert [(o.name, o.line.color) for o in outlines] == [("plain (outline)", bars[0].marker.color),
                                                          ("reg4 (outline)", bars[1].marker.color)]
    tops = {(x, y) for x, y in zip(outlines[0].x, outlines[0].y) if y is not None}
    assert max(y for _, y in tops) == max(bars[0].y) and all(y > 0 for _, y in tops)  # log scale: no zero heights
    import json

    clicked = json.loads(fig.to_json())["data"][0]["customdata"][0]  # what a click on a bar sends back
    assert isinstance(clicked, list) and len(clicked) == 2
    edges = np.asarray(bars[0].customdata)
    assert edges.shape == (40, 2) and np.allclose(edges[1:, 0], edges[:-1, 1])
    (line,) = [shape for shape in fig.layout.shapes if shape.type == "line"]
    assert line.x0 == line.x1 == 100.0
    assert "20 outliers (2.0%)" in fig.layout.annotations[0].text
    assert fig.layout.yaxis.type == "log"
    low, high = fig.layout.xaxis.range
    assert low < plain.norms.min() and high > plain.norms.max()
    assert plain.count == 20 and plain.fraction == pytest.approx(0.02) and regs.count == 0
    assert figures.histogram_figure([regs], log_y=False).layout.yaxis.type == "linear"


def test_emergence_marks_the_first_outlier_layer_of_each_model():
    curves = [EmergenceCurve("plain", np.array([0, 0, 3, 5]), np.array([0, 0, 0.1, 0.2]), np.ones(4) * 50, np.ones(4) * 5),
              EmergenceCurve("reg4", np.zeros(4, int), np.zeros(4), np.ones(4) * 9, np.ones(4) * 5)]
    assert curves[0].first_layer == 2 and curves[1].first_layer is None
    fig = figures.emergence_figure(curves)
    lines = [shape for shape in fig.layout.shapes if shape.type == "line"]
    assert [(line.x0, line.x1, line.xref) for line in lines] == [(2, 2, "x"), (2, 2, "x2")]  # both panels
    assert [a.text for a in fig.layout.annotations if "first outliers" in a.text] == ["first outliers: layer 2"]
    share = [t for t in fig.data if (t.legendgroup, t.name) == ("plain", "outlier share")][0]
    assert list(share.y) == [0, 0, 10, 20]
    assert list(fig.layout.xaxis2.range) == [-0.5, 3.5]
    assert fig.layout.yaxis2.type == "log"


def test_emergence_names_model_and_statistic_and_ticks_every_decade():
    """Every line's legend entry says model and statistic; CLS and register norms sit beside the patch
    statistics only for the model that has them; the log axis is labelled at each power of ten."""
    plain = EmergenceCurve("plain", np.zeros(3, int), np.zeros(3), np.array([8, 90, 400.0]), np.array([4, 6, 7.0]),
                           cls_norm=np.array([5, 30, 60.0]))
    reg = EmergenceCurve("reg4", np.zeros(3, int), np.zeros(3), np.array([9, 12, 20.0]), np.array([4, 6, 7.0]),
                         cls_norm=np.array([5, 20, 40.0]), register_norm=np.array([3, 50, 0.8]))
    fig = figures.emergence_figure([plain, reg])
    names = [f"{t.legendgrouptitle.text}: {t.name}" for t in fig.data]
    assert names == ["plain: outlier share", "plain: max patch norm", "plain: median patch norm", "plain: CLS norm",
                     "reg4: outlier share", "reg4: max patch norm", "reg4: median patch norm", "reg4: CLS norm",
                     "reg4: mean register norm"]
    assert list(fig.data[-1].y) == [3, 50, 0.8] and "<extra>reg4</extra>" in fig.data[-1].hovertemplate
    axis = fig.layout.yaxis2
    assert axis.type == "log" and list(axis.tickvals) == [0.1, 1, 10, 100, 1000]
    assert list(axis.ticktext) == ["0.1", "1", "10", "100", "1000"] and list(axis.range) == [-1, 3]


def test_cls_attention_figures_show_masses_in_percent():
    trace = synthetic_trace(outliers={1: [(1, 2)]})  # 15 tokens: cls, 2 registers, 12 patches
    mass = cls_outlier_attention(trace, layer_outliers(trace), head=0)
    per_block, split = figures.cls_attention_figures([("plain", mass)], layer=2)
    on_outliers = [t for t in per_block.data if t.name == "plain: attention on input outliers"][0]
    assert np.isnan(on_outliers.y[0])  # block 0: no outlier mask
    assert list(on_outliers.y[1:]) == pytest.approx([0, 100 / 15], abs=1e-4)  # block 2 reads layer 1's outlier
    baseline = [t for t in per_block.data if t.name == "plain: if spread evenly over patches"][0]
    assert baseline.y[2] == pytest.approx(100 / 12 * 12 / 15, abs=1e-4)
    (bars,) = split.data
    assert list(bars.y) == pytest.approx([100 / 15, 1100 / 15, 300 / 15], abs=1e-3)
    assert "input outliers" in per_block.layout.title.text and "block 2" in split.layout.title.text
    _, first = figures.cls_attention_figures([("plain", mass)], layer=0)
    assert np.isnan(first.data[-1].y[:2]).all() and "no outlier split" in first.layout.annotations[-1].text


def test_embedding_points_carry_image_and_cell():
    traces = [synthetic_trace(outliers={2: [(0, 1)]}, seed=0), synthetic_trace(outliers={2: [(2, 3)]}, seed=1)]
    result = token_embedding(traces, layer=2)
    fig = figures.embedding_figure(result, ["a.png", "b.png"], highlight=(1, 2, 3))
    names = [t.name for t in fig.data]
    assert names == ["normal patch: a.png", "normal patch: b.png", "outlier patch", "registers", "CLS", "selected"]
    normal_a, normal_b, outlier, registers, cls = fig.data[:5]
    assert sorted((c[4], int(c[1]), int(c[2])) for c in outlier.customdata) == [("a.png", 0, 1), ("b.png", 2, 3)]
    assert {c[4] for c in normal_a.customdata} == {"a.png"} and {c[4] for c in normal_b.customdata} == {"b.png"}
    assert len(normal_a.x) + len(normal_b.x) == 22 and len(cls.x) == 2 and len(registers.x) == 4
    assert normal_a.marker.color != normal_b.marker.color and normal_a.marker.symbol != normal_b.marker.symbol
    assert outlier.marker.color == figures.OUTLIER_COLOUR  # outliers stay red whatever the image, symbol by image
    assert list(outlier.marker.symbol) == [normal_a.marker.symbol if c[4] == "a.png" else normal_b.marker.symbol
                                           for c in outlier.customdata]
    assert cls.marker.symbol == "star" and registers.marker.symbol == "diamond-open"  # CLS on top, inside the ring
    selected = fig.data[5]
    index = np.flatnonzero((result.image == 1) & (result.row == 2) & (result.col == 3))[0]
    assert (selected.x[0], selected.y[0]) == pytest.approx(tuple(result.coords[index]))
    assert fig.layout.xaxis.title.text.startswith("PC1")


def test_embedding_of_one_image_keeps_the_two_colours():
    result = token_embedding([synthetic_trace(outliers={2: [(0, 1)]})], layer=2)
    fig = figures.embedding_figure(result, ["a.png"])
    assert [t.name for t in fig.data] == ["normal patch", "outlier patch", "registers", "CLS"]
    assert fig.data[0].marker.color == figures.NORMAL_COLOUR and fig.data[1].marker.color == figures.OUTLIER_COLOUR


def test_table_csv_quotes_names():
    table = Table(["image", "norm", "outlier"], [["a, b.png", 1.23456789, True], ["c.png", None, False]])
    assert table.to_csv() == 'image,norm,outlier\n"a, b.png",1.23457,True\nc.png,,False\n'


def _picture(width: int = 40, height: int = 30):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_a_click_on_a_histogram_bar_gives_its_lower_edge():
    import ui

    assert ui.threshold_from_selection({"points": [{"x": 150.0, "customdata": [148.49, 151.5]}]}) == 148.5
    assert ui.threshold_from_selection({"points": [{"x": 150.0}]}) == 150.0
    assert ui.threshold_from_selection({"points": [{"x": 150.0, "customdata": {"0": 1}}], "box": []}) == 150.0
    assert ui.threshold_from_selection({"points": [], "box": [{"x": [90.0, 40.0]}]}) == 40.0
    assert ui.threshold_from_selection({"points": [], "box": []}) is None
    assert ui.threshold_from_selection({"points": [{"x": -3.0}]}) is None


def test_compared_norm_maps_can_share_one_colour_scale():
    clean, artifacts = Overlay("reg", np.linspace(5, 22, 12).reshape(3, 4)), Overlay("plain", np.linspace(20, 100, 12).reshape(3, 4))
    scale = figures.shared_range([clean, artifacts])
    assert scale == (5.0, 100.0)
    ranges = [(h.zmin, h.zmax) for f in (figures.overlay_figure(o, scale=scale) for o in (clean, artifacts))
              for h in f.data if h.type == "heatmap"]
    assert ranges == [scale, scale]
    own = [h for h in figures.overlay_figure(clean).data if h.type == "heatmap"]
    assert (own[0].zmin, own[0].zmax) == (5.0, 22.0)


def test_own_attention_colour_bars_have_distinct_tick_labels_that_fit():
    flat = Overlay("q", 0.0038310 + np.arange(12).reshape(3, 4) * 1e-8)  # nearly uniform attention
    fig = figures.overlay_grid([flat, Overlay("r", np.arange(12, dtype=float).reshape(3, 4) / 66)], shared_scale=False)
    for axis in (fig.layout.coloraxis, fig.layout.coloraxis2):
        labels = list(axis.colorbar.ticktext)
        assert len(labels) == 3 and len(set(labels)) == 3, labels
        assert max(map(len, labels)) * 5.5 + axis.colorbar.thickness + 8 <= figures.OWN_BAR_PX  # 9-px digits
    assert fig.layout.margin.r >= figures.OWN_BAR_PX
    assert figures.scale_ticks(2.0, 2.0) == ([2.0], ["2"])


def test_each_role_has_one_colour_and_a_second_model_of_a_role_another():
    without, with_, ttr = figures.WITHOUT_REGISTERS, figures.WITH_REGISTERS, figures.TEST_TIME_REGISTER
    assert figures.model_colours([with_, without]) == figures.model_colours([without, with_])[::-1]
    assert figures.model_colours([without, with_, ttr]) == [figures.ROLE_COLOURS[r] for r in (without, with_, ttr)]
    twins = figures.model_colours([with_, with_])  # DINOv3 beside a DINOv2 with registers
    assert twins[0] == figures.ROLE_COLOURS[with_] and twins[1] not in figures.ROLE_COLOURS.values()
    assert not set(figures.model_colours([None] * 3)) & set(figures.ROLE_COLOURS.values())  # layers are not models
    assert figures.role_of(4) == with_ and figures.role_of(0) == without and figures.role_of(4, True) == ttr
    plain = NormHistogram("plain", np.ones(10), None, role=without)
    regs = NormHistogram("reg4", np.ones(10), None, role=with_)
    assert [b.marker.color for b in figures.histogram_figure([regs, plain]).data if b.type == "bar"] == \
        [figures.ROLE_COLOURS[with_], figures.ROLE_COLOURS[without]]


def test_long_legend_entries_and_subplot_titles_are_broken_into_lines_that_fit_a_phone():
    label = "dinov2_vits14_reg4 (synthetic demo, registers: no planted artifacts)"
    fig = go.Figure([go.Scatter(name=label), go.Scatter(name="short", legendgrouptitle=dict(text=label)),
                     go.Scatter(name="a hidden entry that is long enough to be wrapped", showlegend=False)])
    fig.add_annotation(text="token norms per layer (pre-final-norm, log scale)")
    figures.fit_narrow(fig)
    lines = fig.data[0].name.split("<br>")
    assert len(lines) == 3 and all(len(line) <= figures.LEGEND_CHARS for line in lines) and " ".join(lines) == label
    assert fig.data[1].name == "short" and fig.data[1].legendgrouptitle.text == fig.data[0].name
    assert "<br>" not in fig.data[2].name
    assert fig.layout.annotations[0].text == "token norms per layer (pre-final-norm,<br>log scale)"
