"""Sweeps: a generated checkpoint series with planted emergence, reruns after SIGKILL, failed images, CLI, Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import torch

from vitlens.analysis.population import read_results
from vitlens.analysis.redundancy import results_redundancy
from vitlens.cli import main
from vitlens.capture import capture
from vitlens.errors import ResultsError
from vitlens.images import read_image_file, resize_for_model, to_tensor
from vitlens.models import load_model
from vitlens.store import CaptureOptions, TraceStore, trace_key
from vitlens.sweep import NORM_HIST_EDGES, SCHEMA, checkpoint_step, norm_histograms, run_sweep
from vitlens.synthetic import plant

from conftest import PLANTED_ARGS, PLANTED_CELLS, PLANTED_LAYER, TINY_ARGS, image_bytes, photo

PLAIN, REG = "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"
STEPS = (0, 12500, 25000, 37500, 39999)
EMERGES_AT = 25000
KEY = ["model", "weights", "image", "layer"]


def _images(folder: Path, count: int, side: int = 64) -> Path:
    for index in range(count):
        sub = folder / ("a" if index % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{index:02d}.png").write_bytes(image_bytes(photo(side, side, seed=index)))
    return folder


def _series(run: Path) -> str:
    """DINOv2-style training run: ``training_<step>/teacher_checkpoint.pth``, outliers planted from ``EMERGES_AT`` on."""
    for step in STEPS:
        model = load_model(PLAIN, "random", model_args=PLANTED_ARGS).model
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        if step >= EMERGES_AT:
            plant(model, PLANTED_CELLS, PLANTED_LAYER)
        path = run / f"training_{step}" / "teacher_checkpoint.pth"
        path.parent.mkdir(parents=True)
        torch.save({"teacher": {f"backbone.{key}": value for key, value in model.state_dict().items()}}, path)
    return str(run / "training_*" / "teacher_checkpoint.pth")


def _read(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out)


def test_checkpoint_series_finds_the_emergence_step_and_block(tmp_path):
    images = _images(tmp_path / "images", 3)
    summary = run_sweep(images, [PLAIN], [_series(tmp_path / "run")], tmp_path / "out", batch=2, model_args=PLANTED_ARGS)
    assert [entry["step"] for entry in summary.checkpoints] == list(STEPS)
    for entry in summary.checkpoints:
        assert entry["first_layer_with_outliers"] == (PLANTED_LAYER if entry["step"] >= EMERGES_AT else None), entry
    assert summary.rows == len(STEPS) * 3 * PLANTED_ARGS["depth"] and summary.computed == len(STEPS) * 3
    rows = _read(tmp_path / "out")
    planted = sorted(row * 8 + col for row, col in PLANTED_CELLS)
    late = rows[(rows.step >= EMERGES_AT) & (rows.layer >= PLANTED_LAYER)]
    assert all(sorted(cells) == planted for cells in late.outlier_cells)
    assert (rows[(rows.step < EMERGES_AT) | (rows.layer < PLANTED_LAYER)].num_outliers == 0).all()
    assert np.allclose(late.outlier_fraction, len(PLANTED_CELLS) / 64)
    assert set(rows.image) == {"a/img01.png", "b/img00.png", "b/img02.png"}
    assert rows.weights.str.endswith("teacher_checkpoint.pth").all() and rows.fingerprint.str.startswith("file:").all()

    found = results_redundancy(read_results(tmp_path / "out", ("outlier_cells", "neighbor_similarity")), PLANTED_LAYER)
    for (_, weights), result in found.items():
        step = checkpoint_step(weights)
        assert result.num_images == 3 and result.outlier.size == (3 * len(PLANTED_CELLS) if step >= EMERGES_AT else 0)
        assert (result.auroc is not None) == (step >= EMERGES_AT) and result.outlier.size + result.normal.size == 3 * 64
    with pytest.raises(ResultsError, match="no layer 99"):
        results_redundancy(rows, 99)
    with pytest.raises(ResultsError, match="no neighbour similarity"):
        results_redundancy(rows.assign(neighbor_similarity=None), PLANTED_LAYER)  # a folder swept before the column


def test_rows_follow_the_schema(tmp_path):
    images = _images(tmp_path / "images", 2)
    run_sweep(images, [REG], ["random"], tmp_path / "out", model_args=TINY_ARGS)
    table = ds.dataset(str(tmp_path / "out")).to_table()
    assert table.schema.equals(SCHEMA)
    rows = table.to_pandas()
    assert len(rows) == 2 * TINY_ARGS["depth"] and rows.step.isna().all() and (rows.weights == "random").all()
    assert (rows.num_registers == 4).all() and rows.register_norm.notna().all() and rows.cls_norm.gt(0).all()
    assert (rows.grid_rows == 4).all() and (rows.grid_cols == 4).all() and (rows["size"] == 56).all()
    assert all(np.sum(hist) == 16 for hist in rows.norm_hist)
    assert rows.threshold.isna().all() and (rows.num_outliers == 0).all()
    assert (rows.norm_max >= rows.norm_median).all()
    first = rows[rows.layer == 0]
    assert all(len(values) == 16 and np.all(np.abs(values) <= 1) for values in first.neighbor_similarity)
    assert rows[rows.layer > 0].neighbor_similarity.isna().all()


def test_norm_histogram_clips_into_the_end_bins():
    norms = np.array([[1e-5, 0.5, 1.0, 1.0, 2e4], [3.0] * 5])
    counts = norm_histograms(norms)
    assert counts.shape == (2, len(NORM_HIST_EDGES) - 1) and counts.sum(axis=1).tolist() == [5, 5]
    assert counts[0, 0] == 1 and counts[0, -1] == 1
    assert counts[0, np.searchsorted(NORM_HIST_EDGES, 1.0, side="right") - 1] == 2


def test_step_is_the_last_integer_in_the_path():
    assert checkpoint_step("run/eval/training_39999/teacher_checkpoint.pth") == 39999
    assert checkpoint_step("ckpt/model_0012500.pth") == 12500
    assert checkpoint_step("final.pth") is None and checkpoint_step("random") is None


def test_unreadable_files_are_listed_and_the_rest_is_complete(tmp_path):
    images = _images(tmp_path / "images", 3)
    good = (images / "b" / "img00.png").read_bytes()
    (images / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "notes.txt").write_text("not an image")
    out = images / "results"  # inside IMAGES: its own files are never taken for images
    first = run_sweep(images, [PLAIN], ["random"], out, model_args=TINY_ARGS, batch=2)
    assert sorted(entry["image"] for entry in first.failed) == ["b/truncated.png", "notes.txt"]
    assert all(entry["reason"] for entry in first.failed)
    assert first.computed == 3 and first.rows == 3 * TINY_ARGS["depth"]
    again = run_sweep(images, [PLAIN], ["random"], out, model_args=TINY_ARGS, batch=2)
    assert again.computed == 0 and again.skipped == 3 and again.rows == first.rows


def test_cached_traces_are_reused(tmp_path, monkeypatch):
    images = _images(tmp_path / "images", 1)
    store = TraceStore(tmp_path / "cache")
    loaded = load_model(PLAIN, "random", model_args=TINY_ARGS)
    decoded = read_image_file(images / "b" / "img00.png")
    pixels = to_tensor(resize_for_model(decoded.image, 56, loaded.patch_size), loaded.mean, loaded.std)[None]
    trace = capture(loaded, pixels)[0]
    trace.norms[:] = 7.0  # a marked trace: rows can only come from it
    store.put(trace_key(loaded.key, decoded.digest, CaptureOptions(), "cpu"), trace)  # the key the app's Engine uses
    monkeypatch.setattr("vitlens.sweep.capture", lambda *args, **kwargs: pytest.fail("captured although cached"))
    run_sweep(images, [PLAIN], ["random"], tmp_path / "out", store=store, model_args=TINY_ARGS)
    assert (_read(tmp_path / "out").norm_median == 7.0).all()


def test_cli_several_models_and_json(tmp_path, capsys):
    images = _images(tmp_path / "images", 2)
    args = ["sweep", str(images), "--model", PLAIN, REG, "--weights", "random", "--size", "28", "--out", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"rows", "computed", "skipped", "images_per_s", "failed", "checkpoints"}
    assert summary["rows"] == 2 * 2 * 12 and summary["computed"] == 4 and summary["skipped"] == 0
    assert summary["images_per_s"] > 0 and summary["failed"] == []
    assert [(c["model"], c["weights"], c["step"]) for c in summary["checkpoints"]] == [(PLAIN, "random", None), (REG, "random", None)]
    rows = _read(tmp_path / "out")
    assert rows.groupby("model").num_registers.first().to_dict() == {PLAIN: 0, REG: 4}
    assert rows[rows.model == PLAIN].register_norm.isna().all()
    assert not rows.duplicated(KEY).any()


@pytest.mark.parametrize("args, message", [
    (["--model", PLAIN, "--weights", "random"], "No image files"),
    (["--model", PLAIN, "--weights", "nothing/*.pth"], "No weights files match"),
    (["--model", "no_such_vit", "--weights", "random"], "Unknown model"),
    (["--model", PLAIN, "--weights", "random", "--threshold", "-1"], "Threshold"),
    (["--model", PLAIN, "--weights", "random", "--size", "28"], "No readable image"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    images = tmp_path / "images"
    images.mkdir()
    if message == "No readable image":
        (images / "notes.txt").write_text("not an image")
    elif message != "No image files":
        _images(images, 1)
    assert main(["sweep", str(images), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if message == "No readable image":  # found only after trying: the progress bar came first
        err = [line for line in err if not line.startswith("sweep:")]
    assert len(err) == 1 and message in err[0], err


def test_glob_of_images_names_them_below_the_glob_root(tmp_path):
    images = _images(tmp_path / "images", 3)
    summary = run_sweep(str(images / "**" / "*.png"), [PLAIN], ["random"], tmp_path / "out", model_args=TINY_ARGS)
    assert summary.computed == 3
    assert set(_read(tmp_path / "out").image) == {"a/img01.png", "b/img00.png", "b/img02.png"}


_KILLABLE = """
import sys, time
import vitlens.sweep as sweep
original = sweep.SweepRunner.run
def slow(self, task, prepared=None):
    result = original(self, task, prepared)
    time.sleep(0.3)
    return result
