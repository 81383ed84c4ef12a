"""Sign-in end to end: the real app in Chromium against a real local OpenID Connect provider.

``oidc_provider_mock`` runs the provider in this process on a free port (its authorization page
asks for a subject, which becomes the e-mail claim). The app gets an ``[auth]`` secrets file
pointing at it and ``VITLENS_ALLOWED_EMAIL_DOMAINS=example.org``. Signed out, only the sign-in
page shows; alice@example.org gets the dashboard; mallory@evil.test is refused.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, ROOT, VIEWPORT, _free_port

pytestmark = pytest.mark.browser
oidc_provider_mock = pytest.importorskip("oidc_provider_mock")
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402 (after the skip)

WAIT_MS = 90_000


@pytest.fixture
def provider() -> Iterator[str]:
    with oidc_provider_mock.run_server_in_thread(port=_free_port()) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def signed_app(tmp_path: Path, provider: str) -> Iterator[str]:
    """The app with sign-in on (a secrets file naming the local provider), on a free port."""
    port = _free_port()
    url = f"http://localhost:{port}"
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'[auth]\nredirect_uri = "{url}/oauth2callback"\ncookie_secret = "{os.urandom(16).hex()}"\n'
                       f'client_id = "vitlens-test"\nclient_secret = "not-so-secret"\n'
                       f'server_metadata_url = "{provider}/.well-known/openid-configuration"\n')
    env = dict(os.environ, VITLENS_CACHE_DIR=str(tmp_path / "cache"), VITLENS_DEVICE="cpu",
               VITLENS_ALLOWED_EMAIL_DOMAINS="example.org", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               HF_ENDPOINT="http://127.0.0.1:9", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
               "--server.port", str(port), "--server.address", "localhost", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--secrets.files", str(secrets)]
    log = tmp_path / "streamlit.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, process, log)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited early:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    pytest.fail("streamlit did not answer within 90 s")


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_context(viewport=VIEWPORT).new_page()
        finally:
            browser.close()


def _sign_in(page: Page, url: str, subject: str) -> None:
    page.goto(url)
    expect(page.get_by_text("sign in to look at")).to_be_visible(timeout=WAIT_MS)
    assert page.locator("[data-testid=stSidebarNav]").count() == 0  # nothing of the dashboard yet
    page.get_by_role("button", name="Sign in").click()
    page.locator("input[name=sub]").fill(subject, timeout=WAIT_MS)  # the provider's authorization page
    page.get_by_role("button", name="Authorize").click()


def test_sign_in_lets_the_team_in_and_keeps_others_out(signed_app: str, browser_page: Page) -> None:
    page = browser_page
    _sign_in(page, signed_app, "alice@example.org")
    expect(page.get_by_text("Signed in as alice@example.org")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("[data-testid=stMain] h1").first).to_have_text("Norm maps", timeout=WAIT_MS)
    assert page.locator("[data-testid=stException]").count() == 0

    page.context.clear_cookies()  # a second visitor, from another domain
    _sign_in(page, signed_app, "mallory@evil.test")
    expect(page.get_by_text("is not allowed here")).to_be_visible(timeout=WAIT_MS)
    assert page.locator("[data-testid=stSidebarNav]").count() == 0
    assert page.get_by_text("Norm maps").count() == 0
