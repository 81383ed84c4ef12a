"""Hostile weights files: zip bombs, lying safetensors headers, special files, and the memory
a failed load leaves behind."""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from vitlens.errors import WeightsError
from vitlens.checkpoints import DEFAULT_MAX_WEIGHTS_BYTES
from vitlens.models import load_model

MODEL = "test_vit"  # timm's own tiny ViT: 1.5 MB of float32 parameters


def _state_dict() -> dict[str, torch.Tensor]:
    return load_model(MODEL, "random").model.state_dict()


def _deflate(source: Path, target: Path) -> None:
    """Rewrite a torch.save archive with every record deflated (what a zip bomb looks like)."""
    with zipfile.ZipFile(source) as plain, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as packed:
        for record in plain.infolist():
            packed.writestr(record.filename, plain.read(record.filename))


def test_a_zip_bomb_is_refused_before_inflating(tmp_path):
    padded = _state_dict() | {"padding": torch.zeros(96 * 2**20 // 4)}  # 96 MiB of zeros deflate to about 100 KB
    torch.save(padded, tmp_path / "plain.pth")
    bomb = tmp_path / "bomb.pth"
    _deflate(tmp_path / "plain.pth", bomb)
    assert bomb.stat().st_size < 4 * 2**20  # the tiny model's own weights plus about 100 KB of deflated zeros
    with pytest.raises(WeightsError, match="compressed records"):  # the archive check, before torch.load inflates
        load_model(MODEL, bomb)


def test_even_a_valid_deflated_checkpoint_is_refused(tmp_path):
    torch.save(_state_dict(), tmp_path / "plain.pth")
    _deflate(tmp_path / "plain.pth", tmp_path / "deflated.pth")
    assert load_model(MODEL, tmp_path / "plain.pth").weights == "plain.pth"
    with pytest.raises(WeightsError, match="compressed records"):
        load_model(MODEL, tmp_path / "deflated.pth")


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    limit = DEFAULT_MAX_WEIGHTS_BYTES
    big = tmp_path / "big.pth"
    with open(big, "wb") as handle:
        handle.truncate(limit + 1)  # sparse: nothing is written or read
    with pytest.raises(WeightsError, match="more than the limit"):
        load_model(MODEL, big)


def _safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("lie", ["huge_shape", "offsets_past_the_end", "huge_header_length"])
def test_a_lying_safetensors_header_is_refused(tmp_path, lie):
    path = tmp_path / "lie.safetensors"
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    if lie == "huge_shape":
        entry = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}
    elif lie == "offsets_past_the_end":
        entry = {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}
    _safetensors(path, {"pos_embed": entry}, bytes(16))
    if lie == "huge_header_length":
        path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])
    with pytest.raises(WeightsError, match="header is inconsistent"):
        load_model(MODEL, path)


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder"])
def test_special_weights_paths_are_refused_at_once(tmp_path, kind):
    path = tmp_path / "weights.pth"
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(WeightsError, match="not a regular file"):
        load_model(MODEL, path)


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_failed_loads_give_their_memory_back(tmp_path):
    """Eight failed loads of a 32 MiB file whose errors are all kept (as a log or a page's state
    would keep them) must not keep eight copies of its tensors alive through their tracebacks."""
    path = tmp_path / "wrong.pth"
    torch.save(_state_dict() | {"extra.weight": torch.ones(32 * 2**20 // 4)}, path)  # an unexpected key: refused after reading
    kept = []
    for _ in range(2):  # warm up allocator and imports
        with pytest.raises(WeightsError):
            load_model(MODEL, path)
    before = _rss_mib()
    for _ in range(8):
        try:
            load_model(MODEL, path)
        except WeightsError as error:
            kept.append(error)
    grown = _rss_mib() - before
    assert len(kept) == 8 and "unexpected" in str(kept[0])
    assert grown < 32, f"{grown:.0f} MiB kept after 8 failed loads"
