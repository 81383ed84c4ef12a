"""LOST object discovery (crafted features with a known object) and corLoc on hand-written VOC XML."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlens import discovery
from vitlens.analysis.lost import box_iou, corloc, lost
from vitlens.cli import main
from vitlens.discovery import Discovery, _pixel_box, attention_features, discover, read_annotation, voc_items
from vitlens.errors import DataError

GRID = (8, 10)


def _features(objects: list[tuple[int, int, int, int]], channels: int = 32, seed: int = 0) -> np.ndarray:
    """Background along one direction; each object (row0, col0, row1, col1 exclusive) along its own
    direction minus a little background, so objects anti-correlate with the background."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(channels, channels)))[0]
    grid = np.tile(basis[0], (*GRID, 1))  # [row, col, channel]
    for index, (r0, c0, r1, c1) in enumerate(objects, start=1):
        grid[r0:r1, c0:c1] = basis[index] - 0.3 * basis[0]
    grid += 0.01 * rng.normal(size=grid.shape)
    return grid.reshape(-1, channels)


def test_lost_finds_the_object_box_and_seeds_inside_it():
    result = lost(_features([(2, 3, 5, 7)]), GRID)
    assert result.box == (2, 3, 5, 7)
    assert 2 <= result.seed[0] < 5 and 3 <= result.seed[1] < 7
    assert result.mask.sum() == 12 and result.mask[2:5, 3:7].all()
    assert result.degree[result.seed] == result.degree.min()


def test_lost_keeps_the_seeds_component_when_objects_are_apart():
    result = lost(_features([(0, 0, 2, 3), (5, 5, 8, 9)]), GRID)  # 6 cells (lowest degree) and 12 cells
    assert result.box == (0, 0, 2, 3)
    assert result.mask[5:8, 5:9].sum() == 0


def test_lost_k_limits_the_expansion():
    features = _features([(2, 3, 5, 7)])
    assert len(lost(features, GRID, k=1).expansion) == 1
    assert len(lost(features, GRID, k=100).expansion) == 12  # only object patches correlate with the seed


def test_lost_rejects_a_wrong_feature_count():
    with pytest.raises(ValueError):
        lost(np.zeros((10, 4)), GRID)


def test_box_iou_and_corloc():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(np.array([0, 0, 10, 10]), boxes), [1.0, 25 / 175, 0.0])
    assert corloc([0.5, 0.49, 0.9, 0.1]) == 0.5
    assert corloc([]) is None


def test_pixel_box_maps_cells_back_to_the_original_pixels_and_clips_padding():
    assert _pixel_box((0, 0, 2, 4), 16, 1.0, (50, 30)) == (0, 0, 50, 30)  # padded to 64x32
    assert _pixel_box((1, 1, 2, 2), 16, 0.5, (200, 100)) == (32, 32, 64, 64)  # input at half size


def test_attention_features_are_the_qkv_projection_slices(tiny_vit):
    model = tiny_vit.model
    pixels = torch.randn(1, 3, 56, 56)
    seen = {}
    handle = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: seen.setdefault("qkv", out))
    try:
        with attention_features(model, -1, "k") as keys, torch.inference_mode():
            model.forward_features(pixels)
    finally:
        handle.remove()
    width = model.embed_dim
    torch.testing.assert_close(keys["features"], seen["qkv"][..., width:2 * width])


