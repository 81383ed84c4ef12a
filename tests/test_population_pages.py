"""The Training, Models and Dataset pages under AppTest, on results folders the tests write in the sweep schema."""
import json
import threading

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, TINY, TINY_SIDE, planted_weights, png_bytes, register_tiny_models
from conftest import PLANTED_CELLS, PLANTED_LAYER
from population_fixtures import (TRAIN_EMERGES, TRAIN_LAYER, TRAIN_STEPS, results_rows, training_results,
                                 write_results)
from vitlens.jobs import JobQueue
from vitlens.settings import Settings
from vitlens.sweep import checkpoint_step
from vitlens.worker import Worker

TIMEOUT = 120


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """VITLENS_RESULTS_DIR with a training series ('run') and a clean model with registers ('reg');
    VITLENS_DATASETS_DIR holding the images the sweep read."""
    results, images = tmp_path / "results", tmp_path / "datasets" / "photos"
    training_results(results / "run")
    reg = results_rows("tiny_model_reg4", "hub", None, ["a.png", "b.png", "sub/c.png"], 6, (4, 6),
                       lambda step, image, layer: [], num_registers=4)
    write_results(results / "reg", [reg])
    for index, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(png_bytes(seed=index))
    monkeypatch.setenv("VITLENS_RESULTS_DIR", str(results))
    monkeypatch.setenv("VITLENS_DATASETS_DIR", str(tmp_path / "datasets"))
    return tmp_path


def _open(page: str, **params) -> AppTest:
    at = AppTest.from_file(str(APP / "main.py"), default_timeout=TIMEOUT)
    at.query_params.update({"model": TINY, "weights": "random", "side": str(TINY_SIDE), "images": "cat", **params})
    register_tiny_models()
    at.switch_page(page)
    return at.run()


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _values(value) -> np.ndarray:
    """A plotly JSON array: a (nested) list, or a typed array ``{"dtype", "bdata", "shape"}`` (base64)."""
    if isinstance(value, dict):
        import base64

        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return flat.reshape([int(n) for n in str(value.get("shape", flat.size)).split(",")])
    return np.asarray(value, dtype=float)


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_training_page_shows_the_first_checkpoint_and_the_heat_map(folders):
    at = _open("views/training.py", results="run")
    _ok(at)
    assert at.title[0].value == "Training" and at.selectbox(key="results_folder").value == "run"
    assert any(f"First checkpoint with outliers: **step {TRAIN_EMERGES}** (from layer {TRAIN_LAYER})" in m.value
               for m in at.markdown)
    heat, lines = _figures(at)
    z = _values(heat["data"][0]["z"])
    assert z.shape == (len(TRAIN_STEPS), 6) and z[:2].max() == 0 and z[2:, TRAIN_LAYER:].min() == pytest.approx(500 / 72)
    assert heat["layout"]["shapes"][0]["y0"] == TRAIN_STEPS.index(TRAIN_EMERGES) - 0.5
    assert [t["name"] for t in lines["data"][:1]] == ["layer 4"]  # the last third of 6 blocks: 4 and 5
    assert at.selectbox(key="training_checkpoint").value == f"step {TRAIN_EMERGES}"
    assert at.selectbox(key="training_image").value == "a.png"  # most outliers first (tied with sub/c.png, by name)


def test_models_page_puts_registers_on_the_right_with_their_shares(folders):
    at = _open("views/models.py", results="run")
    _ok(at)
    assert [m.label for m in at.metric] == ["tiny_model"] and at.metric[0].value == f"{5 / 72:.2%}"
    write_results(folders / "results" / "run", [results_rows("tiny_model_reg4", "hub", None, ["a.png"], 6, (4, 6),
                                                             lambda s, i, layer: [], num_registers=4)])
    at.run()
    _ok(at)
    assert {m.label: m.value for m in at.metric} == {"tiny_model": f"{5 / 72:.2%}", "tiny_model_reg4": "0.00%"}
    [figure] = _figures(at)
    assert {t["name"].split(" ")[0]: t.get("xaxis", "x") for t in figure["data"]} == {"tiny_model": "x", "tiny_model_reg4": "x2"}


