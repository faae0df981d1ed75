"""What a careless or hostile client sends, against the real server process: every bad value is a
400 in the error envelope naming the field, nothing reaches the decode step that could break it for
the requests beside it, and the server stays healthy (docs/operations.md "Reliability")."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import pytest_asyncio

pytestmark = pytest.mark.asyncio

QUESTION = [{"role": "user", "content": "Is the earth flat?"}]
HEALTHY = ["Hello", "What is the capital of France?", "quick brown fox"]


@pytest_asyncio.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        yield client


def chat(server, **fields) -> dict:
    return {"model": server.model, "messages": QUESTION, "max_tokens": 8, "temperature": 0, **fields}


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    return error


async def assert_healthy(http: httpx.AsyncClient, server) -> None:
    assert (await http.get("/health")).status_code == 200
    response = await http.post("/v1/chat/completions", json=chat(server, max_tokens=3))
    assert response.status_code == 200, response.text


BAD_VALUES = [
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 2**21}, "top_k"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"max_completion_tokens": 10**30}, "max_completion_tokens"),
    ({"n": 129}, "n"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"stop": ["x" * 257]}, "stop.0"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"seed": 2**70}, "seed"),
    ({"steering": {"mode": "fasb", "alpha": 1e30}}, "steering.alpha"),
    ({"steering": {"mode": "fasb", "max_backtracks": 1_000_000_000}}, "steering.max_backtracks"),
    ({"steering": {"mode": "fasb", "backtrack_tokens": 10**6}}, "steering.backtrack_tokens"),
    ({"steering": {"mode": "fasb", "num_heads": 10**9}}, "steering.num_heads"),
    ({"steering": {"mode": "fasb", "num_heads": 5}}, "steering.num_heads"),  # the artifact has 4
]


@pytest.mark.parametrize("fields,param", BAD_VALUES, ids=[p for _, p in BAD_VALUES])
async def test_out_of_range_values_are_400_naming_the_field(http, server, fields, param):
    assert_envelope(await http.post("/v1/chat/completions", json=chat(server, **fields)), 400, param)


@pytest.mark.parametrize("literal,param", [
    ('{"temperature": NaN}', "temperature"),
    ('{"top_p": Infinity}', "top_p"),
    ('{"steering": {"mode": "always", "alpha": Infinity}}', "steering.alpha"),
    ('{"steering": {"mode": "fasb", "threshold": -Infinity}}', "steering.threshold"),
])
async def test_non_finite_numbers_are_400(http, server, literal, param):
    # Python's JSON parser accepts NaN/Infinity: they must not get past validation either.
    body = {**chat(server), **{}}
    raw = json.dumps(body)[:-1] + ", " + literal[1:]
    response = await http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_envelope(response, 400, param)
    await assert_healthy(http, server)


async def test_lone_surrogates_are_answered_not_crashed_on(http, server):
    # "\ud800" is valid JSON but no valid Unicode: echoed as is into a message it would make the
    # answer itself unencodable (a 500).
    model = json.dumps(chat(server)).replace(json.dumps(server.model), '"bad\\ud800model"')
    response = await http.post("/v1/chat/completions", content=model, headers={"content-type": "application/json"})
    assert "\\ud800" in assert_envelope(response, 404, "model")["message"]
    behavior = json.dumps(chat(server, steering={"mode": "fasb", "behavior": "SURROGATE"}))
    behavior = behavior.replace("SURROGATE", "\\ud800")
    response = await http.post("/v1/chat/completions", content=behavior, headers={"content-type": "application/json"})
    assert_envelope(response, 400, "steering.behavior")
    await assert_healthy(http, server)


async def test_endless_backtracking_is_refused_or_bounded(http, server):
    endless = {"mode": "fasb", "threshold": 1, "backtrack_tokens": 1, "max_backtracks": 1_000_000_000}
    assert_envelope(await http.post("/v1/chat/completions", json=chat(server, max_tokens=4, steering=endless)),
                    400, "steering.max_backtracks")
    capped = {**endless, "max_backtracks": 32}
    bodies = [chat(server, max_tokens=4, ignore_eos=True, steering=capped) for _ in range(8)]  # fill the batch
    responses = await asyncio.wait_for(
        asyncio.gather(*(http.post("/v1/chat/completions", json=body) for body in bodies)), timeout=120)
    for response in responses:
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["completion_tokens"] + usage["discarded_tokens"] <= 4 * 4  # docs/operations.md: 4x max_tokens
    await assert_healthy(http, server)


async def answer(http, body) -> tuple[str, str]:
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


async def test_poisoned_requests_beside_healthy_ones_change_none_of_their_tokens(http, server):
    healthy = [{**chat(server, max_tokens=24), "messages": [{"role": "user", "content": t}]} for t in HEALTHY]
    alone = [await answer(http, body) for body in healthy]
    poison = [chat(server, **fields) for fields, _ in BAD_VALUES]
    poison.append(chat(server, max_tokens=4, ignore_eos=True,
                       steering={"mode": "fasb", "threshold": 1, "backtrack_tokens": 1, "max_backtracks": 32}))
    outcomes = await asyncio.gather(*(answer(http, body) for body in healthy),
                                    *(http.post("/v1/chat/completions", json=body) for body in poison))
    assert list(outcomes[: len(healthy)]) == alone
    assert all(r.status_code in (200, 400) for r in outcomes[len(healthy):])


async def test_forged_log_lines_are_escaped(http, server):
    await http.get("/v1/models%0aFORGED%20line%20status=200")
    await http.get("/v1/models%0d%0aFORGED2")
    await asyncio.sleep(0.5)
    lines = server.log().splitlines()
    assert not any(line.startswith(("FORGED", "\rFORGED")) for line in lines)
    assert any("\\nFORGED line" in line for line in lines)


async def max_health_latency_during(http: httpx.AsyncClient, work) -> tuple[object, float]:
    """Run `work` while polling /health; the slowest /health answer (seconds)."""
    done = asyncio.Event()
    worst = 0.0

    async def poll():
        nonlocal worst
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=30) as prober:
            while not done.is_set():
                started = time.monotonic()
                assert (await prober.get("/health")).status_code == 200
                worst = max(worst, time.monotonic() - started)
                await asyncio.sleep(0.02)

    poller = asyncio.create_task(poll())
    try:
        result = await work
    finally:
        done.set()
        await poller
    return result, worst


async def test_huge_body_is_413_at_once_and_health_never_stalls(http, server):
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (50 * 1024 * 1024) + b'"}]}'
    started = time.monotonic()
    response, worst = await max_health_latency_during(
        http, http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}))
    assert_envelope(response, 413)
    assert response.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 5  # the 50 MB upload itself dominates; nothing is parsed
    assert worst < 1.0


async def test_huge_chunked_body_is_413(http, server):
    async def chunks():
        for _ in range(50):
            yield b"a" * (1024 * 1024)

    response = await http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_envelope(response, 413)
    await assert_healthy(http, server)


async def test_prompt_too_long_for_the_context_is_refused_without_stalling(http, server):
    text = "word " * 600_000  # 3 MB: under the body limit, far beyond the 4096-token context
    body = {**chat(server), "messages": [{"role": "user", "content": text}]}
    response, worst = await max_health_latency_during(http, http.post("/v1/chat/completions", json=body))
    assert assert_envelope(response, 400, "messages")["code"] == "context_length_exceeded"
    assert worst < 1.0


async def test_openapi_describes_streams_and_the_steering_extension(http):
    schema = (await http.get("/openapi.json")).json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= ok.keys()
    assert "SteeringRequest" in schema["components"]["schemas"]
    assert "ChatCompletionChunk" in schema["components"]["schemas"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
BAD_TOOL_REQUESTS = [
    # a schema the grammar engine cannot compile: named as the tools' field
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_1", "content": "42"}], "tools": [WEATHER_TOOL]},
     "messages.1.tool_call_id"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_TOOL_REQUESTS)
async def test_bad_tool_requests_are_400_naming_the_field(http, server, fields, param):
    response = await http.post("/v1/chat/completions", json=chat(server, **fields))
    assert_envelope(response, 400, param)


BAD_RESPONSES_REQUESTS = [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "42"}]}, "input.0.call_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?<=a)b"}}}}], "tool_choice": "required"}, "tools"),
    ({"text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "array", "uniqueItems": True}}}},
     "text.format.schema"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_RESPONSES_REQUESTS)
async def test_bad_responses_requests_are_400_naming_the_field(http, server, fields, param):
    body = {"model": server.model, "input": "Hello", "max_output_tokens": 4, **fields}
    assert_envelope(await http.post("/v1/responses", json=body), 400, param)
    await assert_healthy(http, server)
