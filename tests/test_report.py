"""The HTML report: every section, self-contained, one sentence where the data cannot answer."""
from __future__ import annotations

from pathlib import Path

import pytest

from vitlens.cli import main
from vitlens.engine import Engine
from vitlens.report import SECTIONS, build_report

MODEL = ("vit_tiny_patch16_224", "synthetic")  # planted outliers from block 6


@pytest.fixture
def classes(tmp_path, make_photo) -> Path:
    for index, name in enumerate(("cats", "dogs")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for seed in range(2):
            make_photo(48, 48, seed=10 * index + seed).save(tmp_path / "data" / name / f"{seed}.png")
    return tmp_path / "data"


def test_report_cli_writes_one_self_contained_page_with_every_section(classes, tmp_path, capsys):
    out = tmp_path / "report.html"
    code = main(["report", "--model", MODEL[0], "--weights", MODEL[1], "--images", str(classes), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    page = out.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("<script src=") == 0 and page.count("Plotly.newPlot") >= 4
    assert page.count("plotly.js v") == 1  # the library inlined once
    assert "synthetic:v" in page and str(classes) in page  # weights fingerprint and data
    assert f"python -m vitlens report --model {MODEL[0]} --weights synthetic --images {classes}" in page
    assert "data:image/jpeg;base64," in page  # LOST boxes drawn on the pictures
    assert "Not a Pascal-VOC folder" in page


def test_report_without_outliers_or_classes_says_so(make_photo, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for seed in range(2):
        make_photo(48, 48, seed=seed).save(folder / f"{seed}.png")
    from vitlens.evidence import EvidenceOptions
    from vitlens.report import ReportOptions

    page = build_report(Engine(device="cpu"), *MODEL, folder, ReportOptions(evidence=EvidenceOptions(layer=2), shown=1))
    assert "No outlier tokens at layer 2" in page
    assert "at least 2 classes" in page
    assert "No outlier token among the test images" in page


def test_report_cli_refuses_a_non_html_name(classes, tmp_path, capsys):
    code = main(["report", "--model", MODEL[0], "--weights", MODEL[1], "--images", str(classes), "--out", str(tmp_path / "r.txt")])
    _, err = capsys.readouterr()
    assert code == 2 and "must end in .html" in err