def test_dataset_page_pools_layers_compares_folders_and_shows_the_top_images(folders):
    at = _open("views/dataset.py", results="run")
    _ok(at)
    assert at.multiselect(key="dataset_layers").value == [4, 5]
    assert at.metric[0].value == f"{10 / 144:.2%} outliers" and at.metric[0].delta == "of 144 patch tokens"
    captions = [c.value for c in at.caption]
    assert "a.png: 4 outliers (8.3%)" in captions and "b.png: 2 outliers (4.2%)" in captions
    assert len(at.get("image")) == 3  # thumbnails from VITLENS_DATASETS_DIR
    hist, share, grid = _figures(at)
    assert hist["layout"]["xaxis"]["ticktext"] == ["1", "10", "100", "1000"]
    assert _values(grid["data"][0]["z"])[0, 0] == 100  # cell 0: an outlier in every image and layer

    at.selectbox(key="compare_folder").set_value("reg").run()
    _ok(at)
    assert [m.label for m in at.metric] == ["run", "reg"] and at.metric[1].value == "0.00% outliers"
    assert len(_figures(at)[2]["data"]) == 2 and [t["name"] for t in _figures(at)[1]["data"]] == ["run", "reg"]


def test_a_checkpoint_opens_on_its_image_in_the_per_image_views(tmp_path, monkeypatch):
    """A series whose last checkpoint is a real file with planted outliers: the link shows them on the norm map."""
    register_tiny_models()
    weights = tmp_path / "ckpts"
    weights.mkdir()
    files = [planted_weights(weights / f"step_{step}.safetensors", TINY, PLANTED_CELLS, PLANTED_LAYER) for step in (10, 20)]
    planted = [PLANTED_CELLS[0][0] * 8 + PLANTED_CELLS[0][1]]
    tables = [results_rows(TINY, str(path), step, ["x.png"], 6, (8, 8), lambda s, i, layer: planted if layer >= PLANTED_LAYER else [])
              for path, step in zip(files, (10, 20))]
    tables = [t.set_column(t.schema.get_field_index("size"), "size", [[TINY_SIDE] * t.num_rows]) for t in tables]
    write_results(tmp_path / "results" / "series", tables)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "x.png").write_bytes(png_bytes())
    monkeypatch.setenv("VITLENS_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("VITLENS_DATASETS_DIR", str(tmp_path / "datasets"))

    at = _open("views/training.py")
    _ok(at)
    at.selectbox(key="training_checkpoint").set_value("step 20").run()
    at.selectbox(key="training_layer").set_value(4).run()
    at.button[0].click().run()
    _ok(at)
    assert at.title[0].value == "Norm maps" and at.radio(key="weights_mode").value == "sweep"
    request = at.session_state["request"]
    assert [m.weights for m in request.models] == [f"sweep:series|{files[1]}"] and request.side == TINY_SIDE
    assert at.slider(key="layer").value == 4
    title = _figures(at)[0]["layout"]["title"]["text"]
    assert title.startswith(f"{TINY}<br><sup>series: ckpts/step_20.safetensors<br>layer 4 · 3 outliers")


def test_results_are_named_never_reached_by_path_and_weights_only_those_a_folder_names(folders):
    at = _open("views/training.py", results="../results/run")
    _ok(at)  # an unknown name from a link falls back to the first folder
    assert at.selectbox(key="results_folder").value == "reg"
    at = _open("views/norm_maps.py", weights="sweep:run|/etc/passwd")
    assert at.error and "has no rows of weights '/etc/passwd'" in at.error[0].value


def test_population_pages_say_how_to_enable_them(monkeypatch):
    monkeypatch.delenv("VITLENS_RESULTS_DIR", raising=False)
    at = _open("views/dataset.py")
    _ok(at)
    assert "set VITLENS_RESULTS_DIR" in at.info[0].value


def _sweep_folders(tmp_path, monkeypatch) -> None:
    """Image, weights (the tiny pair: planted and random) and results folders of a sweep from the sidebar."""
    register_tiny_models()
    weights, images = tmp_path / "weights", tmp_path / "datasets"
    weights.mkdir()
    images.mkdir()
    planted_weights(weights / "tiny_planted.safetensors", TINY, PLANTED_CELLS, PLANTED_LAYER)
    for index in range(2):
        (images / f"img{index}.png").write_bytes(png_bytes(seed=index))
    (images / "notes.png").write_text("not a picture")
    for name, folder in (("RESULTS", tmp_path / "results"), ("DATASETS", images), ("WEIGHTS", weights)):
        monkeypatch.setenv(f"VITLENS_{name}_DIR", str(folder))
    (tmp_path / "results").mkdir()


def _sweep_from_the_sidebar() -> AppTest:
    """Fill the sidebar's sweep form and start it; the page waits for the sweep, then draws it."""
    at = _open("views/training.py")
    assert "No results folders" in at.info[0].value
    at.selectbox(key="sweep_images").set_value(".")
    at.text_input(key="sweep_models").set_value(TINY)
    at.multiselect(key="sweep_weights").set_value(["file:tiny_planted.safetensors", "random"])
    at.number_input(key="sweep_size").set_value(TINY_SIDE)
    at.text_input(key="sweep_out").set_value("from-app")
    return at.button(key="sweep_start").click().run()  # the page waits for the background sweep, then draws it


def _assert_the_sweep_opened(at: AppTest, tmp_path) -> None:
    """Planted weights show outliers from their block, random none; the unreadable file is reported."""
    _ok(at)
    assert at.selectbox(key="results_folder").value == "from-app"
    step = checkpoint_step(str(tmp_path / "weights" / "tiny_planted.safetensors"))  # the number in pytest's tmp_path
    assert any(f"First checkpoint with outliers: **step {step}** (from layer {PLANTED_LAYER}), checkpoint 1 of 2" in m.value
               for m in at.markdown)
    assert "1 files were not readable images and were skipped: notes.png" in at.warning[0].value
    heat = _figures(at)[0]
    assert heat["data"][0]["y"] == [f"step {step}", "random"]
    share = _values(heat["data"][0]["z"])
    assert share[0, PLANTED_LAYER:].min() == pytest.approx(100 * len(PLANTED_CELLS) / 64) and share[1].max() == 0


def test_a_sweep_started_from_the_sidebar_runs_in_the_background_and_opens(tmp_path, monkeypatch):
    """The real ``vitlens.sweep.run_sweep`` in a thread of the app process (embedded mode)."""
    _sweep_folders(tmp_path, monkeypatch)
    _assert_the_sweep_opened(_sweep_from_the_sidebar(), tmp_path)


def test_a_sweep_started_from_the_sidebar_in_hosted_mode_runs_on_the_worker(tmp_path, monkeypatch):
    """Hosted, the app queues the sweep; a worker (a thread here, so it knows the tiny models) runs it."""
    _sweep_folders(tmp_path, monkeypatch)
    monkeypatch.setenv("VITLENS_MODE", "hosted")
    monkeypatch.setenv("VITLENS_POLL_INTERVAL", "0.05")
    stop = threading.Event()
    worker = threading.Thread(target=lambda: Worker(Settings.from_env(), worker_id="page-worker").run(stop), daemon=True)
    worker.start()
    try:
        at = _sweep_from_the_sidebar()
    finally:
        stop.set()
        worker.join(30)
    note = json.loads((tmp_path / "results" / "from-app" / "_vitlens_app.json").read_text())
    status = JobQueue(Settings.from_env().queue_dir).status(note["job"])
    _assert_the_sweep_opened(at, tmp_path)
    assert (status.state, status.worker, status.done, status.total) == ("done", "page-worker", 6, 6)  # 3 files x 2 weights


def test_dataset_page_draws_the_folder_without_registers_first_whichever_is_chosen(folders):
    """Chosen: the clean model with registers, compared with the training run without: the run is drawn first in
    the colour of "without registers" everywhere, while the gallery stays the chosen folder's."""
    import sys

    sys.path.insert(0, str(APP))
    import figures

    at = _open("views/dataset.py", results="reg")
    at.selectbox(key="compare_folder").set_value("run").run()
    _ok(at)
    assert [m.label for m in at.metric] == ["run", "reg"]
    hist, share, grid = _figures(at)
    colours = [figures.ROLE_COLOURS[figures.WITHOUT_REGISTERS], figures.ROLE_COLOURS[figures.WITH_REGISTERS]]
    assert [(t["name"], t["line"]["color"]) for t in share["data"]] == list(zip(["run", "reg"], colours))
    assert [t["marker"]["color"] for t in hist["data"] if t["type"] == "bar"] == colours
    assert [a["text"] for a in grid["layout"]["annotations"]] == ["run", "reg"]
    assert all(": 0 outliers" in c.value for c in at.caption if "outliers (" in c.value)  # reg's gallery, not run's
