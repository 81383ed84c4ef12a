"""The dashboard under streamlit's AppTest: every page runs, widgets change what is shown, nothing crashes.

Most tests use the tiny DINOv2-style pair (6 blocks, grid 8x8 at 112 px): the model without
registers loads a weights file with outliers planted at known cells from block 3, the one with
registers a clean file. Two tests open the real default (ViT-S/14 pair) to check the offline
hub message and the synthetic-demo fallback.
"""
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, TINY, TINY_GAP, TINY_REG, TINY_SIDE, planted_weights, png_bytes, register_tiny_models, tiny_pair_weights
from conftest import PLANTED_CELLS, PLANTED_LAYER, rewrite_keeping_size_and_times
from vitlens.synthetic import DEMO_CELLS, demo_cells

TIMEOUT = 180
PAGES = ["views/norm_maps.py", "views/histogram.py", "views/emergence.py", "views/attention.py",
         "views/embedding.py", "views/about.py"]
TITLES = ["Norm maps", "Norm histogram", "Layer emergence", "Attention", "Token embedding", "About / how to read"]


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """A weights folder with the planted tiny model and a clean tiny model with registers."""
    register_tiny_models()
    folder = tiny_pair_weights(tmp_path / "weights", PLANTED_CELLS, PLANTED_LAYER)
    monkeypatch.setenv("VITLENS_WEIGHTS_DIR", str(folder))
    return folder


