"""Queue accounting, deadlines, disconnect storms and SIGTERM, against the real server process."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time

import httpx
import pytest

from tests.e2e.harness import running_server
from tests.reliability.conftest import server_args

pytestmark = pytest.mark.asyncio

LONG = {"max_tokens": 3000, "ignore_eos": True}  # only a cancel, a deadline or SIGTERM ends these in time


def chat(server, text: str = "Hello", **fields) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": text}], "temperature": 0,
            "max_tokens": 8, **fields}


async def queue_depth(http: httpx.AsyncClient) -> tuple[float, float]:
    metrics = (await http.get("/metrics")).text
    read = lambda name: float(re.search(rf"^{name} (\S+)$", metrics, re.M).group(1))  # noqa: E731
    return read("fasb_queue_waiting"), read("fasb_queue_running")


async def wait_for_empty_queue(http: httpx.AsyncClient, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await queue_depth(http) != (0.0, 0.0):
        assert time.monotonic() < deadline, f"queue still {await queue_depth(http)}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def small_queue_server(long_model_dir, artifact_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("reliability-logs") / "small-queue.log"
    args = server_args(long_model_dir, artifact_dir, "--max-batch-size", "1", "--max-queue", "2")
    with running_server(args, log_path) as process:
        yield process


async def test_queue_places_retry_after_and_n(small_queue_server):
    server = small_queue_server
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        too_many = await http.post("/v1/chat/completions", json=chat(server, n=3))
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"  # never admissible

        async with http.stream("POST", "/v1/chat/completions", json=chat(server, stream=True, **LONG)) as running:
            assert running.status_code == 200
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as other:
                async with other.stream("POST", "/v1/chat/completions",
                                        json=chat(server, stream=True, **LONG)) as waiting:
                    assert waiting.status_code == 200
                    full = await http.post("/v1/chat/completions", json=chat(server))
                    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
                    assert int(full.headers["retry-after"]) >= 1
            # The waiting client left: its place is free at once, not when the worker gets to it.
            deadline = time.monotonic() + 5
            while (await queue_depth(http))[0] != 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as third:
                async with third.stream("POST", "/v1/chat/completions", json=chat(server, stream=True)) as admitted:
                    assert admitted.status_code == 200  # admitted (it waits behind the running one)
        await wait_for_empty_queue(http)


async def test_disconnect_storm_leaves_the_server_healthy(server):
    rng = random.Random(5)

    async def leave_early(http: httpx.AsyncClient, i: int) -> None:
        body = chat(server, f"client {i}", stream=True, **LONG)
        if i % 3 == 0:
            body["steering"] = {"mode": "fasb", "threshold": 0.99, "backtrack_tokens": 2, "max_backtracks": 4}
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return  # 429 when the queue is full is a fine answer to a storm
                async for _ in response.aiter_lines():
                    if rng.random() < 0.2:
                        return
        except httpx.HTTPError:
            pass

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
        await asyncio.wait_for(asyncio.gather(*(leave_early(http, i) for i in range(40))), timeout=120)
        await wait_for_empty_queue(http)
        response = await http.post("/v1/chat/completions", json=chat(server))
        assert response.status_code == 200


async def test_request_timeout_ends_with_length(long_model_dir, artifact_dir, tmp_path):
    args = server_args(long_model_dir, artifact_dir, "--request-timeout", "1")
    with running_server(args, tmp_path / "timeout.log") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            started = time.monotonic()
            response = await http.post("/v1/chat/completions", json=chat(server, **LONG))
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] == "length"
            assert response.json()["usage"]["completion_tokens"] < 3000
            assert time.monotonic() - started < 15


async def read_stream(http: httpx.AsyncClient, body: dict) -> list[str]:
    payloads = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payloads.append(line.removeprefix("data: "))
    return payloads


async def test_sigterm_drains_then_ends_streams_cleanly_and_exits_0(long_model_dir, artifact_dir, tmp_path):
    shutdown_timeout = 2.0
    args = server_args(long_model_dir, artifact_dir, "--shutdown-timeout", str(shutdown_timeout))
    with running_server(args, tmp_path / "sigterm.log") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            streams = [asyncio.create_task(read_stream(http, chat(server, f"stream {i}", stream=True, **LONG)))
                       for i in range(4)]
            short = asyncio.create_task(http.post("/v1/chat/completions", json=chat(server, max_tokens=4)))
            await asyncio.sleep(1.0)  # all in flight
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=30)
            assert (await short).status_code == 200  # a short request in flight just finishes
        for payloads in results:
            assert payloads[-1] == "[DONE]"
            last = json.loads(payloads[-2])
            assert "error" in last and last["error"]["code"] == "shutting_down", last
        code = await asyncio.to_thread(server.process.wait, 30)
        assert code == 0, server.log()[-3000:]
        assert time.monotonic() - signalled < shutdown_timeout + 5  # docs/operations.md: timeout + ~2 s
