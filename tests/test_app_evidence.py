"""The evidence pages under AppTest on the tiny planted pair: redundancy, probes, LOST, report."""
import json

import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, TINY, TINY_SIDE, png_bytes, register_tiny_models, tiny_pair_weights
from conftest import PLANTED_CELLS, PLANTED_LAYER
from population_fixtures import TRAIN_EMERGES, TRAIN_STEPS, training_results

TIMEOUT = 180


@pytest.fixture
def app(tmp_path, monkeypatch) -> AppTest:
    """The tiny planted pair (outliers at PLANTED_CELLS from block 3) on two square uploads."""
    register_tiny_models()
    folder = tiny_pair_weights(tmp_path / "weights", PLANTED_CELLS, PLANTED_LAYER)
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


def _labelled(root, classes: int, per_class: int) -> None:
    for label in range(classes):
        folder = root / "animals" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            (folder / f"{index}.png").write_bytes(png_bytes(seed=10 * label + index))


def test_global_probes_on_a_labelled_folder_of_the_deployment(app, tmp_path, monkeypatch):
    _labelled(tmp_path / "datasets", classes=2, per_class=3)
    monkeypatch.setenv("VITLENS_DATASETS_DIR", str(tmp_path / "datasets"))
    at = app.switch_page("views/probes.py").run()
    _ok(at)
    assert "animals" in at.selectbox(key="global_dataset").options
    assert ".." not in at.selectbox(key="global_dataset").options  # only folders inside the configured root
    at = at.selectbox(key="global_dataset").set_value("animals").run()
    at = at.button(key="global_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[1].value
    assert len(table) == 2 * 3  # two models x (cls, normal, outlier)
    assert set(table["images"]) <= {0, 6}
    planted = table[table["token"] == "outlier"]["images"]
    assert 6 in set(planted)  # the planted model has outliers in every image at layer 4
    assert (table["paper (ImageNet-1k)"] > 0.6).all()
    ran = table[table["accuracy"].notna()]
    assert len(ran) >= 3 and ran["accuracy"].between(0, 1).all()
    assert any("no image has an outlier patch token" in info.value for info in at.info)  # the clean pair


def test_global_probes_with_one_class_say_so(app, tmp_path, monkeypatch):
    _labelled(tmp_path / "datasets", classes=1, per_class=2)
    monkeypatch.setenv("VITLENS_DATASETS_DIR", str(tmp_path / "datasets"))
    at = app.switch_page("views/probes.py").run().selectbox(key="global_dataset").set_value("animals").run()
    at = at.button(key="global_run").click().run()
    assert not at.exception
    assert "at least 2 classes" in at.error[0].value and str(tmp_path) not in at.error[0].value


def test_redundancy_over_a_results_folder(app, tmp_path, monkeypatch):
    training_results(tmp_path / "results" / "run")  # similarity 1 at the outliers, from step TRAIN_EMERGES on
    monkeypatch.setenv("VITLENS_RESULTS_DIR", str(tmp_path / "results"))
    at = app.switch_page("views/redundancy.py").run()
    _ok(at)
    assert at.selectbox(key="redundancy_results").options == ["(none)", "run"]
    at = at.selectbox(key="redundancy_results").set_value("run").run()
    _ok(at)
    titles = [f["layout"]["title"]["text"] for f in _figures(at)[6:]]  # after the sidebar images' 2 x 2 maps and 2 distributions
    assert len(titles) == len(TRAIN_STEPS) and all("3 images" in t for t in titles)
    emerged = sum(step >= TRAIN_EMERGES for step in TRAIN_STEPS)
    assert sum("AUROC 1.000" in t for t in titles) == emerged and sum("n/a" in t for t in titles) == len(TRAIN_STEPS) - emerged