def _app(**params) -> AppTest:
    at = AppTest.from_file(str(APP / "main.py"), default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at


def _planted_app(weights_dir, **params) -> AppTest:
    """The tiny pair on an uploaded square picture (its grid is the models' own 8x8)."""
    query = dict(model=TINY, weights="file:tiny_planted.safetensors", pair_weights="file:tiny_reg4.safetensors",
                 side=str(TINY_SIDE), images="cat", layer="4")
    at = _app(**{**query, **params}).run()
    at.file_uploader(key="image_uploads").set_value(("square.png", png_bytes(), "image/png"))
    at.run()
    uploads = [ref for ref in at.multiselect(key="images").value if ref.startswith("upload-")]
    return at.multiselect(key="images").set_value(uploads).run()  # only the square picture


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _outlined(figure: dict, name: str = "outlier cells") -> set[tuple[int, int]]:
    cells = set()
    for trace in figure["data"]:
        if trace.get("name") == name:
            xs, ys = trace["x"], trace["y"]
            for start in range(0, len(xs), 6):
                cells.add((round(sum(ys[start:start + 4]) / 4), round(sum(xs[start:start + 4]) / 4)))
    return cells


def _array(value) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array ``{"dtype", "bdata"}`` (base64)."""
    if isinstance(value, dict):
        import base64

        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value)


def _title(figure: dict) -> str:
    return figure["layout"]["title"]["text"]


def test_every_page_opens_offline_on_the_default_model():
    """Offline, pretrained weights fall back to the synthetic demo, which says what it is and shows its artifacts."""
    at = _app(images="astronaut", side="224").run()
    _ok(at)
    assert at.title[0].value == "Norm maps"
    (warning,) = at.warning  # one line; the details fold out
    assert warning.value == "Pretrained weights are not available, so these views show the synthetic demo."
    weights = at.radio(key="weights_mode")  # the choice stays, but says what is shown instead (from the first run on)
    assert weights.value == "hub" and weights.options[0] == "synthetic demo (pretrained unavailable offline)"
    details = " ".join(m.value for m in at.expander[0].markdown)
    assert "Synthetic demo, not a trained model" in details and "from block 6 of 12 on" in details
    assert "python -m vitlens fetch dinov2_vits14_reg4" in details and "python -m vitlens fetch dinov2_vits14" in details
    without, with_registers = _figures(at)  # without registers first, though the default names the model with them
    assert _title(with_registers).startswith("dinov2_vits14_reg4<br><sup>synthetic demo, registers: no planted artifacts<br>")
    assert _title(without).startswith("dinov2_vits14<br><sup>synthetic demo: planted artifacts<br>")
    assert _outlined(without) == set(DEMO_CELLS) and _outlined(with_registers) == set()  # astronaut: grid 16x16
    for page, title in zip(PAGES[1:], TITLES[1:]):
        at.switch_page(page).run()
        _ok(at)
        assert at.title[0].value == title
    assert at.markdown and "Vision Transformers Need Registers" in at.markdown[0].value


def test_random_weights_are_one_click_away_and_the_demo_can_be_chosen():
    at = _app(images="astronaut", side="224", weights="synthetic", layer="3").run()
    _ok(at)
    assert not at.warning and "Synthetic demo, not a trained model" in at.info[0].value
    assert any("Not a trained model" in c.value for c in at.sidebar.caption)
    assert _outlined(_figures(at)[0]) == set()  # layer 3: before the planted block
    at.slider(key="layer").set_value(6).run()
    assert _outlined(_figures(at)[0]) == set(DEMO_CELLS)
    at.radio(key="weights_mode").set_value("random").run()
    _ok(at)
    assert not at.info and at.query_params["weights"] == "random"
    assert [_outlined(f) for f in _figures(at)] == [set(), set()]
    assert all("<sup>random weights: no artifacts expected<br>" in _title(f) for f in _figures(at))


@pytest.mark.parametrize("side, portrait", [("112", False), ("224", True)], ids=["landscape-112px", "portrait-224px"])
def test_the_demo_outlines_the_same_cells_at_any_side_and_aspect(side, portrait):
    """The demo's note promises the same cells whatever the picture, side and aspect: a 3:2 landscape
    gallery photograph at 112 px (grid 5x8) and a 2:3 portrait upload at 224 px (grid 16x11)."""
    at = _app(images="coffee", side=side, weights="synthetic", layer="11", compare="0", model="dinov2_vits14").run()
    if portrait:
        at.file_uploader(key="image_uploads").set_value(("portrait.png", png_bytes(200, 300), "image/png")).run()
        uploads = [ref for ref in at.multiselect(key="images").value if ref.startswith("upload-")]
        at.multiselect(key="images").set_value(uploads).run()
    _ok(at)
    assert "whatever the picture, input side and aspect" in at.info[0].value
    (figure,) = _figures(at)
    grid = (16, 11) if portrait else (5, 8)
    assert _outlined(figure) == set(demo_cells(grid))


def test_a_long_running_app_sees_a_same_size_rewrite_of_a_weights_file(weights_dir, tmp_path):
    """Replacing a weights file by one of the same size with its times set back must not keep
    serving the old traces (the app's request ids and the engine's digest memo)."""
    at = _planted_app(weights_dir)
    _ok(at)
    assert _outlined(_figures(at)[0]) == set(PLANTED_CELLS)
    moved = ((0, 0), (5, 5), (6, 1))
    replacement = planted_weights(tmp_path / "moved.safetensors", TINY, moved, PLANTED_LAYER)
    rewrite_keeping_size_and_times(weights_dir / "tiny_planted.safetensors", replacement.read_bytes())
    at.run()
    _ok(at)
    assert _outlined(_figures(at)[0]) == set(moved)


def test_a_model_without_a_per_token_final_norm_disables_the_post_norm_switch():
    """An average-pooled model (fc_norm after pooling) has no per-token final norm: the switch is
    off and disabled with a sentence saying why, and every page still opens."""
    register_tiny_models()
    at = _app(model=TINY_GAP, weights="random", side=str(TINY_SIDE), images="cat").run()
    _ok(at)
    assert at.toggle(key="post_norm").disabled and not at.toggle(key="post_norm").value
    assert any("has no per-token final norm" in c.value for c in at.caption)
    for page in PAGES[1:]:
        at.switch_page(page).run()
        _ok(at)
        if page == "views/histogram.py":
            assert at.toggle(key="post_norm").disabled


def test_norm_maps_outline_the_planted_cells_and_follow_layer_and_post_norm(weights_dir):
    at = _planted_app(weights_dir)
    _ok(at)
    planted, clean = _figures(at)
    ranges = [[(t["zmin"], t["zmax"]) for t in f["data"] if t["type"] == "heatmap"] for f in (planted, clean)]
    assert ranges[0] == ranges[1]  # one colour scale for the compared models by default
    at.toggle(key="norm_scale_shared").set_value(False).run()
    ranges = [[(t["zmin"], t["zmax"]) for t in f["data"] if t["type"] == "heatmap"] for f in _figures(at)]
    assert ranges[0] != ranges[1]
    at.toggle(key="norm_scale_shared").set_value(True).run()
    assert _title(planted).startswith("vitlens_test_tiny_patch14_dinov2<br><sup>tiny_planted.safetensors<br>layer 4 · 3 outliers")
    assert _outlined(planted) == set(PLANTED_CELLS)
    assert _outlined(clean) == set()
    assert planted["layout"]["xaxis"]["range"] == [-0.5, 7.5] and planted["layout"]["yaxis"]["range"] == [7.5, -0.5]
    colourbars = [t["marker"]["colorbar"]["title"]["text"] for t in planted["data"] if t.get("marker", {}).get("showscale")]
    assert colourbars == ["token norm (pre-final-norm)"]

    at.slider(key="layer").set_value(PLANTED_LAYER - 1).run()  # before the planted block: no outliers
    _ok(at)
    assert _outlined(_figures(at)[0]) == set()
    assert at.query_params["layer"] == str(PLANTED_LAYER - 1)

    at.toggle(key="post_norm").set_value(True).run()
    _ok(at)
    planted = _figures(at)[0]
    colourbars = [t["marker"]["colorbar"]["title"]["text"] for t in planted["data"] if t.get("marker", {}).get("showscale")]
    assert colourbars == ["token norm (post-final-norm)"] and "after the final norm" in _title(planted)

    at.slider(key="opacity").set_value(0.25).run()
    assert _figures(at)[0]["data"][0]["opacity"] == 0.25


def test_npz_download_holds_the_cli_arrays_of_every_model_and_image(weights_dir):
    import io
    import sys

    at = _planted_app(weights_dir)
    assert [b.label for b in at.get("download_button")] == ["Numbers (CSV)", "All captured arrays (NPZ)"]
    image_data = sys.modules["image_data"]  # the module the app imported
    arrays = np.load(io.BytesIO(image_data.trace_npz(at.session_state["request"])))
    assert arrays["models"].tolist() == [f"{TINY} (tiny_planted.safetensors)", f"{TINY_REG} (tiny_reg4.safetensors)"]
    assert arrays["m0_i0_norms"].shape == (6, 1 + 64) and arrays["m1_i0_norms"].shape == (6, 5 + 64)
    assert arrays["m1_i0_attention"].shape == (6, 4, 5, 69) and arrays["m1_i0_num_registers"] == 4
    assert arrays["m0_i0_outliers"].sum(axis=(1, 2)).tolist() == [0, 0, 0, 3, 3, 3]
    assert not arrays["m1_i0_outliers"].any()


def test_comparison_grid_puts_models_in_columns_and_downloads_that_grid(weights_dir):
    """Rows are images, columns the models without registers first; the PNG shown and the SVG download
    outline the planted cells in the first column only."""
    import io
    import sys
    import xml.etree.ElementTree as ET

    from PIL import Image

    at = _planted_app(weights_dir, images="cat")  # the uploaded square picture, then cat
    at.multiselect(key="images").set_value(at.multiselect(key="images").value + ["cat"]).run()
    at.switch_page("views/grid.py").run()
    _ok(at)
    assert [b.label for b in at.get("download_button")] == ["Grid (PNG)", "Grid (SVG)"]
    assert len(at.get("image")) == 1
    image_data, grid_image = sys.modules["image_data"], sys.modules["grid_image"]
    grid = image_data.comparison_grid(at.session_state["request"], 4, None, True)
    assert grid.shape == (2, 2) and grid.column_labels == [TINY, TINY_REG]
    figures = sys.modules["figures"]
    assert grid.column_colours == [figures.ROLE_COLOURS[figures.WITHOUT_REGISTERS], figures.ROLE_COLOURS[figures.WITH_REGISTERS]]
    assert grid.file_stem == f"vitlens_norm_grid_{TINY}_vs_{TINY_REG}_layer4_{TINY_SIDE}px_shared"
    shown = image_data.comparison_grid_png(at.session_state["request"], 4, None, True)  # the image and the PNG download
    assert shown == grid_image.to_png(grid)
    png = Image.open(io.BytesIO(shown))
    plan = grid_image.layout(grid)
    assert png.size == (2 * plan.width, 2 * plan.height) and [len(row) for row in plan.cell_boxes] == [2, 2]
    outlines = [r for r in ET.fromstring(grid_image.to_svg(grid)).iter("{http://www.w3.org/2000/svg}rect")
                if r.get("stroke") == sys.modules["figures"].OUTLINE]
    x, _, w, _ = plan.cell_boxes[0][0]
    assert len(outlines) >= len(PLANTED_CELLS) and all(x <= float(r.get("x")) < x + w for r in outlines)


def test_histogram_says_why_and_thresholds_each_image_separately(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/histogram.py").run()
    _ok(at)
    reasons = [c.value for c in at.caption if c.value.startswith("**")]
    assert len(reasons) == 2  # one sentence per model, under the chart
    assert "3 tokens above" in reasons[0] and "bulk-tail p-value" in reasons[0]
    assert "no separate high mode" in reasons[1]
    at.multiselect(key="extra_layers").set_value([5]).run()
    at.toggle(key="per_image_threshold").set_value(True).run()
    _ok(at)
    assert [m.value for m in at.metric] == ["6 outliers", "0 outliers"]  # 3 per layer grid, added up
    reasons = [c.value for c in at.caption if c.value.startswith("**")]
    assert "2 of 2 have a separate high mode" in reasons[0] and "6 outliers in all" in reasons[0]


def test_histogram_counts_follow_the_threshold(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/histogram.py").run()
    _ok(at)
    values = [m.value for m in at.metric]
    assert values[0] == "3 outliers" and values[1] == "0 outliers"  # planted model, clean model with registers
    figure = _figures(at)[0]
    assert [t["type"] for t in figure["data"]] == ["bar", "scatter", "bar", "scatter"]  # bars and their outlines
    assert _array(figure["data"][0]["y"]).sum() == 64  # the upload's 8x8 grid
    assert any(c.value.startswith("Patch-token norms at layer 4;") for c in at.caption)

    at.checkbox(key="threshold_auto").set_value(False).run()
    at.number_input(key="threshold_value").set_value(1e6).run()
    _ok(at)
    assert [m.value for m in at.metric] == ["0 outliers", "0 outliers"]
    assert "threshold=1e%2B06" in _query_string(at) or at.query_params["threshold"] == "1e+06"
    lines = [s for s in _figures(at)[0]["layout"]["shapes"] if s["type"] == "line"]
    assert {s["x0"] for s in lines} == {1e6}
    at.multiselect(key="extra_layers").set_value([2, 5]).run()
    assert any(c.value.startswith("Patch-token norms pooled over layers 2, 4 and 5;") for c in at.caption)


def test_emergence_marks_the_planted_layer(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/emergence.py").run()
    _ok(at)
    texts = [m.value for m in at.markdown]
    assert any(f"first outliers at **layer {PLANTED_LAYER}**" in t for t in texts)
    assert any(t.startswith(f"**{TINY_REG} (tiny_reg4.safetensors)**") and "no outliers in any layer" in t for t in texts)
    upload = at.multiselect(key="images").value[0]
    at.selectbox(key="emergence_scope").set_value(upload).run()
    _ok(at)
    figure = _figures(at)[0]
    assert any(f"first outliers: layer {PLANTED_LAYER}" in a.get("text", "") for a in figure["layout"]["annotations"])
    lines = {f"{trace['legendgrouptitle']['text']}: {trace['name']}".replace("<br>", " "): _array(trace["y"])
             for trace in figure["data"]}  # long legend titles are wrapped (phone width)
    plain, registers = (f"{TINY} (tiny_planted.safetensors)", f"{TINY_REG} (tiny_reg4.safetensors)")
    assert f"{plain}: CLS norm" in lines and f"{plain}: mean register norm" not in lines
    assert len(lines[f"{registers}: mean register norm"]) == 6 and len(lines[f"{registers}: CLS norm"]) == 6
    assert lines[f"{plain}: max patch norm"][PLANTED_LAYER] > 5 * lines[f"{plain}: median patch norm"][PLANTED_LAYER]
    assert figure["layout"]["yaxis2"]["type"] == "log"


def _attention_maps(at: AppTest) -> tuple[list[dict], list[str]]:
    """The attention page's maps of CLS and each register (one figure each), and the titles and notes of
    its two CLS-mass figures."""
    drawn = [(f, f["layout"].get("title", {}).get("text", "")) for f in _figures(at)]
    maps = [f for f, title in drawn if "on patches)" in title]
    cls = [f for f, title in drawn if title.startswith(("On the block", "Where it goes"))]
    return maps, [_title(f) for f in cls] + [a["text"] for f in cls for a in f["layout"].get("annotations", [])]


def _colour_range(figure: dict) -> tuple[float, float]:
    heat = next(t for t in figure["data"] if t["type"] == "heatmap")
    return heat["zmin"], heat["zmax"]


def test_attention_shows_cls_and_each_register(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/attention.py").run()
    _ok(at)
    maps, texts = _attention_maps(at)
    titles = [_title(m) for m in maps]
    assert len(titles) == 6 and "<b>cls</b>" in titles[0] and "<b>reg3</b>" in titles[5]
    assert all("width" not in m["layout"] for m in maps)  # as wide as their column: one per row on a phone
    assert _outlined(maps[0]) == set(PLANTED_CELLS)
    assert "Where it goes in block 4" in texts and "On the block's input outliers" in texts
    assert len({_colour_range(m) for m in maps}) == 6 and any("its own colour scale" in c.value for c in at.caption)
    at.selectbox(key="head").set_value(1).run()
    _ok(at)
    assert "head 1" in json.dumps(_attention_maps(at)[0][0]["data"])
    at.toggle(key="shared_scale").set_value(True).run()
    _ok(at)
    maps, _ = _attention_maps(at)
    assert len({_colour_range(m) for m in maps}) == 1
    assert any("One colour scale for all maps" in c.value for c in at.caption)


def test_attention_heads_grid_shows_every_head_and_a_patchs_row_and_column(weights_dir):
    """All heads of a block for CLS; a register the model without registers lacks is said so; for a
    patch, the full attention of the block: its row and column, whose prefix part equals the
    captured prefix attention."""
    import sys

    at = _planted_app(weights_dir)
    at.switch_page("views/attention.py").run()
    _ok(at)
    assert at.selectbox(key="heads_query").value == "cls"
    plain, registers = [f for f in _figures(at) if "what cls attends to" in f["layout"].get("title", {}).get("text", "")]
    heads = [a["text"] for a in plain["layout"]["annotations"] if a["text"].startswith("head")]
    assert [text.split("<br>")[0] for text in heads] == [f"head {h}" for h in range(4)]  # the tiny models' 4 heads
    assert all(text.endswith("% on patches") for text in heads) and TINY in _title(plain)
    at.selectbox(key="heads_query").set_value("reg2").run()
    _ok(at)
    assert any(f"{TINY} has no 'reg2' token." in c.value for c in at.caption)
    at.session_state["attention_patch"] = ((PLANTED_CELLS[0][0] + 0.5) / 8, (PLANTED_CELLS[0][1] + 0.5) / 8)
    at.selectbox(key="heads_query").set_value("patch").run()
    _ok(at)
    titles = [f["layout"].get("title", {}).get("text", "") for f in _figures(at)]
    cell = f"patch {PLANTED_CELLS[0]}"
    assert f"{TINY_REG}: who attends to {cell}" in titles and f"{TINY}: what {cell} attends to" in titles
    image_data = sys.modules["image_data"]
    request = at.session_state["request"]
    view = image_data.heads(request, request.images[0], 4, "patch", at.session_state["attention_patch"], None)
    trace = sys.modules["captures"].captured(request).runs[1].traces[0]
    for panel in view.panels:
        found = panel.patch
        assert found.cell == PLANTED_CELLS[0]
        np.testing.assert_allclose(found.gives.sum(axis=(1, 2)) + found.gives_prefix.sum(axis=1), 1, atol=2e-3)
    token = trace.layout.num_prefix + PLANTED_CELLS[0][0] * 8 + PLANTED_CELLS[0][1]
    np.testing.assert_allclose(view.panels[1].patch.gets_prefix, trace.attention[4, :, :, token], atol=2e-3)


def test_attention_outlines_the_outliers_of_the_blocks_input(weights_dir):
    """Block l's attention is made from block l-1's output: at the planted block itself the planted
    cells were still ordinary in its input; one block later they are outlined."""
    at = _planted_app(weights_dir)
    at.switch_page("views/attention.py").run()
    at.slider(key="layer").set_value(PLANTED_LAYER).run()
    _ok(at)
    assert _outlined(_attention_maps(at)[0][0]) == set()
    at.slider(key="layer").set_value(0).run()
    _ok(at)
    maps, texts = _attention_maps(at)
    assert _outlined(maps[0]) == set()
    assert any("no outlier split" in text for text in texts)


def test_a_model_without_registers_in_the_attention_view_says_so(weights_dir):
    at = _app(model=TINY, weights="random", compare="0", side=str(TINY_SIDE), images="cat").run()
    at.switch_page("views/attention.py").run()
    _ok(at)
    assert "has no register tokens" in at.info[0].value and "Choose a model with registers" in at.info[0].value
    assert len(_attention_maps(at)[0]) == 1  # CLS only


def test_beside_a_model_with_registers_the_attention_view_suggests_none(weights_dir):
    at = _app(model=TINY, weights="random", compare="1", side=str(TINY_SIDE), images="cat").run()
    at.switch_page("views/attention.py").run()
    _ok(at)
    notes = " ".join(info.value for info in at.info)
    assert "has no register tokens" in notes and "Choose a model with registers" not in notes


def test_embedding_shows_both_models_side_by_side_and_a_picked_cell(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/embedding.py").run()
    _ok(at)
    plain, registers = _figures(at)
    outliers = [t for t in plain["data"] if t["name"] == "outlier patch"][0]
    cells = {(int(c[1]), int(c[2])) for c in outliers["customdata"] if c[4] == "square.png"}
    assert cells == set(PLANTED_CELLS)
    assert [t["name"] for t in plain["data"]][:3] == ["normal patch", "outlier patch", "CLS"]
    assert "registers" in [t["name"] for t in registers["data"]] and TINY_REG in _title(registers)
    assert not [t for t in registers["data"] if t["name"] == "outlier patch"][0].get("customdata")
    at.session_state["picked_point"] = (1, 0, *PLANTED_CELLS[0])  # what a click on the second plot stores
    at.run()
    _ok(at)
    *plots, detail = _figures(at)
    assert _outlined(detail, "the picked cell") == {PLANTED_CELLS[0]} and TINY_REG in _title(detail)
    assert all(any(t["name"] == "selected" for t in plot["data"]) for plot in plots)  # ringed in both


def test_unit_length_tokens_change_the_embedding_and_say_so(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/embedding.py").run()
    raw = _figures(at)[0]
    at.toggle(key="embed_normalize").set_value(True).run()
    _ok(at)
    unit = _figures(at)[0]
    assert unit["layout"]["xaxis"]["title"]["text"].endswith("unit-length tokens")
    assert "unit-length tokens" in _title(unit) and "unit-length" not in raw["layout"]["xaxis"]["title"]["text"]
    first = lambda figure: _array([t for t in figure["data"] if t["name"] == "normal patch"][0]["x"])
    assert not np.allclose(first(raw), first(unit))
    assert [b for b in at.get("download_button") if b.label == "Numbers (CSV)"]


@pytest.mark.slow
def test_umap_runs_in_the_background_and_then_shows(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/embedding.py").run()
    at.radio(key="embed_method").set_value("umap").run(timeout=300)
    _ok(at)
    plain, registers = _figures(at)[-2:]
    assert plain["layout"]["xaxis"]["title"]["text"] == "UMAP 1" and TINY_REG in _title(registers)


def test_bad_upload_gives_one_sentence_and_the_good_one_works(weights_dir):
    at = _app(model=TINY, weights="random", side=str(TINY_SIDE), images="cat").run()
    at.file_uploader(key="image_uploads").set_value([("broken.png", b"\x89PNG\r\n\x1a\n not really", "image/png"),
                                                    ("good.png", png_bytes(seed=3), "image/png")])
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == ["'broken.png' is not an image file vitlens can read."]
    assert len(at.multiselect(key="images").value) == 2
    assert len(_figures(at)) == 2
    # the broken file stays in the uploader (same file id): its error is not repeated when another file is added
    _add_upload(at, "image_uploads", "other.png", png_bytes(seed=4))
    at.run()
    assert not at.exception and not at.error
    assert len(at.multiselect(key="images").value) == 3


@pytest.mark.parametrize("name, message", [("no_such_vit", "Unknown model 'no_such_vit'"),
                                           ("resnet50", "not a Vision Transformer")])
def test_unknown_or_unsupported_model_gives_one_message(name, message):
    at = _app(model=name, weights="random", side="112", images="cat").run()
    assert not at.exception
    (error,) = at.error
    assert message in error.value
    at.switch_page("views/histogram.py").run()
    assert not at.exception and [message in e.value for e in at.error] == [True]


def test_weights_that_do_not_fit_the_model_give_one_message(weights_dir):
    at = _app(model=TINY_REG, weights="file:tiny_planted.safetensors", compare="0", side=str(TINY_SIDE), images="cat").run()
    assert not at.exception
    (error,) = at.error
    assert error.value.startswith("Weights file 'tiny_planted.safetensors' does not fit")


def test_a_garbled_link_opens_with_messages_not_tracebacks(weights_dir):
    at = _app(model=TINY, weights="file:../../etc/passwd", side="-7", layer="99", threshold="-1",
              images="cat,upload-0123456789abcdef,nonsense").run()
    assert not at.exception
    warnings = " ".join(w.value for w in at.warning)
    assert "upload-0123456789abcdef, nonsense" in warnings and "Threshold must be 'auto' or a positive number" in warnings
    assert "Weights file '../../etc/passwd' from the link is not in the weights folder" in warnings
    at.radio(key="weights_mode").set_value("random").run()
    _ok(at)
    assert at.number_input(key="side").value == 4 * 14 and at.slider(key="layer").value == 5


def test_pooled_layers_stay_valid_when_the_layer_moves(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/histogram.py").run()
    at.multiselect(key="extra_layers").set_value([5]).run()
    _ok(at)
    assert len(at.metric) == 2
    at.slider(key="layer").set_value(5).run()  # the pooled layer becomes the chosen one
    _ok(at)
    assert at.multiselect(key="extra_layers").value == []


def test_local_files_need_a_weights_folder():
    at = _app(model=TINY, weights="file:x.safetensors", side="112", images="cat").run()
    assert not at.exception
    assert any("VITLENS_WEIGHTS_DIR" in e.value for e in at.error)


def test_state_follows_the_user_across_pages_and_into_the_url(weights_dir):
    at = _planted_app(weights_dir, layer="2")
    assert at.slider(key="layer").value == 2
    at.slider(key="layer").set_value(5).run()
    at.switch_page("views/emergence.py").run()  # a page without a layer slider
    at.switch_page("views/attention.py").run()
    _ok(at)
    assert at.slider(key="layer").value == 5
    params = at.query_params
    assert params["layer"] == "5" and params["model"] == TINY and params["weights"] == "file:tiny_planted.safetensors"
    assert params["images"].startswith("upload-") and "," not in params["images"]

    next(b for b in at.button if b.label == "Share my uploads by link").click().run()  # uploads are private until shared
    teammate = _app(**{k: v for k, v in params.items()})  # same server: the upload is still in memory
    teammate.run()
    _ok(teammate)
    assert teammate.slider(key="layer").value == 5
    assert teammate.multiselect(key="images").value == params["images"].split(",")


def test_cancelled_capture_says_so_and_runs_again(weights_dir):
    import sys

    sys.path.insert(0, str(APP))
    import jobs

    board = jobs.JobBoard()
    started = __import__("threading").Event()

    def slow(job):
        started.set()
        for step in range(200):
            job.report(step, 200, "working")
            __import__("time").sleep(0.01)
        return "done"

    job = board.run("k", "slow work", slow)
    with pytest.raises(jobs.Pending):
        board.result(job)
    started.wait(5)
    job.cancel()
    job.future.exception(timeout=10)
    with pytest.raises(jobs.Cancelled, match="slow work"):
        board.result(job)
    assert board.run("k", "slow work", slow) is job  # kept until the user asks again
    board.forget("k")
    again = board.run("k", "quick", lambda job: 42)
    assert again is not job and again.future.result(timeout=10) == 42 and board.result(again) == 42


def _add_upload(at: AppTest, key: str, name: str, content: bytes) -> None:
    """Add a file to an uploader that keeps its current files with their ids, as a browser does
    (AppTest's ``set_value``/``upload`` would give every file a new id)."""
    import uuid

    uploader = at.file_uploader(key=key)
    kept = [(f.file_id, f.name, f.getvalue(), f.type) for f in at.session_state[key] or []]
    uploader._files = kept + [(str(uuid.uuid4()), name, content, "image/png")]


def _query_string(at: AppTest) -> str:
    return "&".join(f"{k}={v}" for k, v in at.query_params.items())


def test_a_link_naming_one_image_ten_thousand_times_captures_it_once(monkeypatch):
    """Item 1 of issue 13: `images=coffee,coffee,...` (70 KB) must not queue 10,000 captures."""
    register_tiny_models()
    captured_images = []
    captures = _app_module("captures")
    original = captures.compute_traces
    monkeypatch.setattr(captures, "compute_traces",
                        lambda images, *args, **kwargs: captured_images.append(len(images)) or original(images, *args, **kwargs))
    at = _app(model=TINY, weights="random", compare="0", side=str(TINY_SIDE), images="coffee," * 10_000).run()
    _ok(at)
    assert at.multiselect(key="images").value == ["coffee"]
    assert captured_images == [1] and at.query_params["images"] in ("coffee", ["coffee"])


def test_images_beyond_the_limit_are_dropped_with_a_message(monkeypatch):
    register_tiny_models()
    monkeypatch.setenv("VITLENS_MAX_IMAGES", "2")
    at = _app(model=TINY, weights="random", compare="0", side=str(TINY_SIDE), images="astronaut,cat,coffee,rocket").run()
    assert not at.exception
    assert at.multiselect(key="images").value == ["astronaut", "cat"]
    assert any("names 4 images" in w.value and "coffee, rocket" in w.value for w in at.warning)
    at.file_uploader(key="image_uploads").set_value(("extra.png", png_bytes(seed=5), "image/png"))
    at.run()
    assert at.multiselect(key="images").value == ["astronaut", "cat"]
    assert any("'extra.png' was not added" in e.value for e in at.error)


def _app_module(name: str):
    import importlib
    import sys

    sys.path.insert(0, str(APP))
    return importlib.import_module(name)


def test_a_job_nobody_waits_for_stops_and_a_new_request_starts_afresh(monkeypatch):
    jobs = _app_module("jobs")
    monkeypatch.setattr(jobs, "ABANDON_S", 0.3)
    board, steps = jobs.JobBoard(), []

    def slow(job):
        for step in range(1000):
            job.report(step, 1000, "working")
            steps.append(step)
            __import__("time").sleep(0.01)
        return "done"

    job = board.run("k", "slow work", slow)
    error = job.future.exception(timeout=10)  # nobody touches it: it stops by itself
    assert isinstance(error, jobs.Cancelled) and error.abandoned and len(steps) < 200
    again = board.run("k", "slow work", lambda job: 42)
    assert again is not job and again.future.result(timeout=10) == 42


def test_a_running_job_does_not_hold_up_the_exit_of_the_server():
    """SIGTERM ends the Streamlit server's main thread; the capture thread must not keep the process alive."""
    import subprocess
    import sys
    import time

    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import jobs; "
              "board = jobs.JobBoard(); board.run('k', 'long capture', lambda job: time.sleep(300)); time.sleep(0.5); "
              "print(time.time(), flush=True)")
    done = subprocess.run([sys.executable, "-c", script, str(APP)], timeout=240, check=True, capture_output=True, text=True)
    assert time.time() - float(done.stdout.split()[-1]) < 60  # main thread's end to process end: teardown, not the 300 s job


def _decoded(seed: int, side: int):
    from vitlens.images import decode_image

    return decode_image(png_bytes(side, side, seed), name=f"p{seed}.png")


def test_one_visitors_uploads_never_evict_anothers():
    """Four large uploads by one visitor used to push every other visitor's uploads out, silently."""
    uploads = _app_module("uploads")
    unit = 100 * 100 * 3
    store = uploads._Uploads(budget=3 * unit, limit=6 * unit)
    alice, _ = store.add(_decoded(0, 100), "session:alice")
    dropped_by_mallory = [store.add(_decoded(seed, 100), "session:mallory")[1] for seed in range(1, 5)]
    assert store.visible(alice, "session:alice") is not None  # the other visitor's upload stays
    assert [names for names in dropped_by_mallory if names] == [["p1.png"]]  # mallory is told what went
    for seed in range(5, 8):  # the ceiling: the heaviest owner gives way first
        store.add(_decoded(seed, 100), f"session:visitor{seed}")
    assert store.visible(alice, "session:alice") is not None and store._used() <= 6 * unit


def test_uploads_are_private_until_shared_by_link():
    register_tiny_models()
    query = dict(model=TINY, weights="random", compare="0", side=str(TINY_SIDE), images="cat")
    owner = _app(**query).run()
    owner.file_uploader(key="image_uploads").set_value(("mine.png", png_bytes(seed=9), "image/png"))
    owner.run()
    ref = next(ref for ref in owner.multiselect(key="images").value if ref.startswith("upload-"))
    stranger = _app(**dict(query, images=ref)).run()
    assert not stranger.exception and stranger.multiselect(key="images").value == []
    assert any(ref in w.value and "not on this server" in w.value for w in stranger.warning)
    next(b for b in owner.button if b.label == "Share my uploads by link").click().run()
    teammate = _app(**dict(query, images=ref)).run()
    assert not teammate.exception and teammate.multiselect(key="images").value == [ref]


def test_uploaded_weights_are_bounded_least_recently_used_first(monkeypatch, tmp_path):
    monkeypatch.setenv("VITLENS_MAX_UPLOADED_WEIGHTS", "3000")
    choices = _app_module("choices")
    first = choices.add_weights_upload("a.pth", b"a" * 1200)
    second = choices.add_weights_upload("b.pth", b"b" * 1200)
    choices.weights_path(first)  # used again: now the most recent
    __import__("time").sleep(0.01)
    third = choices.add_weights_upload("c.pth", b"c" * 1200)
    folder = choices._uploaded_weights_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(w.split(":", 1)[1] for w in (first, third))
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 3000
    with pytest.raises(choices.WeightsError, match="not on this server any more"):
        choices.weights_path(second)
    with pytest.raises(choices.WeightsError, match="keeps uploaded weights up to"):
        choices.add_weights_upload("huge.pth", b"x" * 4000)


@pytest.fixture
def stale_widgets_dropped(monkeypatch):
    """Make every run drop the state of the widgets it did not draw, as a served run that is not stopped
    does (AppTest skips it: the run's context is detached by then; a page's ``st.stop`` skips it too)."""
    from streamlit.runtime.state import session_state
    from streamlit.testing.v1.local_script_runner import LocalScriptRunner

    attached, last = session_state.get_script_run_ctx, {}

    def on_finished(self, ctx, event, premature_stop, run_descriptor):
        last["ctx"] = ctx
        self._session_state.on_script_finished(ctx.shared.widget_ids_this_run.snapshot())
        self.on_event.send(self, event=event, run_descriptor=run_descriptor)

    monkeypatch.setattr(LocalScriptRunner, "_on_script_finished", on_finished)
    monkeypatch.setattr(session_state, "get_script_run_ctx", lambda *a, **k: attached(*a, **k) or last.get("ctx"))


def test_an_error_rerun_keeps_the_sidebar_url_and_page_in_agreement(stale_widgets_dropped):
    """A bad timm name hides most of the sidebar for one rerun; clearing it brings the same view back."""
    query = dict(model="dinov2_vits14_reg4", weights="synthetic", side="224", threshold="60", images="astronaut")
    at = _app(**query).run()
    _ok(at)
    at.text_input(key="custom_model").set_value("foo").run()
    assert not at.exception and len(at.error) >= 1
    at.text_input(key="custom_model").set_value("").run()
    _ok(at)
    assert at.number_input(key="side").value == 224 and at.checkbox(key="compare").value
    assert at.radio(key="weights_mode").value == "synthetic" and at.number_input(key="threshold_value").value == 60
    assert at.multiselect(key="images").value == ["astronaut"]
    assert {k: at.query_params[k] for k in query} == query and at.query_params["compare"] == "1"
    assert [_title(f).split("<br>")[0] for f in _figures(at)] == ["dinov2_vits14", "dinov2_vits14_reg4"]
    at.slider(key="layer").set_value(3).run()  # the next move keeps both models at 224 px
    _ok(at)
    assert len(_figures(at)) == 2 and at.number_input(key="side").value == 224


def test_hosted_cancel_button_cancels_the_job_on_the_worker_queue(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(APP))
    import captures
    import jobs
    from job_fixtures import MODEL, OPTIONS, image, wait_for
    from vitlens.client import get_client
    from vitlens.jobs import CANCELLED

    monkeypatch.setenv("VITLENS_MODE", "hosted")
    monkeypatch.setenv("VITLENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VITLENS_WORKER_WAIT", "60")
    queue = get_client(captures.settings()).queue
    queue.register("w1")  # a worker that takes the job and is busy with it

    def capture(job):
        return captures.compute_traces([image(1)], MODEL, "random", OPTIONS, lambda done, total: job.report(done, total, "x"))

    job = jobs.JobBoard().run("k", "Capturing 1 image x 1 model", capture)
    claimed = []
    wait_for(lambda: claimed.extend(queue.claim("w1", max_images=8)) or claimed, timeout=30)
    job.cancel()  # the page's Cancel button
    with pytest.raises(jobs.Cancelled):
        job.future.result(timeout=30)
    status = queue.status(claimed[0].job_id)
    assert (status.state, status.message) == (CANCELLED, "Cancelled: Capturing 1 image x 1 model.")
    assert queue.wanted([status.job_id], "w1") == set()  # so the worker stops after its current batch


def _model_of(label: str) -> str:
    """The model's name in a legend entry ("name (weights)", wrapped into lines on long labels)."""
    return label.replace("<br>", " ").split(" (")[0]


def _model_colours(at: AppTest) -> dict[str, dict[str, str]]:
    """Per page, each model's colour (by name) as its figures draw it: titles of maps, lines and bars of plots."""
    seen = {}
    at.switch_page("views/norm_maps.py").run()
    seen["norm maps"] = {_title(f).split("<br>")[0]: f["layout"]["title"]["font"]["color"] for f in _figures(at)}
    at.switch_page("views/histogram.py").run()
    seen["histogram"] = {_model_of(t["name"]): t["marker"]["color"] for t in _figures(at)[0]["data"] if t["type"] == "bar"}
    at.switch_page("views/emergence.py").run()
    seen["emergence"] = {t["legendgroup"].split(" (")[0]: t["line"]["color"] for t in _figures(at)[0]["data"]
                         if t["name"] == "outlier share"}
    at.switch_page("views/attention.py").run()
    drawn = _figures(at)
    seen["attention maps"] = {_title(f).split("<sup>")[1].split("</sup>")[0]: f["layout"]["title"]["font"]["color"]
                              for f in drawn if "on patches)" in f["layout"].get("title", {}).get("text", "")}
    split = next(f for f in drawn if f["layout"].get("title", {}).get("text", "").startswith("Where it goes"))
    seen["CLS attention"] = {_model_of(t["name"]): t["marker"]["color"] for t in split["data"] if t["type"] == "bar"}
    return seen


def test_without_registers_is_left_and_red_on_every_page_whichever_model_the_sidebar_names(weights_dir):
    """The model without registers is drawn first in one colour, the one with them second in another,
    whether the sidebar names the first or the second (the colours used to follow "sidebar model vs twin")."""
    figures = _app_module("figures")

    expected = {TINY: figures.ROLE_COLOURS[figures.WITHOUT_REGISTERS], TINY_REG: figures.ROLE_COLOURS[figures.WITH_REGISTERS]}
    for first in (TINY, TINY_REG):
        files = {TINY: "file:tiny_planted.safetensors", TINY_REG: "file:tiny_reg4.safetensors"}
        twin = TINY_REG if first == TINY else TINY
        at = _planted_app(weights_dir, model=first, weights=files[first], pair_weights=files[twin])
        _ok(at)
        assert [_title(f).split("<br>")[0] for f in _figures(at)] == [TINY, TINY_REG]  # left to right
        for page, colours in _model_colours(at).items():
            assert colours == expected, (first, page)
        at.switch_page("views/ablations.py").run()  # the sidebar's model or not, the chosen model is the one run
        _ok(at)
        model = next(box for box in at.main.selectbox if box.label == "Model")
        assert model.value == 1 and at.caption[1].value.startswith(f"{TINY_REG}: 4 registers tokens replaced")
        assert at.query_params["pair_weights"] == files[twin]  # the URL still names the sidebar model's twin


def test_a_click_on_a_map_cell_is_the_same_place_on_every_models_grid():
    import sys

    sys.path.insert(0, str(APP))
    import image_data

    selection = {"points": [{"x": 0.5, "y": 1}, {"x": 3, "y": 1, "curve_number": 1}]}  # an outline point, then a cell
    position = image_data.position_from_selection(selection, (4, 6))
    assert position == (1.5 / 4, 3.5 / 6)
    assert image_data.cell_at(position, (4, 6)) == (1, 3) and image_data.cell_at(position, (8, 12)) == (3, 7)
    assert image_data.position_from_selection({"points": []}, (4, 6)) is None
