"""Register-neuron finder and the ``neurons`` CLI: planted neurons rank first; bad neuron files are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PLANTED_CELLS, PLANTED_LAYER, random_pixels
from vitlens.analysis.neurons import RegisterNeurons, neuron_maps, parse_neurons, read_neurons, score_neurons
from vitlens.cli import main
from vitlens.errors import NeuronFileError, OptionError


def test_planted_neurons_rank_first(planted):
    scores = score_neurons(planted.loaded, [random_pixels(planted.loaded, seed, batch=2) for seed in range(2)])
    top = scores.top(3)
    assert [(n.layer, n.neuron) for n in top[:2]] == [(PLANTED_LAYER, 0), (PLANTED_LAYER, 1)]
    assert top[1].score > 10 * top[2].score  # far ahead of every unplanted neuron
    assert scores.num_images == scores.images_with_outliers == 4
    assert scores.detector_layer == 4 and scores.scores.shape[0] == 5  # second-to-last of 6 blocks; blocks 0-4


def test_sparsity_filter_and_max_layer(planted):
    pixels = random_pixels(planted.loaded, batch=2)
    sparse = score_neurons(planted.loaded, [pixels], sparse=True)
    assert (sparse.top(1)[0].layer, sparse.top(1)[0].neuron) == (PLANTED_LAYER, 0)
    assert (sparse.scores <= score_neurons(planted.loaded, [pixels]).scores + 1e-6).all()  # the filter only removes
    early = score_neurons(planted.loaded, [pixels], max_layer=PLANTED_LAYER - 1)
    assert early.scores.shape[0] == PLANTED_LAYER and early.top(1)[0].score < 5  # the planted block is not scored


def test_images_without_outliers_do_not_count(planted):
    scores = score_neurons(planted.loaded, [random_pixels(planted.loaded, batch=2)], threshold=1e6)
    assert scores.images_with_outliers == 0 and scores.num_images == 2


def test_layer_out_of_range_is_an_option_error(planted):
    with pytest.raises(OptionError):
        score_neurons(planted.loaded, [random_pixels(planted.loaded)], detector_layer=6)


def test_neuron_map_lights_up_the_planted_cells(planted):
    maps = neuron_maps(planted.loaded, random_pixels(planted.loaded), [(PLANTED_LAYER, 0), (0, 5)])
    assert maps.shape == (2, 8, 8)
    assert set(map(tuple, np.argwhere(maps[0] > 10))) == set(PLANTED_CELLS)


@pytest.mark.parametrize("data", [
    [], {"model": "m"}, {"model": "m", "neurons": []}, {"model": "m", "neurons": [3]},
    {"model": "m", "neurons": [{"layer": -1, "neuron": 0}]}, {"model": "m", "neurons": [{"layer": 1, "neuron": True}]},
    {"model": "m", "neurons": [{"layer": 1, "neuron": 2, "score": "high"}]},
])
def test_malformed_neuron_lists_are_refused(data):
    with pytest.raises(NeuronFileError):
        parse_neurons(data)


def test_neuron_file_round_trip_and_garbage(tmp_path):
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"model": "m", "weights": "hub", "neurons": [{"layer": 2, "neuron": 7, "score": 1.5}]}))
    assert read_neurons(path).pairs() == ((2, 7),)
    path.write_bytes(b"\xff{not json")
    with pytest.raises(NeuronFileError, match="not valid JSON"):
        read_neurons(path)
    with pytest.raises(NeuronFileError, match="Cannot read"):
        read_neurons(tmp_path / "missing.json")


def test_wrong_architecture_is_refused():
    neurons = RegisterNeurons(model="dinov2_vits14", weights="hub", neurons=())
    neurons.check_model("vit_small_patch14_dinov2")  # the preset's architecture, named by timm
    with pytest.raises(NeuronFileError, match="found on"):
        neurons.check_model("vit_tiny_patch16_224")


# The CLI on the synthetic demo weights of a small timm ViT: outliers planted from block 6 of 12, neurons 0 and 1.
MODEL = ("--model", "vit_tiny_patch16_224", "--weights", "synthetic")


@pytest.fixture
def folder(tmp_path, png_file):
    for seed in range(3):
        png_file(224, 224, seed, name=f"img{seed}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_cli_neurons_contract(capsys, folder, tmp_path):
    out_file = tmp_path / "neurons.json"
    code, out, err = _run(capsys, "neurons", folder, *MODEL, "--top", "4", "--out", out_file, "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert set(printed) == {"model", "weights", "neurons"} and json.loads(out_file.read_text()) == printed
    assert printed["model"] == "vit_tiny_patch16_224" and printed["weights"] == "synthetic"
    assert [(n["layer"], n["neuron"]) for n in printed["neurons"][:2]] == [(6, 0), (6, 1)]
    assert len(printed["neurons"]) == 4 and all(set(n) == {"layer", "neuron", "score"} for n in printed["neurons"])
    scores = [n["score"] for n in printed["neurons"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("argv, words", [
    (("nowhere/*.png", *MODEL), "No image files"),
    (("{folder}", "--model", "no_such_vit", "--weights", "random"), "Unknown model"),
    (("{folder}", *MODEL, "--threshold", "1e9"), "No image has outliers"),
    (("{folder}", *MODEL, "--max-layer", "12"), "max layer"),
    (("{folder}", *MODEL, "--top", "0"), "at least 1"),
])
def test_cli_neurons_bad_input(capsys, folder, argv, words):
    argv = [str(folder) if arg == "{folder}" else arg for arg in argv]
    code, _, err = _run(capsys, "neurons", *argv)
    assert words in _one_line_error(code, err)


@pytest.mark.slow
def test_cli_test_time_register(capsys, folder, tmp_path):
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"model": "vit_tiny_patch16_224", "weights": "synthetic",
                                   "neurons": [{"layer": 6, "neuron": 0, "score": 1.0}, {"layer": 6, "neuron": 1, "score": 1.0}]}))
    image, npz = folder / "img0.png", tmp_path / "out.npz"
    code, out, err = _run(capsys, "inspect", image, *MODEL, "--json")
    assert code == 0, err
    assert [layer["num_outliers"] for layer in json.loads(out)["layers"]][6:] == [4] * 6  # the demo's planted cells
    code, out, err = _run(capsys, "inspect", image, *MODEL, "--test-time-register", neurons, "--json", "--save", npz)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_registers"] == 1 and summary["num_prefix_tokens"] == 2
    assert all(layer["num_outliers"] == 0 for layer in summary["layers"])
    arrays = np.load(npz)
    assert arrays["norms"].shape == (12, 2 + 196) and arrays["attention"].shape == (12, 3, 2, 198)
    assert (arrays["norms"][6:, 1] > 5 * arrays["norms"][6:, 2:].max(axis=1)).all()  # the register holds the high norm
    assert int(arrays["num_registers"]) == 1


@pytest.mark.parametrize("content, words", [
    ("{garbage", "not valid JSON"),
    (json.dumps({"model": "vit_small_patch14_dinov2", "weights": "hub", "neurons": [{"layer": 1, "neuron": 1}]}), "found on"),
    (json.dumps({"model": "vit_tiny_patch16_224", "weights": "x", "neurons": [{"layer": 12, "neuron": 1}]}), "block 12"),
    (json.dumps({"model": "vit_tiny_patch16_224", "weights": "x", "neurons": [{"layer": 3, "neuron": 768}]}), "neuron 768"),
])
def test_cli_bad_neuron_files(capsys, png_file, tmp_path, content, words):
    neurons = tmp_path / "n.json"
    neurons.write_text(content)
    code, _, err = _run(capsys, "inspect", png_file(), *MODEL, "--test-time-register", neurons)
    assert words in _one_line_error(code, err)
