"""The HTML report in headless Chromium, offline: every section, every chart drawn, the LOST pictures loaded.

Screenshot: ``artifacts/screenshots/report.png`` (git-ignored).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vitlens.engine import Engine
from vitlens.report import SECTIONS, TITLES, ReportOptions, build_report

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("the playwright Python package is not installed", allow_module_level=True)
if CHROMIUM is None:  # pragma: no cover - depends on the machine
    pytest.skip("chromium is not installed", allow_module_level=True)


def test_report_opens_offline_with_every_section(tmp_path, make_photo):
    for index, name in enumerate(("cats", "dogs")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for seed in range(2):
            make_photo(48, 48, seed=10 * index + seed).save(tmp_path / "data" / name / f"{seed}.png")
    page_file = tmp_path / "report.html"
    page_file.write_text(build_report(Engine(device="cpu"), "vit_tiny_patch16_224", "synthetic", tmp_path / "data",
                                      ReportOptions(shown=2)), encoding="utf-8")
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_file.as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4", timeout=30_000)
            for key in SECTIONS:
                heading = page.locator(f"section#{key} h2")
                assert heading.inner_text() == TITLES[key]
            assert page.locator("section#global-probes table td", has_text="cls").count() == 1
            loaded = page.eval_on_selector_all("section#lost img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
            assert loaded == [True, True]
            (ROOT / "artifacts" / "screenshots").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ROOT / "artifacts" / "screenshots" / "report.png"), full_page=True)
        finally:
            browser.close()
    assert not errors
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
