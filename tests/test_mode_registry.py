"""A steering mode is one file: a module added to server/steering/modes/, with nothing else edited,
shows up in `fasb-server --help`, in /openapi.json and in the playground's mode menus, and serves.

The file is added to a copy of the `server` package, and the copy is run (`python -m server` from
the copy's folder, so the copy shadows the installed package), never the repository's own tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM

from tests.browser.conftest import CHROMIUM_FLAGS, find_chromium
from tests.e2e.harness import REPO_ROOT, _stop, _wait_until_healthy, free_port
from tests.synthetic_artifact import write_synthetic_artifact

NEW_MODE = "quiet"
NEW_MODE_SOURCE = '''"""`quiet`: the monitor's controller under another name."""

from server.steering.modes.monitor import Controller as MonitorController


class Controller(MonitorController):
    mode = "quiet"
'''
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tree_with_new_mode(tmp_path_factory) -> Path:
    """A folder holding a copy of the `server` package plus one new file, modes/quiet.py."""
    root = tmp_path_factory.mktemp("new-mode")
    shutil.copytree(REPO_ROOT / "server", root / "server", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "server" / "steering" / "modes" / f"{NEW_MODE}.py").write_text(NEW_MODE_SOURCE)
    return root


def run_server_module(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **OFFLINE}, timeout=120, check=True)


def steering_mode_help(help_text: str) -> str:
    """The --steering-mode entry of argparse's help, on one line."""
    entry = help_text.split("\n  --steering-mode STEERING_MODE", 1)[1].split("\n  --", 1)[0]
    return " ".join(entry.split())


@pytest.fixture(scope="module")
def server_with_new_mode(tree_with_new_mode, tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """The copy served on the tiny model with a synthetic artifact; yields its base URL."""
    artifact = tmp_path_factory.mktemp("artifact")
    write_synthetic_artifact(AutoModelForCausalLM.from_pretrained(tiny_model_dir), artifact, behavior="synthetic")
    port = free_port()
    log_path = tmp_path_factory.mktemp("server-logs") / "new-mode.log"
    command = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--model",
               str(tiny_model_dir), "--no-default-artifacts", "--artifact", str(artifact)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tree_with_new_mode, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **OFFLINE})
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(process, base_url, log_path, timeout_s=240)
        yield base_url
    finally:
        _stop(process)


def test_help_lists_the_new_mode_and_accepts_it(tree_with_new_mode):
    assert NEW_MODE not in steering_mode_help(run_server_module(REPO_ROOT, "--help").stdout)
    entry = steering_mode_help(run_server_module(tree_with_new_mode, "--help").stdout)
    assert NEW_MODE in entry.split(": ", 1)[1].split(" | ")
    # The settings' type is the registry too: --steering-mode quiet is valid, a mode with no file is not.
    check = "from server.config import parse_args; import sys; print(parse_args(sys.argv[1:]).steering_mode)"
    accepted = subprocess.run([sys.executable, "-c", check, "--steering-mode", NEW_MODE], cwd=tree_with_new_mode,
                              capture_output=True, text=True, timeout=120)
    assert accepted.stdout.strip() == NEW_MODE, accepted.stderr
    refused = subprocess.run([sys.executable, "-c", check, "--steering-mode", "loud"], cwd=tree_with_new_mode,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--steering-mode:" in refused.stderr


def test_openapi_lists_the_new_mode(server_with_new_mode):
    schema = httpx.get(f"{server_with_new_mode}/openapi.json", timeout=30).json()
    field = schema["components"]["schemas"]["SteeringRequest"]["properties"]["mode"]
    enum = [value for option in field["anyOf"] for value in option.get("enum", [])]
    assert NEW_MODE in enum and {"off", "monitor", "fasb", "always"} <= set(enum)
    assert NEW_MODE in field["description"]


def test_a_request_for_the_new_mode_is_served_by_its_controller(server_with_new_mode):
    body = {"model": "unused", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "steering": {"mode": NEW_MODE, "return_scores": True}}
    body["model"] = httpx.get(f"{server_with_new_mode}/v1/models", timeout=30).json()["data"][0]["id"]
    reply = httpx.post(f"{server_with_new_mode}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    report = reply.json()["choices"][0]["steering"]
    assert report["mode"] == NEW_MODE and not report["intervened"]
    assert len(report["scores"]) == reply.json()["usage"]["completion_tokens"]  # it monitors, as its base does
    unknown = httpx.post(f"{server_with_new_mode}/v1/chat/completions",
                         json={**body, "steering": {"mode": "loud"}}, timeout=60)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "steering.mode"


def test_the_playground_offers_the_new_mode(server_with_new_mode):
    chromium = find_chromium()
    if chromium is None:
        message = "no Chromium found (apt-get install chromium, or set FASB_CHROMIUM=/path/to/chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the browser tests")
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{server_with_new_mode}/")
            page.wait_for_function("document.querySelectorAll('#mode option').length > 1")
            options = {select: page.eval_on_selector_all(f"{select} option", "os => os.map(o => o.value)")
                       for select in ("#mode", "#mode-b")}
            preferred_b = page.eval_on_selector("#mode-b", "s => s.value")
        finally:
            browser.close()
    assert options["#mode"][0] == "" and options["#mode-b"][0] == ""  # "server default", "same as A"
    for values in options.values():
        assert NEW_MODE in values and {"off", "monitor", "fasb", "always"} <= set(values)
    assert preferred_b == "fasb"