sweep.SweepRunner.run = slow
sweep.run_sweep(sys.argv[1], ["vit_small_patch14_dinov2"], ["random"], sys.argv[2], batch=1,
                model_args=dict(depth=4, embed_dim=64, num_heads=4, img_size=56))
"""


@pytest.mark.slow
def test_sigkill_then_rerun_writes_every_row_exactly_once(tmp_path):
    images = _images(tmp_path / "images", 10)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(images), str(out)], env=env)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.parquet"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = len(_read(out)) // TINY_ARGS["depth"]
    assert 3 <= before < 10, before  # killed part-way
    summary = run_sweep(images, [PLAIN], ["random"], out, batch=1, model_args=TINY_ARGS)
    assert summary.skipped == before and summary.computed == 10 - before
    rows = _read(out)
    assert len(rows) == 10 * TINY_ARGS["depth"] and not rows.duplicated(KEY).any()


@pytest.mark.slow
def test_ray_engine_gives_the_same_rows_as_the_local_engine(tmp_path):
    images = _images(tmp_path / "images", 3)
    series = _series(tmp_path / "run")
    common = dict(batch=2, model_args=PLANTED_ARGS)
    run_sweep(images, [PLAIN], [series], tmp_path / "local", **common)
    summary = run_sweep(images, [PLAIN], [series], tmp_path / "ray", engine="ray", **common)
    assert summary.computed == len(STEPS) * 3
    local, ray = (_read(tmp_path / name).sort_values(KEY).reset_index(drop=True) for name in ("local", "ray"))
    lists = ["outlier_cells", "norm_hist"]
    pd.testing.assert_frame_equal(local.drop(columns=lists), ray.drop(columns=lists))
    for column in lists:
        assert [list(value) for value in local[column]] == [list(value) for value in ray[column]]
    assert ray.num_outliers.sum() > 0


def test_should_stop_ends_after_the_running_batch_and_progress_counts_up(tmp_path):
    images = _images(tmp_path / "images", 5)
    calls = []
    stopped = run_sweep(images, [PLAIN], ["random"], tmp_path / "out", batch=2, model_args=TINY_ARGS,
                        progress=lambda done, total: calls.append((done, total)), should_stop=lambda: True)
    assert stopped.stopped and stopped.computed == 2 and calls == [(0, 5), (2, 5)]
    calls.clear()
    rest = run_sweep(images, [PLAIN], ["random"], tmp_path / "out", batch=2, model_args=TINY_ARGS,
                     progress=lambda done, total: calls.append((done, total)))
    assert not rest.stopped and (rest.computed, rest.skipped) == (3, 2) and calls == [(0, 3), (2, 3), (3, 3)]
