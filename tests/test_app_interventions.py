"""The Interventions and Ablations pages under AppTest, and the third column "with test-time register"."""
import json

from test_app import _array, _figures, _ok, _outlined, _planted_app, _title, weights_dir  # noqa: F401 (weights_dir: fixture)

from app_fixtures import TINY
from conftest import PLANTED_CELLS, PLANTED_LAYER


def _neuron_file(model: str, layer: int, neuron: int) -> bytes:
    return json.dumps({"model": model, "weights": "x", "neurons": [{"layer": layer, "neuron": neuron, "score": 1.0}]}).encode()


def test_finder_picks_the_planted_neurons_and_the_register_column_removes_the_outliers(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/interventions.py").run()
    _ok(at)
    counts = _figures(at)[0]
    assert _array(counts["data"][0]["y"])[PLANTED_LAYER] >= 2  # the two planted neurons are among the picked ones
    assert at.number_input(key="neuron_top").value == 10
    at.button[0].click().run()  # "Use as the test-time register"
    _ok(at)
    assert at.sidebar.checkbox(key="test_time_register").value is True
    assert len(_figures(at)) == 4  # counts, scores, neuron maps, the register's cost
    at.switch_page("views/norm_maps.py").run()
    _ok(at)
    planted, clean, treated = _figures(at)
    assert "with test-time register" in _title(treated)
    assert _outlined(planted) == set(PLANTED_CELLS) and _outlined(treated) == set()
    for page in ("views/histogram.py", "views/emergence.py", "views/attention.py", "views/embedding.py"):
        at.switch_page(page).run()
        _ok(at)
    assert any("ttr0" in str(figure) for figure in _figures(at.switch_page("views/attention.py").run()))


def test_bad_neuron_files_give_one_message_on_the_page(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/interventions.py").run()
    at.file_uploader(key="neuron_upload").set_value(("n.json", b"{garbage", "application/json")).run()
    assert [e.value for e in at.error] == ["'n.json' is not valid JSON."]
    at.file_uploader(key="neuron_upload").set_value(("n.json", _neuron_file("vit_tiny_patch16_224", 1, 1), "application/json")).run()
    assert len(at.error) == 1 and "found on" in at.error[0].value
    at.file_uploader(key="neuron_upload").set_value(("n.json", _neuron_file(TINY, 40, 1), "application/json")).run()
    at.switch_page("views/norm_maps.py").run()
    assert not at.exception and len(at.error) == 1 and "out of range" in at.error[0].value


def test_ablations_and_sinks_page(weights_dir):
    at = _planted_app(weights_dir)
    at.switch_page("views/ablations.py").run()
    _ok(at)
    maps, sinks = _figures(at)
    assert len([t for t in maps["data"] if t.get("type") == "heatmap"]) == 2  # zero and noise; one image: no mean/shuffle
    assert "needs at least 2 images" in at.caption[1].value
    assert {trace["name"] for trace in sinks["data"]} >= {"cls", "registers", "outliers", "patches"}
