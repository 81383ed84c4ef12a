"""Cache keys that never serve a stale trace: capture version, library versions behind random and
synthetic weights, rewritten weights files (also in a long-running engine and worker), device."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import rewrite_keeping_size_and_times
from job_fixtures import MODEL, OPTIONS, image, job_settings
from vitlens.client import Client
from vitlens.engine import Engine
from vitlens.models import file_digest, load_model, resolve_spec, weights_fingerprint
from vitlens.store import CaptureOptions, TraceStore, trace_key

TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=56)


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    store = TraceStore(tmp_path / "traces")
    yield store
    store.close()


def _save_weights(path: Path, seed: int) -> None:
    """``test_vit`` weights that differ per seed; every seed gives a file of the same size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        save_file(timm.create_model(MODEL).state_dict(), str(path))


def _rewrite_keeping_size_and_times(path: Path, seed: int) -> None:
    replacement = path.with_name("replacement.safetensors")
    _save_weights(replacement, seed)
    rewrite_keeping_size_and_times(path, replacement.read_bytes())
    replacement.unlink()


def test_a_trace_cached_by_capture_version_1_is_not_served(store: TraceStore) -> None:
    """Version 1 stored bf16/fp16 captures whose prefix attention was computed in half precision."""
    engine = Engine(store, device="cpu")
    images = [image(1)]
    stale = engine.traces(images, MODEL, "random", OPTIONS)[0].trace
    store._cache.clear()
    model_key = engine.model_key(MODEL, "random")
    for precision in ("fp32", "bf16"):
        store.put(f"trace/v1/{model_key}/{images[0].digest}/side64/aa1/{precision}/states[]", stale)
        options = CaptureOptions(side=64, precision=precision)
        assert not engine.traces(images, MODEL, "random", options)[0].cached


@pytest.mark.parametrize("weights", ["random", "synthetic"])
@pytest.mark.parametrize("library", [torch, timm], ids=["torch", "timm"])
def test_random_and_synthetic_fingerprints_name_the_library_versions(weights, library, monkeypatch):
    """Seeded weights are whatever torch's generator and timm's initialisation make of the seed."""
    spec = resolve_spec("vit_small_patch14_dinov2")
    before = weights_fingerprint(spec, weights, TINY)
    monkeypatch.setattr(library, "__version__", library.__version__ + ".other")
    after = weights_fingerprint(spec, weights, TINY)
    assert after != before
    assert load_model(spec.name, weights, model_args=TINY).fingerprint == after


@pytest.mark.parametrize("how", ["in_place", "renamed_over"])
def test_file_digest_sees_a_same_size_rewrite_with_its_times_set_back(tmp_path: Path, how: str) -> None:
    path = tmp_path / "w.safetensors"
    _save_weights(path, seed=1)
    first = file_digest(path)
    if how == "in_place":
        _rewrite_keeping_size_and_times(path, seed=2)
    else:
        before = path.stat()
        other = tmp_path / "other.safetensors"
        _save_weights(other, seed=2)
        os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(other, path)
    assert file_digest(path) != first
    assert file_digest(path) == file_digest(tmp_path.joinpath("w.safetensors"))  # stable afterwards


def test_the_device_type_is_in_the_trace_key(store: TraceStore) -> None:
    images = [image(1)]
    cpu, cuda = Engine(store, device="cpu"), Engine(store, device="cpu")
    cuda.device = torch.device("cuda")  # no GPU here, but keys of random weights need no model
    cpu.traces(images, MODEL, "random", OPTIONS)
    assert cpu.trace_keys(images, MODEL, "random", OPTIONS) != cuda.trace_keys(images, MODEL, "random", OPTIONS)
    assert all(key not in store for key in cuda.trace_keys(images, MODEL, "random", OPTIONS))
    assert trace_key("m", "i", CaptureOptions(), "cpu") != trace_key("m", "i", CaptureOptions(), "cuda")


def test_a_long_running_engine_sees_a_same_size_rewrite_of_its_weights_file(tmp_path: Path, store: TraceStore) -> None:
    path = tmp_path / "w.safetensors"
    _save_weights(path, seed=1)
    engine = Engine(store, device="cpu")
    images = [image(1)]
    old = engine.traces(images, MODEL, str(path), OPTIONS)[0]
    assert not old.cached and engine.traces(images, MODEL, str(path), OPTIONS)[0].cached
    _rewrite_keeping_size_and_times(path, seed=2)
    new = engine.traces(images, MODEL, str(path), OPTIONS)[0]
    assert not new.cached
    fresh = Engine(None, device="cpu").traces(images, MODEL, str(path), OPTIONS)[0].trace
    np.testing.assert_array_equal(new.trace.norms, fresh.norms)
    assert not np.allclose(new.trace.norms, old.trace.norms)


def test_a_long_running_worker_and_client_see_a_same_size_rewrite_of_their_weights_file(tmp_path: Path) -> None:
    """The client joins a done job with the same id, so the id must change with the file's content."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    _save_weights(weights_dir / "w.safetensors", seed=1)
    client = Client(job_settings(tmp_path, weights_dir=weights_dir))  # embedded: a worker thread of its own
    try:
        old = client.compute_traces([image(1)], MODEL, "w.safetensors", OPTIONS)[0]
        assert not old.cached and client.compute_traces([image(1)], MODEL, "w.safetensors", OPTIONS)[0].cached
        _rewrite_keeping_size_and_times(weights_dir / "w.safetensors", seed=2)
        new = client.compute_traces([image(1)], MODEL, "w.safetensors", OPTIONS)[0]
    finally:
        client.close()
    assert not new.cached and not np.allclose(new.trace.norms, old.trace.norms)
