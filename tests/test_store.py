"""The trace cache: round trips, keys that name everything a trace depends on, damage, eviction."""
from __future__ import annotations

import pickle
import shutil
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitlens.capture import Trace, capture
from vitlens.engine import Engine
from vitlens.images import decode_image
from vitlens.layout import TokenLayout
from vitlens.store import CaptureOptions, TraceStore, trace_key

MODEL = "test_vit"  # timm's own tiny ViT (6 blocks, 64 channels, 160 px): buildable by name alone


def _assert_same_trace(a: Trace, b: Trace) -> None:
    assert a.layout == b.layout and a.input_size == b.input_size
    for field in ("norms", "final_norms", "attention", "neighbor_similarity"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert getattr(a, field).dtype == getattr(b, field).dtype, field
    assert sorted(a.states) == sorted(b.states)
    for layer in a.states:
        assert np.array_equal(a.states[layer], b.states[layer])


def _synthetic_trace(size: int = 1000, seed: int = 0) -> Trace:
    """A trace of about ``size`` float32 attention values (``4 * size`` bytes)."""
    rng = np.random.default_rng(seed)
    layout = TokenLayout(num_cls=1, num_registers=0, grid=(1, size - 1))
    return Trace(layout=layout, input_size=(14, 14 * (size - 1)), norms=rng.random((1, size), dtype=np.float32),
                 final_norms=rng.random(size, dtype=np.float32), attention=rng.random((1, 1, 1, size), dtype=np.float32),
                 neighbor_similarity=rng.random((1, size - 1), dtype=np.float32))


@pytest.fixture
def store(tmp_path) -> TraceStore:
    store = TraceStore(tmp_path / "traces")
    yield store
    store.close()


@pytest.fixture
def images(make_photo, encode):
    return [decode_image(encode(make_photo(64, 64, seed=seed)), name=f"photo{seed}.png") for seed in range(3)]


def test_put_get_round_trip(store, tiny_vit_reg, pixels):
    trace = capture(tiny_vit_reg, pixels(tiny_vit_reg), state_layers=(1, 3))[0]
    assert store.get("k") is None and "k" not in store
    store.put("k", trace)
    assert "k" in store
    _assert_same_trace(store.get("k"), trace)
    reopened = TraceStore(store.directory)  # another process sees the same entry
    _assert_same_trace(reopened.get("k"), trace)
    reopened.close()


def test_trace_key_names_every_option():
    base = trace_key("arch|fp", "img", CaptureOptions(), "cpu")
    variants = [
        trace_key("arch|other", "img", CaptureOptions(), "cpu"),
        trace_key("arch|fp", "img2", CaptureOptions(), "cpu"),
        trace_key("arch|fp", "img", CaptureOptions(side=224), "cpu"),
        trace_key("arch|fp", "img", CaptureOptions(antialias=False), "cpu"),
        trace_key("arch|fp", "img", CaptureOptions(precision="bf16"), "cpu"),
        trace_key("arch|fp", "img", CaptureOptions(state_layers=(2,)), "cpu"),
        trace_key("arch|fp", "img", CaptureOptions(), "cuda"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert (trace_key("m", "i", CaptureOptions(state_layers=(3, 1, 3)), "cpu")
            == trace_key("m", "i", CaptureOptions(state_layers=(1, 3)), "cpu"))


def test_second_engine_call_is_a_cache_hit(store, images):
    engine = Engine(store, device="cpu")
    first = engine.traces(images[:1], MODEL, "random")[0]
    second = engine.traces(images[:1], MODEL, "random")[0]
    assert not first.cached and second.cached
    _assert_same_trace(first.trace, second.trace)
    fresh_engine = Engine(TraceStore(store.directory), device="cpu")  # e.g. the CLI run again
    assert fresh_engine.traces(images[:1], MODEL, "random")[0].cached


def test_a_hit_does_not_load_the_model(store, images, monkeypatch):
    Engine(store, device="cpu").traces(images[:1], MODEL, "random")
    engine = Engine(store, device="cpu")
    monkeypatch.setattr("vitlens.engine.load_model", lambda *a, **k: pytest.fail("model loaded on a cache hit"))
    assert engine.traces(images[:1], MODEL, "random")[0].cached


@pytest.mark.parametrize("change", ["side", "antialias", "precision", "state_layers", "image"])
def test_any_change_is_a_miss(store, images, change):
    engine = Engine(store, device="cpu")
    options = CaptureOptions(side=160)
    engine.traces(images[:1], MODEL, "random", options)
    changed = {
        "side": (images[:1], CaptureOptions(side=128)),
        "antialias": (images[:1], CaptureOptions(side=160, antialias=False)),
        "precision": (images[:1], CaptureOptions(side=160, precision="bf16")),
        "state_layers": (images[:1], CaptureOptions(side=160, state_layers=(0,))),
        "image": (images[1:2], options),
    }[change]
    result = engine.traces(changed[0], MODEL, "random", changed[1])[0]
    assert not result.cached
    assert engine.traces(images[:1], MODEL, "random", options)[0].cached


def test_weights_file_is_part_of_the_key(store, images, tmp_path):
    from vitlens.models import load_model

    source = load_model(MODEL, "random")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(source.model.state_dict(), str(a))
    with torch.no_grad():
        source.model.blocks[0].mlp.fc1.bias.add_(1.0)
    save_file(source.model.state_dict(), str(b))
    engine = Engine(store, device="cpu")
    first = engine.traces(images[:1], MODEL, str(a))[0]
    assert not first.cached
    assert engine.traces(images[:1], MODEL, str(a))[0].cached
    other = engine.traces(images[:1], MODEL, str(b))[0]
    assert not other.cached
    assert not np.array_equal(other.trace.norms, first.trace.norms)
    assert not engine.traces(images[:1], MODEL, "random")[0].cached
    renamed = tmp_path / "renamed.safetensors"
    shutil.copy(a, renamed)
    assert engine.traces(images[:1], MODEL, str(renamed))[0].cached  # same bytes, same traces


def _value_files(store: TraceStore) -> list[Path]:
    return sorted(store.directory.rglob("*.val"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "deleted", "huge_frame", "huge_bytes"])
def test_damaged_entry_is_recomputed(store, images, damage, caplog):
    engine = Engine(store, device="cpu")
    options = CaptureOptions(state_layers=(0, 1, 2, 3, 4, 5))  # large enough for diskcache to use a file
    original = engine.traces(images[:1], MODEL, "random", options)[0]
    files = _value_files(store)
    assert len(files) == 1
    data = files[0].read_bytes()
    if damage == "garbage":
        files[0].write_bytes(bytes(range(256)) * 10)
    elif damage == "truncated":
        files[0].write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        files[0].write_bytes(b"")
    elif damage == "huge_frame":  # unpickling raises OverflowError
        files[0].write_bytes(b"\x80\x05\x95" + b"\xff" * 8)
    elif damage == "huge_bytes":  # unpickling raises MemoryError
        files[0].write_bytes(b"\x80\x05\x8e" + struct.pack("<Q", 2**62))
    else:
        files[0].unlink()
    result = engine.traces(images[:1], MODEL, "random", options)[0]
    assert not result.cached
    _assert_same_trace(result.trace, original.trace)
    assert engine.traces(images[:1], MODEL, "random", options)[0].cached  # stored again


def test_randomly_damaged_value_files_never_raise(store):
    trace = _synthetic_trace(20_000)
    data = pickle.dumps(trace, protocol=5)
    rng = np.random.default_rng(0)
    for _ in range(60):
        store.put("k", trace)
        (path,) = _value_files(store)
        damaged = bytearray(data)
        for position in rng.integers(0, len(damaged), size=rng.integers(1, 6)):
            damaged[position] = rng.integers(0, 256)
        path.write_bytes(bytes(damaged[:rng.integers(1, len(damaged) + 1)]))
        value = store.get("k")
        assert value is None or isinstance(value, Trace)


def test_a_value_that_is_not_a_trace_is_dropped(store, images):
    engine = Engine(store, device="cpu")
    key = engine.trace_keys(images[:1], MODEL, "random")[0]
    store._cache.set(key, {"norms": [1, 2, 3]})
    assert store.get(key) is None
    assert key not in store
    store._cache.set(key, "a string")
    assert not engine.traces(images[:1], MODEL, "random")[0].cached
    assert isinstance(store.get(key), Trace)


def test_size_limit_evicts_least_recently_used(tmp_path):
    """diskcache culls up to 10 least recently used entries whenever a write passes the limit."""
    store = TraceStore(tmp_path / "small", size_limit=1_000_000)
    store.put("keep", _synthetic_trace(1_500, seed=99))  # about 25 kB each
    for index in range(120):
        store.put(f"t{index}", _synthetic_trace(1_500, seed=index))
        assert store.get("keep") is not None  # recently used, so never among the evicted
    assert store.volume() < 1_200_000
    present = [index for index in range(120) if f"t{index}" in store]
    assert present == list(range(present[0], 120))  # the oldest went first
    assert 20 <= len(present) < 60
    store.close()


def _overwrite_index_header(directory: Path) -> None:
    with open(directory / "cache.db", "r+b") as handle:
        handle.write(b"not the header SQLite expects" * 4)


def test_a_damaged_index_is_rebuilt_when_opened(tmp_path):
    store = TraceStore(tmp_path / "traces")
    store.put("k", _synthetic_trace())
    store.close()
    _overwrite_index_header(tmp_path / "traces")
    reopened = TraceStore(tmp_path / "traces")  # no sqlite3 error
    assert reopened.get("k") is None
    reopened.put("k", _synthetic_trace(seed=1))
    assert reopened.get("k") is not None and (tmp_path / "traces" / "cache.db.damaged").exists()


def test_an_index_damaged_while_open_is_a_miss_then_rebuilt(tmp_path):
    store = TraceStore(tmp_path / "traces")
    store.put("k", _synthetic_trace())
    other = TraceStore(tmp_path / "traces")  # e.g. the worker, while the app holds `store`
    with sqlite3.connect(tmp_path / "traces" / "cache.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the header is read from the file, not the WAL
    _overwrite_index_header(tmp_path / "traces")
    assert TraceStore(tmp_path / "traces").get("k") is None  # a third process opens it: rebuilt, no sqlite3 error
    assert store.get("k") is None and "k" not in store  # the open ones follow the new index
    store.put("k2", _synthetic_trace(seed=2))
    assert other.get("k2") is not None  # both write and read the same, rebuilt index
    assert len(list((tmp_path / "traces").glob("cache.db.damaged*"))) >= 1