def _xml(path: Path, objects: list[tuple[int, int, int, int, int]], size: tuple[int, int] = (100, 80)) -> None:
    body = "".join(f"<object><name>thing</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                   f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for x0, y0, x1, y1, d in objects)
    path.write_text(f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>{body}</annotation>")


def test_voc_boxes_are_one_based_inclusive(tmp_path):
    _xml(tmp_path / "a.xml", [(1, 1, 100, 80, 0), (10, 20, 30, 40, 1)])
    annotation = read_annotation(tmp_path / "a.xml")
    np.testing.assert_array_equal(annotation.boxes, [[0, 0, 100, 80], [9, 19, 30, 40]])
    assert annotation.difficult.tolist() == [False, True]
    assert annotation.kept(difficult=False).tolist() == [[0, 0, 100, 80]]


@pytest.fixture
def voc(tmp_path, make_photo) -> Path:
    """Five images: two objects; a difficult box only; a box touching the border; no objects; no XML.
    And one XML whose picture is missing, one corrupt picture."""
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    for name in ("two", "difficult", "border", "empty", "noxml", "corrupt"):
        make_photo(100, 80, seed=len(name)).save(tmp_path / "JPEGImages" / f"{name}.jpg")
    (tmp_path / "JPEGImages" / "corrupt.jpg").write_bytes(b"not a jpeg")
    annotations = tmp_path / "Annotations"
    _xml(annotations / "two.xml", [(1, 1, 20, 20, 0), (51, 41, 100, 80, 0)])
    _xml(annotations / "difficult.xml", [(51, 41, 100, 80, 1)])
    _xml(annotations / "border.xml", [(1, 1, 100, 80, 0)])
    _xml(annotations / "empty.xml", [])
    _xml(annotations / "nopicture.xml", [(1, 1, 10, 10, 0)])
    _xml(annotations / "corrupt.xml", [(1, 1, 10, 10, 0)])
    return tmp_path


def _fixed_box(monkeypatch, box: tuple[int, int, int, int]) -> None:
    """``discover`` answers ``box`` for every image (corLoc bookkeeping without a model)."""
    def fake(loaded, image, *args, **kwargs) -> Discovery:
        result = lost(_features([(2, 3, 5, 7)]), GRID)
        return Discovery(result=result, box=box, patch_size=10, scale=1.0)
    monkeypatch.setattr(discovery, "discover", fake)


def test_corloc_counts_images_with_a_box_and_lists_failures(voc, monkeypatch, tiny_vit):
    _fixed_box(monkeypatch, (50, 40, 100, 80))  # the bottom-right quarter
    document = discovery.lost_voc(voc, tiny_vit)
    by_image = {row["image"]: row for row in document["images"]}
    assert set(by_image) == {"two.jpg", "difficult.jpg", "border.jpg"}
    assert by_image["two.jpg"]["iou"] == pytest.approx(1.0) and by_image["two.jpg"]["correct"]
    assert by_image["difficult.jpg"]["correct"]  # difficult boxes count by default, as in LOST
    assert by_image["border.jpg"]["iou"] == pytest.approx(0.25) and not by_image["border.jpg"]["correct"]
    assert document["num_images"] == 3 and document["corloc"] == pytest.approx(2 / 3)
    assert document["no_boxes"] == ["empty"]
    assert {item["image"] for item in document["failed"]} == {"noxml.jpg", "nopicture", "corrupt.jpg"}


def test_corloc_without_difficult_boxes(voc, monkeypatch, tiny_vit):
    _fixed_box(monkeypatch, (50, 40, 100, 80))
    document = discovery.lost_voc(voc, tiny_vit, difficult=False)
    assert document["num_images"] == 2 and document["corloc"] == pytest.approx(1 / 2)
    assert sorted(document["no_boxes"]) == ["difficult", "empty"]


def test_discover_box_lies_inside_the_original_image(tiny_vit, make_photo):
    found = discover(tiny_vit, make_photo(100, 70), side=None)
    x0, y0, x1, y1 = found.box
    assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 70
    assert found.result.degree.shape == (5, 8)  # 100x70 padded to 112x70 -> 8x5 patches of 14


def test_voc_items_refuses_a_folder_without_the_voc_layout(tmp_path):
    with pytest.raises(DataError, match="JPEGImages"):
        voc_items(tmp_path)


def test_lost_cli_json_contract(voc, capsys, tmp_path):
    code = main(["lost", "--voc", str(voc), "--model", "vit_tiny_patch16_224", "--weights", "random", "--size", "64",
                 "--json", "--out", str(tmp_path / "boxes.csv")])
    out, err = capsys.readouterr()
    assert code == 0, err
    document = json.loads(out)
    assert {"corloc", "num_images", "failed", "images"} <= set(document)
    assert document["num_images"] == 3 == len(document["images"])
    for row in document["images"]:
        assert {"image", "box", "seed", "iou", "correct"} <= set(row)
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 80
        assert row["correct"] == (row["iou"] >= 0.5)
    assert document["corloc"] == pytest.approx(sum(r["correct"] for r in document["images"]) / 3)
    assert (tmp_path / "boxes.csv").read_text().count("\n") == 4


def test_lost_cli_malformed_folder_is_one_line_exit_2(tmp_path, capsys):
    code = main(["lost", "--voc", str(tmp_path), "--model", "vit_tiny_patch16_224", "--weights", "random"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
