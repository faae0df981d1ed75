"""Fixtures for the playground's browser tests: the real server on the default model (with an API
key, so the page's key prompt is exercised too) and headless Chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ServerProcess, running_server

API_KEY = "playground-test-key"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground"


def find_chromium() -> str | None:
    """Debian's chromium (Playwright cannot download a browser here); FASB_CHROMIUM overrides."""
    candidates = [os.environ.get("FASB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        message = "no Chromium found (apt-get install chromium, or set FASB_CHROMIUM=/path/to/chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the browser tests")
        pytest.skip(message)
    return path


# Module scope, not session: Playwright's sync API runs an event loop on this thread while it is
# open, and pytest-asyncio cannot start its own for the async tests of later modules meanwhile.
@pytest.fixture(scope="module")
def browser(chromium_path):
    if os.environ.get("CI"):
        import playwright.sync_api as sync_api  # in CI a missing playwright is a failure, not a skip
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The real server on the default model, requiring API_KEY on the API (not on the page)."""
    log_path = tmp_path_factory.mktemp("server-logs") / "playground.log"
    with running_server(["--model", "default", "--api-key", API_KEY], log_path, api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
