"""The app in-process, over ASGI, with a scripted FakeEngine (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import httpx2
import openai
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager

from server.api.app import create_app
from server.config import Settings
from server.errors import QueueFullError
from tests.fake_engine import FakeEngine, plain_script
from tests.streams import shown_text

pytestmark = pytest.mark.asyncio

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
FINAL_TEXT = "Paris is the capital."  # backtracking_script after its retraction
USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11, "discarded_tokens": 2,
         "prompt_tokens_details": {"cached_tokens": 0}}


async def until_ready(engine: FakeEngine) -> None:
    while not engine.ready:
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine, **settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(**settings), engine)
    async with LifespanManager(app):
        # raise_app_exceptions=False: see the 500 envelope the way a real client would.
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest_asyncio.fixture
async def engine() -> FakeEngine:
    return FakeEngine()


@pytest_asyncio.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(engine) as client:
        await until_ready(engine)
        yield client


def sse_payloads(body: str) -> list[str]:
    events = [event for event in body.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --------------------------------------------------------------------------- streaming


async def test_chat_stream_invariants(client):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "steering": {"mode": "fasb"}}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]

    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert len(finishes) == 1 and finishes[0]["choices"][0]["finish_reason"] == "stop"
    assert finishes[0]["choices"][0]["steering"]["backtracks"][0]["tokens_retracted"] == 2

    retracts = [c["choices"][0] for c in chunks if "steering" in (c["choices"] or [{}])[0]
                and c["choices"][0]["steering"].get("type") == "retract"]
    assert retracts == [{
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": None,
        "steering": {"type": "retract", "retract_tokens": 2, "retract_text": " in Italy",
                     "probe_score": 0.31, "strength": 41.4, "behavior": "truthfulness",
                     "behaviors": ["truthfulness"]},
    }]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE
    assert all("usage" not in c for c in chunks[:-1])
    assert shown_text(chunks) == FINAL_TEXT


async def test_stream_without_include_usage_has_no_usage_chunk(client):
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_stream_with_n_choices_gives_each_one_role_and_one_finish(client, engine):
    engine.script = plain_script
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 3, "seed": 5})
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    for index in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert sum(choice["finish_reason"] is not None for choice in mine) == 1
        assert "".join(choice["delta"].get("content", "") for choice in mine) == f"seed={5 + index}"


async def test_error_after_streaming_started_is_sent_in_band(client, engine):
    engine.stream_options = {"fail_with": RuntimeError("secret engine state")}
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "internal_error" and "secret" not in response.text
    assert engine.streams[0].cancelled


async def test_completion_stream(client):
    body = {"model": MODEL, "prompt": "The capital of France", "stream": True, "logprobs": 1}
    response = await client.post("/v1/completions", json=body)
    payloads = sse_payloads(response.text)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert payloads[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks)
    text = ""
    for choice in (c["choices"][0] for c in chunks):
        if choice.get("steering", {}).get("type") == "retract":
            text = text.removesuffix(choice["steering"]["retract_text"])
        text += choice["text"]
    assert text == FINAL_TEXT
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1


# --------------------------------------------------------------------------- non-streamed


async def test_chat_non_stream_applies_retractions(client, engine):
    response = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 1})
    assert response.status_code == 200
    body = response.json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert choice["message"] == {"role": "assistant", "content": FINAL_TEXT}
    assert choice["finish_reason"] == "stop"
    assert [entry["token"] for entry in choice["logprobs"]["content"]] == ["Paris", " is", " the", " capital."]
    assert choice["steering"] == {
        "mode": "fasb", "behavior": "truthfulness", "behaviors": ["truthfulness"], "intervened": True,
        "backtracks": [{"token_index": 4, "tokens_retracted": 2, "probe_score": 0.31, "strength": 41.4,
                        "behavior": "truthfulness", "behaviors": ["truthfulness"]}],
    }
    assert body["usage"] == USAGE
    assert engine.submitted[0].steering is None  # no steering object: the server's defaults


async def test_n_choices_sum_completion_tokens(client, engine):
    engine.script = plain_script
    body = (await client.post("/v1/chat/completions", json={**CHAT, "n": 2, "seed": 1})).json()
    assert [c["message"]["content"] for c in body["choices"]] == ["seed=1", "seed=2"]
    assert body["usage"]["completion_tokens"] == 2 and body["usage"]["prompt_tokens"] == 7


async def test_completion_non_stream(client):
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "logprobs": 1})
    choice = response.json()["choices"][0]
    assert choice["text"] == FINAL_TEXT
    assert choice["logprobs"]["text_offset"] == [0, 5, 8, 12]


async def test_models_lists_the_model_and_its_behaviors(client):
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == MODEL
    assert body["data"][0]["steering_behaviors"][0]["name"] == "truthfulness"


# --------------------------------------------------------------------------- errors


async def test_api_key_is_required_on_v1_only():
    engine = FakeEngine()
    async with serving(engine, api_key="sesame") as client:
        await until_ready(engine)
        error = assert_error(await client.post("/v1/chat/completions", json=CHAT), 401, "invalid_request_error")
        assert error["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert_error(await client.get("/v1/models", headers=wrong), 401, "invalid_request_error")
        right = {"Authorization": "Bearer sesame"}
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=right)).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_playground_page_and_its_files_load_without_the_key():
    engine = FakeEngine()
    async with serving(engine, api_key="sesame") as client:
        for path in ("/", "/playground"):
            page = await client.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert '<script type="module" src="/playground/app.js">' in page.text
        assert (await client.get("/playground/app.js")).headers["content-type"].startswith("text/javascript")
        assert (await client.get("/playground/style.css")).headers["content-type"].startswith("text/css")
        assert_error(await client.get("/playground/routes.py"), 401, "invalid_request_error")  # not an open path
        right = {"Authorization": "Bearer sesame"}
        missing = assert_error(await client.get("/playground/routes.py", headers=right), 404, "invalid_request_error")
        assert missing["code"] == "not_found"
        assert_error(await client.get("/v1/models"), 401, "invalid_request_error")  # the API still needs it


async def test_api_key_is_checked_before_the_body_is_read_or_parsed():
    engine = FakeEngine()
    async with serving(engine, api_key="sesame", max_body_bytes=1024) as client:
        await until_ready(engine)
        malformed = await client.post("/v1/chat/completions", content=b"{not json",
                                      headers={"content-type": "application/json"})
        assert_error(malformed, 401, "invalid_request_error")
        huge = await client.post("/v1/chat/completions", content=b"x" * 10_000)
        assert_error(huge, 401, "invalid_request_error")  # not 413, not 400: nobody looked at it
        right = {"Authorization": "Bearer sesame"}
        too_big = await client.post("/v1/chat/completions", content=b"x" * 10_000, headers=right)
        assert assert_error(too_big, 413, "invalid_request_error")["code"] == "request_too_large"


async def test_body_limit_applies_to_declared_and_streamed_bodies():
    engine = FakeEngine()
    async with serving(engine, max_body_bytes=2048) as client:
        await until_ready(engine)
        assert_error(await client.post("/v1/chat/completions", content=b"x" * 4096), 413, "invalid_request_error")

        async def chunked():
            for _ in range(8):
                yield b"x" * 512

        assert_error(await client.post("/v1/chat/completions", content=chunked()), 413, "invalid_request_error")
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_health_reports_the_worker_and_the_drain(client, engine):
    engine.state = "dead"
    error = assert_error(await client.get("/health"), 503, "service_unavailable")
    assert error["code"] == "engine_unhealthy"
    engine.state = "draining"
    response = await client.get("/health")
    assert response.json()["error"]["code"] == "shutting_down" and response.headers["retry-after"] == "1"


async def test_drain_waits_then_ends_what_is_left_with_an_error(engine):
    from server.api.app import drain

    engine.stream_options = {"endless": True, "delay_s": 0.01}
    app = create_app(Settings(), engine)
    async with LifespanManager(app):
        await until_ready(engine)
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            streaming = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
            while not engine.streams:
                await asyncio.sleep(0.01)
            await drain(app, timeout_s=0.2)
            payloads = sse_payloads((await streaming).text)
            assert payloads[-1] == "[DONE]"
            assert json.loads(payloads[-2])["error"]["code"] == "shutting_down"
            refused = await client.post("/v1/chat/completions", json=CHAT)
            assert assert_error(refused, 503, "service_unavailable")["code"] == "shutting_down"


async def test_queue_full_and_loading_carry_retry_after(client, engine):
    engine.submit_error = QueueFullError()
    assert (await client.post("/v1/chat/completions", json=CHAT)).headers["retry-after"] == "1"


async def test_unknown_model_is_404(client):
    error = assert_error(await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}),
                         404, "invalid_request_error", "model")
    assert error["code"] == "model_not_found"


async def test_full_queue_is_429(client, engine):
    engine.submit_error = QueueFullError()
    assert_error(await client.post("/v1/chat/completions", json=CHAT), 429, "rate_limit_error")


async def test_engine_errors_keep_their_param(client):
    body = {**CHAT, "steering": {"behavior": "flattery"}}
    response = await client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, "invalid_request_error", "steering.behavior")


async def test_health_is_503_while_loading_then_200():
    engine = FakeEngine(start_gate=asyncio.Event())
    async with serving(engine) as client:
        error = assert_error(await client.get("/health"), 503, "service_unavailable")
        assert error["code"] == "model_loading"
        assert_error(await client.post("/v1/chat/completions", json=CHAT), 503, "service_unavailable")
        assert (await client.get("/metrics")).status_code == 200
        engine.start_gate.set()
        await until_ready(engine)
        assert (await client.get("/health")).json() == {"status": "ok"}
    assert engine.stopped


async def test_failed_load_is_500_on_health():
    class Broken(FakeEngine):
        async def start(self):
            raise OSError("no such model folder")

    async with serving(Broken()) as client:
        await asyncio.sleep(0.01)
        error = assert_error(await client.get("/health"), 500, "internal_error")
        assert "no such" not in error["message"]


async def test_engine_bug_is_a_500_without_traceback(client, engine, monkeypatch):
    def broken_encode(messages):
        raise KeyError("secret internals")

    monkeypatch.setattr(engine, "encode_chat", broken_encode)
    response = await client.post("/v1/chat/completions", json=CHAT)
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text and error["code"] is None


@pytest.mark.parametrize(
    "content, param",
    [
        (b"{not json", None),
        (b"", None),
        (b"[]", None),
        (json.dumps({**CHAT, "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({**CHAT, "messages": "hello"}).encode(), "messages"),
        (json.dumps({**CHAT, "max_tokens": -1}).encode(), "max_tokens"),
        (json.dumps({**CHAT, "max_tokens": 10**9}).encode(), "max_tokens"),  # beyond the context: engine's 400
        (json.dumps({**CHAT, "messages": []}).encode(), "messages"),
        (json.dumps({**CHAT, "steering": {"alpha": 1, "foo": 2}}).encode(), "steering.foo"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(client, content, param):
    response = await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request_error", param)


async def test_unknown_route_and_method_use_the_envelope(client):
    assert_error(await client.get("/v1/nothing"), 404, "invalid_request_error")
    assert_error(await client.get("/v1/chat/completions"), 405, "invalid_request_error")


# --------------------------------------------------------------------------- disconnects


async def call_and_hang_up(app, path: str, body: dict, after_chunks: int) -> list[bytes]:
    """Drive `app` like a server whose client disconnects after `after_chunks` body messages."""
    hung_up = asyncio.Event()
    if after_chunks == 0:
        hung_up.set()
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    received: list[bytes] = []

    async def receive():
        if request:
            return request.pop()
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if len(received) >= after_chunks:
                hung_up.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return received


@pytest.mark.parametrize("stream, after_chunks", [(True, 3), (False, 0)])
async def test_client_disconnect_cancels_the_generation(stream, after_chunks):
    engine = FakeEngine(stream_options={"endless": True, "delay_s": 0.005})
    app = create_app(Settings(), engine)
    async with LifespanManager(app):
        await until_ready(engine)
        await call_and_hang_up(app, "/v1/chat/completions", {**CHAT, "stream": stream}, after_chunks)
        assert engine.streams and all(stream.cancelled for stream in engine.streams)
        assert engine.stats()["running"] == 0


# --------------------------------------------------------------------------- the OpenAI SDK


@contextlib.asynccontextmanager
async def openai_client(engine: FakeEngine) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(Settings(), engine)
    async with LifespanManager(app):
        await until_ready(engine)
        http_client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app))
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http_client) as sdk:
            yield sdk


async def test_openai_sdk_parses_normal_and_retract_chunks():
    engine = FakeEngine()
    async with openai_client(engine) as sdk:
        steering = {"mode": "fasb", "alpha": 6, "stream_mode": "retract"}
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=CHAT["messages"], stream=True, extra_body={"steering": steering}
        )
        text, retracts = "", []
        async for chunk in stream:
            choice = chunk.choices[0]
            extra = getattr(choice, "steering", None)
            if extra and extra.get("type") == "retract":
                retracts.append(extra)
                text = text.removesuffix(extra["retract_text"])
            text += choice.delta.content or ""
        assert text == FINAL_TEXT and retracts[0]["retract_tokens"] == 2
        assert engine.submitted[0].steering.alpha == 6 and engine.submitted[0].steering.stream_mode == "retract"

        completion = await sdk.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert completion.choices[0].message.content == FINAL_TEXT
        assert completion.usage.completion_tokens == 4 and completion.usage.discarded_tokens == 2


async def test_openai_sdk_raises_typed_errors():
    async with openai_client(FakeEngine()) as sdk:
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.chat.completions.create(model=MODEL, messages=CHAT["messages"], extra_body={"steering": {"x": 1}})
        assert info.value.param == "steering.x"
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="nope", messages=CHAT["messages"])


# --------------------------------------------------------------------------- observability


async def test_one_log_line_and_metrics_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="server.api.requests"):
        response = await client.post("/v1/chat/completions", json=CHAT)
    request_id = response.headers["x-request-id"]
    assert response.json()["id"] == f"chatcmpl-{request_id}"
    [line] = [r.getMessage() for r in caplog.records if r.name == "server.api.requests"]
    assert request_id in line
    for field in ("model=fake-model", "prompt_tokens=7", "completion_tokens=4", "discarded_tokens=2",
                  "backtracks=1", "finish=stop", "status=200", "latency_ms="):
        assert field in line

    metrics = (await client.get("/metrics")).text
    assert 'fasb_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics
    assert "fasb_request_latency_seconds_count" in metrics and "fasb_queue_running 0.0" in metrics
