"""The engine: batching by input shape, order, progress, model cache, out-of-memory retries."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitlens.engine
from vitlens.capture import capture
from vitlens.engine import Engine, resolve_device
from vitlens.errors import HubUnavailableError, OptionError
from vitlens.images import decode_image, resize_for_model, to_tensor
from vitlens.models import load_model
from vitlens.store import CaptureOptions, TraceStore

MODEL = "test_vit"  # timm's own tiny ViT, buildable by name alone (160 px, patch 16)


@pytest.fixture
def store(tmp_path):
    store = TraceStore(tmp_path / "traces")
    yield store
    store.close()


def _image(make_photo, encode, width: int, height: int, seed: int):
    return decode_image(encode(make_photo(width, height, seed=seed)), name=f"{width}x{height}_{seed}.png")


def test_mixed_sizes_keep_order_and_grid(store, make_photo, encode):
    sizes = [(64, 64), (64, 32), (64, 64), (32, 64), (64, 32)]
    images = [_image(make_photo, encode, w, h, seed) for seed, (w, h) in enumerate(sizes)]
    progress = []
    results = Engine(store, device="cpu", max_batch=2).traces(images, MODEL, "random", CaptureOptions(side=96),
                                                              progress=lambda done, total: progress.append((done, total)))
    grids = [result.trace.layout.grid for result in results]
    assert grids == [(6, 6), (3, 6), (6, 6), (6, 3), (3, 6)]
    assert progress[0] == (0, 5) and progress[-1] == (5, 5)
    assert all(b[0] >= a[0] for a, b in zip(progress, progress[1:]))
    loaded = load_model(MODEL, "random")
    for image, result in zip(images, results):
        pixels = to_tensor(resize_for_model(image.image, 96, 16), loaded.mean, loaded.std)[None]
        expected = capture(loaded, pixels)[0]
        np.testing.assert_allclose(result.trace.norms, expected.norms, rtol=1e-5)
        np.testing.assert_allclose(result.trace.attention, expected.attention, rtol=1e-4, atol=1e-6)


def test_partial_hits_only_compute_the_rest(store, make_photo, encode, monkeypatch):
    images = [_image(make_photo, encode, 48, 48, seed) for seed in range(4)]
    engine = Engine(store, device="cpu")
    engine.traces(images[:2], MODEL, "random")
    batches = []
    original = vitlens.engine.capture
    monkeypatch.setattr(vitlens.engine, "capture", lambda loaded, pixels, **kw: batches.append(len(pixels)) or original(loaded, pixels, **kw))
    progress = []
    results = engine.traces(images, MODEL, "random", progress=lambda done, total: progress.append(done))
    assert [r.cached for r in results] == [True, True, False, False]
    assert batches == [2] and progress == [2, 4]


def test_default_side_is_the_models_own(store, make_photo, encode):
    result = Engine(store, device="cpu").traces([_image(make_photo, encode, 80, 40, 0)], MODEL, "random")[0]
    assert result.trace.input_size == (80, 160)  # longer side 160 = test_vit's native size


def test_without_a_store_nothing_is_cached(make_photo, encode):
    engine = Engine(None, device="cpu")
    images = [_image(make_photo, encode, 32, 32, 0)]
    assert not engine.traces(images, MODEL, "random")[0].cached
    assert not engine.traces(images, MODEL, "random")[0].cached


def test_batching_does_not_change_results(make_photo, encode):
    images = [_image(make_photo, encode, 48, 48, seed) for seed in range(5)]
    one = Engine(None, device="cpu", max_batch=1).traces(images, MODEL, "random")
    many = Engine(None, device="cpu", max_batch=4).traces(images, MODEL, "random")
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.trace.norms, b.trace.norms, rtol=1e-5)
        np.testing.assert_allclose(a.trace.attention, b.trace.attention, rtol=1e-4, atol=1e-6)


def test_out_of_memory_halves_the_batch(make_photo, encode, monkeypatch):
    images = [_image(make_photo, encode, 32, 32, seed) for seed in range(5)]
    original = vitlens.engine.capture
    sizes = []

    def small_memory(loaded, pixels, **kwargs):
        sizes.append(len(pixels))
        if len(pixels) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(loaded, pixels, **kwargs)

    monkeypatch.setattr(vitlens.engine, "capture", small_memory)
    results = Engine(None, device="cpu", max_batch=8).traces(images, MODEL, "random")
    assert sizes[:3] == [5, 4, 2] and all(size <= 2 for size in sizes[2:])
    assert len(results) == 5 and all(r.trace.layout.grid == (10, 10) for r in results)


def test_out_of_memory_at_batch_one_is_raised(make_photo, encode, monkeypatch):
    def no_memory(loaded, pixels, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(vitlens.engine, "capture", no_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Engine(None, device="cpu", max_batch=4).traces([_image(make_photo, encode, 32, 32, 0)] * 3, MODEL, "random")


def test_models_are_kept_in_a_small_lru():
    engine = Engine(None, device="cpu", max_models=1)
    first = engine.model(MODEL, "random")
    assert engine.model(MODEL, "random") is first
    engine.model("test_vit2", "random")
    assert engine.model(MODEL, "random") is not first


def test_a_rewritten_weights_file_is_reloaded(store, make_photo, encode, tmp_path):
    """A long-running engine must not capture with the old weights after a checkpoint is overwritten."""
    path = tmp_path / "latest.safetensors"
    source = load_model(MODEL, "random")
    save_file(source.model.state_dict(), str(path))
    images = [_image(make_photo, encode, 48, 48, 0)]
    engine = Engine(store, device="cpu")
    before = engine.traces(images, MODEL, str(path))[0]
    with torch.no_grad():
        for block in source.model.blocks:
            block.mlp.fc2.bias.add_(0.5)
    time.sleep(0.05)
    save_file(source.model.state_dict(), str(path))  # same size, new content
    after = engine.traces(images, MODEL, str(path))[0]
    assert not after.cached
    expected = Engine(None, device="cpu").traces(images, MODEL, str(path))[0]
    np.testing.assert_array_equal(after.trace.norms, expected.trace.norms)
    assert not np.allclose(after.trace.norms, before.trace.norms)


def test_unreachable_hub_is_a_clear_error(store, make_photo, encode):
    start = time.monotonic()
    with pytest.raises(HubUnavailableError):
        Engine(store, device="cpu").traces([_image(make_photo, encode, 32, 32, 0)], "dinov2_vits14", "hub")
    assert time.monotonic() - start < 5


def test_size_off_the_patch_grid_is_an_option_error(store, make_photo, encode):
    with pytest.raises(OptionError):
        Engine(store, device="cpu").traces([_image(make_photo, encode, 32, 32, 0)], MODEL, "random", CaptureOptions(side=100))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
