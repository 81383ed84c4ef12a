"""The evidence commands end to end on the synthetic demo model (planted outliers at 4 known cells)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitlens.cli import main
from vitlens.errors import DataError
from vitlens.evidence import find_images, image_classes

MODEL = ["--model", "vit_tiny_patch16_224", "--weights", "synthetic"]  # 12 blocks, planted from block 6
PLANTED = 4  # cells per image


@pytest.fixture
def classes(tmp_path, make_photo) -> Path:
    """An ImageFolder: two classes of 3 square photos, and one unreadable file."""
    for index, name in enumerate(("cats", "dogs")):
        (tmp_path / name).mkdir()
        for seed in range(3):
            make_photo(48, 48, seed=10 * index + seed).save(tmp_path / name / f"{seed}.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    return tmp_path


def _json(capsys, *argv) -> dict:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _one_line(capsys, *argv) -> str:
    code = main([str(arg) for arg in argv])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_redundancy_counts_the_planted_outliers(capsys, classes, tmp_path):
    document = _json(capsys, "redundancy", classes, *MODEL, "--json", "--out", tmp_path / "cells.csv")
    assert document["num_images"] == 6 and document["num_outlier"] == 6 * PLANTED
    assert document["num_normal"] == 6 * (196 - PLANTED) and 0 <= document["auroc"] <= 1
    assert document["layer"] == 11 and document["fingerprint"].startswith("synthetic")
    assert [item["image"].endswith("broken.png") for item in document["failed"]] == [True]
    assert (tmp_path / "cells.csv").read_text().count("\n") == 1 + 6 * 196


def test_redundancy_before_the_planted_block_has_no_outliers(capsys, classes):
    assert "No outlier tokens at layer 2" in _one_line(capsys, "redundancy", classes, *MODEL, "--layer", "2")


def test_probes_report_both_groups_with_counts(capsys, classes):
    document = _json(capsys, "probes", classes, *MODEL, "--json")
    assert document["num_train_images"] + document["num_test_images"] == 6
    assert document["outlier"]["count"] == PLANTED * document["num_test_images"]
    assert document["normal"]["count"] == (196 - PLANTED) * document["num_test_images"]
    assert document["normal"]["pixel_error"] is not None and document["grid"] == [14, 14]


def test_global_probes_score_each_token_kind(capsys, classes, tmp_path):
    document = _json(capsys, "global-probes", classes, *MODEL, "--json", "--out", tmp_path / "global.csv")
    assert document["classes"] == ["cats", "dogs"]
    for kind in ("cls", "normal", "outlier"):
        assert document[kind]["num_images"] == 6 and 0 <= document[kind]["accuracy"] <= 1
    assert "token,accuracy" in (tmp_path / "global.csv").read_text()


def test_global_probes_without_outliers_say_why(capsys, classes):
    document = _json(capsys, "global-probes", classes, *MODEL, "--layer", "2", "--json")
    assert document["outlier"]["accuracy"] is None and "outlier" in document["outlier"]["reason"]
    assert document["cls"]["accuracy"] is not None


def test_one_class_or_no_images_is_one_line(capsys, classes, tmp_path):
    assert "at least 2 classes" in _one_line(capsys, "global-probes", classes / "dogs", *MODEL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No image files" in _one_line(capsys, "redundancy", empty, *MODEL)
    assert "must end in .csv or .json" in _one_line(capsys, "redundancy", classes, *MODEL, "--out", tmp_path / "x.txt")


def test_image_classes_and_find_images(classes):
    assert {name for _, name in image_classes(classes)} == {"cats", "dogs"}
    assert len(find_images(classes)) == 7
    with pytest.raises(DataError):
        image_classes(classes / "cats")
