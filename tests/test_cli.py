"""The command line contract of DESIGN.md: ``python -m vitlens inspect|models``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from app_fixtures import TINY, TINY_GAP, register_tiny_models
from vitlens.cli import main
from vitlens.models import PRESETS, load_model

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"model", "weights", "image", "size", "grid", "num_prefix_tokens", "num_registers", "cached", "layers"}
LAYER_KEYS = {"layer", "norm_median", "norm_max", "threshold", "num_outliers", "outliers"}
NPZ = {  # name: (dtype kind, rank)
    "norms": ("float32", 2), "final_norms": ("float32", 1), "attention": ("float32", 4), "outliers": ("bool", 3),
    "thresholds": ("float32", 1), "grid": (None, 1), "num_prefix_tokens": (None, 0), "num_registers": (None, 0),
}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _inspect_json(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, "inspect", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def image(png_file):
    return png_file(64, 48)


def test_inspect_json_has_the_contract_keys(capsys, image):
    summary = _inspect_json(capsys, image, "--model", "vit_tiny_patch16_224", "--weights", "random")
    assert TOP_KEYS <= set(summary)
    assert summary["model"] == "vit_tiny_patch16_224" and summary["weights"] == "random"
    assert summary["image"] == str(image)
    assert summary["grid"] == [10, 14] and summary["size"] == 224  # 64x48 -> 224x168 px
    assert summary["num_prefix_tokens"] == 1 and summary["num_registers"] == 0
    assert summary["cached"] is False
    assert [layer["layer"] for layer in summary["layers"]] == list(range(12))
    for layer in summary["layers"]:
        assert set(layer) >= LAYER_KEYS
        assert 0 < layer["norm_median"] <= layer["norm_max"]
        assert layer["num_outliers"] == len(layer["outliers"])
    again = _inspect_json(capsys, image, "--model", "vit_tiny_patch16_224", "--weights", "random")
    assert again["cached"] is True
    assert again["layers"] == summary["layers"]


def test_save_writes_exactly_the_contract_arrays(capsys, image, tmp_path):
    out = tmp_path / "out.npz"
    summary = _inspect_json(capsys, image, "--model", "vit_small_patch14_reg4_dinov2", "--weights", "random",
                            "--size", "70", "--save", out)
    arrays = np.load(out)
    assert set(arrays.files) == set(NPZ)
    for name, (dtype, rank) in NPZ.items():
        assert arrays[name].ndim == rank, name
        if dtype is not None:
            assert arrays[name].dtype == np.dtype(dtype), name
    grid = arrays["grid"].tolist()
    assert grid == summary["grid"] == [4, 5]  # 64x48 -> 56x70 px (height x width) at patch 14
    layers, tokens = arrays["norms"].shape
    prefix = int(arrays["num_prefix_tokens"])
    assert (prefix, int(arrays["num_registers"])) == (5, 4)
    assert layers == 12 and tokens == prefix + grid[0] * grid[1]
    assert arrays["final_norms"].shape == (tokens,)
    assert arrays["attention"].shape == (layers, 6, prefix, tokens)
    np.testing.assert_allclose(arrays["attention"].sum(-1), 1.0, atol=1e-5)
    assert arrays["outliers"].shape == (layers, *grid) and arrays["thresholds"].shape == (layers,)
    for index, layer in enumerate(summary["layers"]):
        assert arrays["norms"][index, prefix:].max() == pytest.approx(layer["norm_max"])
        assert int(arrays["outliers"][index].sum()) == layer["num_outliers"]


def test_save_and_json_say_when_there_is_no_per_token_final_norm(capsys, image, tmp_path):
    """An average-pooled model (fc_norm after pooling) has no per-token final norm: ``final_norms``
    keeps its contract shape but is all NaN, and ``--json`` says ``has_final_norm: false``."""
    register_tiny_models()
    out = tmp_path / "gap.npz"
    summary = _inspect_json(capsys, image, "--model", TINY_GAP, "--weights", "random", "--save", out)
    arrays = np.load(out)
    assert summary["has_final_norm"] is False
    assert arrays["final_norms"].shape == (arrays["norms"].shape[1],) and np.isnan(arrays["final_norms"]).all()
    assert set(arrays.files) == set(NPZ) and arrays["final_norms"].dtype == np.float32
    plain = _inspect_json(capsys, image, "--model", TINY, "--weights", "random", "--save", out)
    assert plain["has_final_norm"] is True and np.isfinite(np.load(out)["final_norms"]).all()


def test_planted_outliers_through_the_cli(capsys, plant, make_photo, encode, tmp_path):
    planted = plant(load_model("test_vit", "random"), cells=[(1, 2), (9, 0), (4, 7)], layer=2)
    weights = tmp_path / "planted.safetensors"
    save_file(planted.loaded.model.state_dict(), str(weights))
    image = tmp_path / "square.png"
    image.write_bytes(encode(make_photo(80, 80, seed=3)))  # square: the model's own 10x10 grid
    out = tmp_path / "planted.npz"
    summary = _inspect_json(capsys, image, "--model", "test_vit", "--weights", weights, "--save", out)
    assert summary["grid"] == [10, 10] and summary["weights"] == str(weights)
    assert summary["first_outlier_layer"] == 2
    for layer in summary["layers"]:
        expected = sorted(map(list, planted.cells)) if layer["layer"] >= 2 else []
        assert sorted(layer["outliers"]) == expected, layer
        assert (layer["threshold"] is None) == (layer["layer"] < 2)
        assert layer["auto"]["accepted"] == (layer["layer"] >= 2) and layer["auto"]["measure"] == "tail p-value"
        assert layer["threshold_reason"].startswith("no separate high mode" if layer["layer"] < 2 else "gap ")
    assert np.array_equal(np.load(out)["outliers"][2:], np.broadcast_to(planted.mask(), (4, 10, 10)))


def test_fixed_threshold(capsys, image):
    summary = _inspect_json(capsys, image, "--model", "test_vit", "--weights", "random", "--threshold", "1.5")
    for layer in summary["layers"]:
        assert layer["threshold"] == 1.5
        assert layer["num_outliers"] == (len(layer["outliers"]))
    assert any(layer["num_outliers"] > 0 for layer in summary["layers"])


def test_table_output(capsys, image):
    code, out, err = _run(capsys, "inspect", image, "--model", "test_vit", "--weights", "random", "--no-antialias")
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert "test_vit" in lines[0] and "grid [8, 10]" in lines[0]
    assert lines[1].split() == ["layer", "median", "max", "threshold", "outliers"]
    assert [line.split()[0] for line in lines[2:]] == [str(i) for i in range(6)]


def test_models_lists_the_presets(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert names == list(PRESETS)
    assert "dinov2_vitg14_reg4" in out and "vit_giant_patch14_reg4_dinov2" in out


def _bad_inputs(tmp_path: Path, image: Path) -> dict[str, list[str]]:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(os.urandom(512))
    base = [str(image), "--model", "test_vit", "--weights", "random"]
    return {
        "missing image": ["inspect", str(tmp_path / "missing.png"), "--model", "test_vit", "--weights", "random"],
        "non-image file": ["inspect", str(text), "--model", "test_vit", "--weights", "random"],
        "unknown model": ["inspect", str(image), "--model", "vit_nonexistent_model", "--weights", "random"],
        "bad weights file": ["inspect", str(image), "--model", "test_vit", "--weights", str(weights)],
        "missing weights file": ["inspect", str(image), "--model", "test_vit", "--weights", str(tmp_path / "no.pth")],
        "threshold banana": ["inspect", *base, "--threshold", "banana"],
        "size off the patch grid": ["inspect", str(image), "--model", "vit_small_patch14_dinov2", "--weights", "random",
                                    "--size", "225"],
        "size too large": ["inspect", *base, "--size", "100000"],
        "unreachable hub": ["inspect", str(image), "--model", "dinov2_vits14", "--weights", "hub"],
        "unwritable save": ["inspect", *base, "--save", str(tmp_path / "no" / "such" / "dir" / "out.npz")],
    }


@pytest.mark.parametrize("case", ["missing image", "non-image file", "unknown model", "bad weights file",
                                  "missing weights file", "threshold banana", "size off the patch grid",
                                  "size too large", "unreachable hub", "unwritable save"])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, image, case):
    code, out, err = _run(capsys, *_bad_inputs(tmp_path, image)[case])
    message = _one_line_error(code, err)
    assert out == ""
    if case == "unreachable hub":
        assert "pre-fetch" in message


def _python_m_vitlens(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitlens", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ), **kwargs)


@pytest.mark.slow
def test_python_m_vitlens_inspect_twice(image):
    args = ("inspect", image, "--model", "vit_tiny_patch16_224", "--weights", "random", "--json")
    first = _python_m_vitlens(*args)
    assert first.returncode == 0, first.stderr
    second = _python_m_vitlens(*args)
    assert second.returncode == 0, second.stderr
    assert json.loads(first.stdout)["cached"] is False
    assert json.loads(second.stdout)["cached"] is True


@pytest.mark.slow
@pytest.mark.parametrize("case", ["non-image file", "unreachable hub"])
def test_python_m_vitlens_bad_input_has_no_traceback(tmp_path, image, case):
    result = _python_m_vitlens(*_bad_inputs(tmp_path, image)[case])
    _one_line_error(result.returncode, result.stderr)
    assert result.stdout == ""


def _special_path(tmp_path: Path, kind: str, name: str) -> Path:
    path = tmp_path / name
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder"])
def test_special_image_paths_are_refused_at_once(capsys, tmp_path, kind):
    path = _special_path(tmp_path, kind, "picture.png")
    code, out, err = _run(capsys, "inspect", path, "--model", "test_vit", "--weights", "random")
    assert "not a regular file" in _one_line_error(code, err) and out == ""


@pytest.mark.parametrize("target", ["folder", "dev_full", "no_suffix", "fifo"])
def test_save_refuses_targets_numpy_would_rename_or_cannot_take(capsys, tmp_path, image, target):
    save = {"folder": tmp_path, "dev_full": Path("/dev/full"), "no_suffix": tmp_path / "arrays.txt",
            "fifo": tmp_path / "arrays.npz"}[target]
    if target == "fifo":
        os.mkfifo(save)
    before = set(tmp_path.iterdir())
    code, out, err = _run(capsys, "inspect", image, "--model", "test_vit", "--weights", "random", "--save", save)
    assert "--save" in _one_line_error(code, err) and out == ""
    assert set(tmp_path.iterdir()) == before and not Path("/dev/full.npz").exists()


def test_save_reports_the_path_it_wrote(capsys, tmp_path, image):
    out = tmp_path / "arrays.npz"
    summary = _inspect_json(capsys, image, "--model", "test_vit", "--weights", "random", "--save", out)
    assert summary["saved"] == str(out.resolve()) and out.is_file()
    code, table, _ = _run(capsys, "inspect", image, "--model", "test_vit", "--weights", "random", "--save", out)
    assert code == 0 and table.strip().splitlines()[-1] == f"arrays saved to {out.resolve()}"


@pytest.mark.parametrize("setting, argv_tail", [
    ({"VITLENS_CACHE_SIZE": "abc"}, ()),
    ({"VITLENS_MAX_SIDE": "-5"}, ()),
    ({"VITLENS_DEVICE": "bogus"}, ()),
    ({"VITLENS_JOB_TIMEOUT": "nan"}, ()),
    ({}, ("worker", "--device", "bogus")),
    ({}, ("worker", "--device", "cuda:7")),
])
def test_bad_settings_are_one_line_errors(capsys, monkeypatch, image, setting, argv_tail):
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    argv = argv_tail or ("inspect", image, "--model", "test_vit", "--weights", "random")
    code, out, err = _run(capsys, *argv)
    message = _one_line_error(code, err)
    assert "unexpectedly" not in message and out == ""
