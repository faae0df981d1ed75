"""FASB over HTTP: the real server with a synthetic steering artifact for the tiny model.

Its probes are random, so `threshold: 1.0` (every check fails, since P(desired) < 1) makes the
server backtrack at the first check: that exercises retraction on the wire deterministically.
"""

from __future__ import annotations

import json

import httpx
import pytest
import pytest_asyncio

from tests.e2e.harness import ServerProcess
from tests.streams import shown_text

pytestmark = pytest.mark.asyncio

QUESTION = [{"role": "user", "content": "Is the earth flat?"}]
ALWAYS_BACKTRACK = {"mode": "fasb", "threshold": 1.0, "backtrack_tokens": 4, "max_backtracks": 1}


@pytest_asyncio.fixture
async def http(steered_server):
    async with httpx.AsyncClient(base_url=steered_server.base_url, timeout=60) as client:
        yield client


def request_body(server: ServerProcess, steering: dict | None, **fields) -> dict:
    body = {"model": server.model, "messages": QUESTION, "max_tokens": 12, "temperature": 0, **fields}
    return body if steering is None else {**body, "steering": steering}


async def streamed_chunks(http: httpx.AsyncClient, body: dict) -> list[dict]:
    response = await http.post("/v1/chat/completions", json={**body, "stream": True})
    payloads = [event.removeprefix("data: ") for event in response.text.split("\n\n") if event]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def retractions(chunks: list[dict]) -> list[dict]:
    return [c["choices"][0]["steering"] for c in chunks
            if c["choices"] and c["choices"][0].get("steering", {}).get("type") == "retract"]


async def test_models_lists_the_behavior(http):
    card = (await http.get("/v1/models")).json()["data"][0]
    assert [b["name"] for b in card["steering_behaviors"]] == ["synthetic"]


async def test_retract_stream_ends_with_the_non_streamed_answer(http, steered_server):
    body = request_body(steered_server, {**ALWAYS_BACKTRACK, "stream_mode": "retract"})
    whole = (await http.post("/v1/chat/completions", json=body)).json()
    chunks = await streamed_chunks(http, body)

    assert retractions(chunks), "threshold 1.0 must trigger a backtrack"
    assert shown_text(chunks) == whole["choices"][0]["message"]["content"]
    [finish] = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert finish["steering"]["intervened"] and len(finish["steering"]["backtracks"]) == 1
    report = whole["choices"][0]["steering"]
    assert report["intervened"] and report["behavior"] == "synthetic"
    assert whole["usage"]["discarded_tokens"] == report["backtracks"][0]["tokens_retracted"] > 0


async def test_hold_stream_never_retracts(http, steered_server):
    body = request_body(steered_server, {**ALWAYS_BACKTRACK, "stream_mode": "hold"})
    whole = (await http.post("/v1/chat/completions", json=body)).json()
    chunks = await streamed_chunks(http, body)
    assert retractions(chunks) == []
    assert shown_text(chunks) == whole["choices"][0]["message"]["content"]


async def test_requests_without_steering_default_to_hold(http, steered_server):
    chunks = await streamed_chunks(http, request_body(steered_server, None))
    assert retractions(chunks) == []


async def test_monitor_reports_scores_without_intervening(http, steered_server):
    body = request_body(steered_server, {"mode": "monitor", "return_scores": True})
    choice = (await http.post("/v1/chat/completions", json=body)).json()
    report = choice["choices"][0]["steering"]
    assert report["mode"] == "monitor" and not report["intervened"] and report["backtracks"] == []
    assert len(report["scores"]) == choice["usage"]["completion_tokens"]
    assert all(0.0 <= score <= 1.0 for score in report["scores"])
