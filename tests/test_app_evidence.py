"""The evidence pages under AppTest on the tiny planted pair: redundancy, probes, LOST, report."""
import json

import pytest
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, TINY, TINY_REG, TINY_SIDE, planted_weights, png_bytes, register_tiny_models
from conftest import PLANTED_CELLS, PLANTED_LAYER
from vitlens.models import load_model

TIMEOUT = 180


@pytest.fixture
def app(tmp_path, monkeypatch) -> AppTest:
    """The tiny planted pair (outliers at PLANTED_CELLS from block 3) on two square uploads."""
    register_tiny_models()
    folder = tmp_path / "weights"
    folder.mkdir()
    planted_weights(folder / "tiny_planted.safetensors", TINY, PLANTED_CELLS, PLANTED_LAYER)
    clean = load_model(TINY_REG, "random").model
    save_file({key: value.contiguous() for key, value in clean.state_dict().items()}, str(folder / "tiny_reg4.safetensors"))
    monkeypatch.setenv("VITLENS_WEIGHTS_DIR", str(folder))
    at = AppTest.from_file(str(APP / "main.py"), default_timeout=TIMEOUT)
    at.query_params.update(dict(model=TINY, weights="file:tiny_planted.safetensors", pair_weights="file:tiny_reg4.safetensors",
                                side=str(TINY_SIDE), images="cat", layer="4"))
    at.run()
    for seed in (0, 1):
        at.file_uploader(key="image_uploads").set_value((f"square{seed}.png", png_bytes(seed=seed), "image/png"))
        at.run()
    uploads = [ref for ref in at.multiselect(key="images").value if ref.startswith("upload-")]
    return at.multiselect(key="images").set_value(uploads).run()


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_evidence_pages_open_and_show_the_planted_outliers(app):
    at = app.switch_page("views/redundancy.py").run()
    _ok(at)
    figures = _figures(at)
    assert len(figures) == 2 * 2 + 2  # per model: norm map and similarity map; then one distribution per model
    titles = [f["layout"]["title"]["text"] for f in figures[4:]]
    assert any("AUROC n/a" in t for t in titles) and any("AUROC 0." in t or "AUROC 1." in t for t in titles)

    at.switch_page("views/probes.py").run()
    _ok(at)
    table = at.dataframe[0].value
    planted = table[(table["tokens"] == "outlier") & (table["test tokens"] > 0)]
    assert len(planted) == 1 and planted["test tokens"].iloc[0] == len(PLANTED_CELLS)  # one test image

    at.switch_page("views/lost.py").run()
    _ok(at)
    assert len(at.get("image")) == 2 and len(at.dataframe) == 1  # the picture with box and seed, per model

    at.switch_page("views/report.py").run()
    _ok(at)
    at.button(key="report_build").click().run()
    _ok(at)
    assert at.get("download_button")


def test_probes_with_one_image_say_so(app):
    uploads = app.multiselect(key="images").value[:1]
    at = app.multiselect(key="images").set_value(uploads).run().switch_page("views/probes.py").run()
    assert not at.exception
    assert "at least 2 images" in at.error[0].value
