"""The real server process on the tiny random model: OpenAI SDK, raw HTTP, bad inputs, disconnects."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from tests.e2e.harness import running_server

pytestmark = pytest.mark.asyncio

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def queue_running(http: httpx.AsyncClient) -> float:
    metrics = (await http.get("/metrics")).text
    return float(re.search(r"^fasb_queue_running (\S+)$", metrics, re.M).group(1))


async def assert_still_serving(http: httpx.AsyncClient, model: str) -> None:
    assert (await http.get("/health")).json() == {"status": "ok"}
    body = {"model": model, "messages": QUESTION, "max_tokens": 3}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


async def test_health_models_and_metrics(http, tiny_server):
    assert (await http.get("/health")).json() == {"status": "ok"}
    models = (await http.get("/v1/models")).json()
    assert models["data"][0]["id"] == tiny_server.model
    assert models["data"][0]["steering_behaviors"] == []
    metrics = await http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain") and "fasb_queue_waiting" in metrics.text


async def test_greedy_stream_equals_non_stream(sdk, tiny_server):
    params = {"model": tiny_server.model, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    whole = await sdk.chat.completions.create(**params)
    stream = await sdk.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    pieces, finish_reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish_reasons == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 0


async def metric(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def cached_server(tiny_model_dir, tmp_path_factory):
    """The tiny model's server with a prefix cache of its own."""
    args = ["--model", str(tiny_model_dir), "--no-default-artifacts", "--prefix-cache-mb", "16"]
    with running_server(args, tmp_path_factory.mktemp("server-logs") / "cached.log") as server:
        yield server


async def test_a_next_chat_turn_reads_its_history_from_the_prefix_cache(cached_server):
    async with (openai.AsyncOpenAI(base_url=f"{cached_server.base_url}/v1", api_key="unused", max_retries=0) as sdk,
                httpx.AsyncClient(base_url=cached_server.base_url, timeout=60) as http):
        await check_the_next_turn_reuses_the_first(sdk, http, cached_server.model)


async def check_the_next_turn_reuses_the_first(sdk, http, model):
    system = {"role": "system", "content": "You answer questions about the weather in one sentence."}
    messages = [system, {"role": "user", "content": "Will it rain tomorrow?"}]
    params = {"model": model, "max_tokens": 20, "temperature": 0}  # the tiny model has 256 positions
    hits_before = await metric(http, "fasb_prefix_cache_hit_tokens_total")
    first = await sdk.chat.completions.create(messages=messages, **params)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the day after?"}]
    stream = await sdk.chat.completions.create(messages=messages, **params, stream=True,
                                               stream_options={"include_usage": True})
    usage = [chunk.usage async for chunk in stream if chunk.usage is not None][0]
    cached = usage.prompt_tokens_details.cached_tokens
    # the first turn's prompt at least (the random model's answer may not tokenise back to the
    # tokens it generated, so its share is not asserted here)
    assert first.usage.prompt_tokens - 1 <= cached < usage.prompt_tokens
    assert await metric(http, "fasb_prefix_cache_hit_tokens_total") - hits_before >= cached
    assert await metric(http, "fasb_prefix_cache_blocks") > 0
    assert await metric(http, "fasb_kv_cache_bytes") >= 0


async def test_completions_stream_equals_non_stream(http, tiny_server):
    body = {"model": tiny_server.model, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    whole = (await http.post("/v1/completions", json=body)).json()
    response = await http.post("/v1/completions", json={**body, "stream": True})
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    streamed = "".join(choice["text"] for line in lines[:-1] for choice in json.loads(line)["choices"])
    assert streamed == whole["choices"][0]["text"]


async def test_seed_makes_sampling_repeatable(sdk, tiny_server):
    params = {"model": tiny_server.model, "messages": QUESTION, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    first = await sdk.chat.completions.create(**params)
    second = await sdk.chat.completions.create(**params)
    assert first.choices[0].message.content == second.choices[0].message.content
    several = await sdk.chat.completions.create(**params, n=2)
    assert [c.index for c in several.choices] == [0, 1]
    assert 0 < several.usage.completion_tokens <= 2 * 12


@pytest.mark.parametrize("seed", [-5, 2**63 - 1])  # the edges of OpenAI's 64-bit seed; n=2 runs seed + 1
async def test_any_64_bit_seed_is_served(sdk, tiny_server, seed):
    params = {"model": tiny_server.model, "messages": QUESTION, "max_tokens": 4, "temperature": 1.0, "seed": seed}
    answer = await sdk.chat.completions.create(**params, n=2)
    assert len(answer.choices) == 2


async def test_retrieve_model_by_id(sdk, tiny_server):
    card = await sdk.models.retrieve(tiny_server.model)
    assert card.id == tiny_server.model
    with pytest.raises(openai.NotFoundError) as err:
        await sdk.models.retrieve("not-served/model")
    assert err.value.body["code"] == "model_not_found"


BAD_REQUESTS = [
    # (fields besides `model`, or the raw body, status, param)
    (b"{oops", 400, None),
    (json.dumps({"messages": QUESTION}).encode(), 400, "model"),
    ({"model": "not-served", "messages": QUESTION}, 404, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content.0.type"),
    ({"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),  # longer than the context
    ({"messages": QUESTION, "temperature": "warm"}, 400, "temperature"),
    ({"messages": QUESTION, "n": 129}, 400, "n"),
    ({"messages": QUESTION, "steering": {"mode": "fasb", "strength": 3}}, 400, "steering.strength"),
    ({"messages": QUESTION, "steering": {"threshold": 2}}, 400, "steering.threshold"),
    ({"messages": QUESTION, "seed": 2**70}, 400, "seed"),  # beyond 64 bits (was a 500)
]


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS)
async def test_bad_request_gets_an_envelope_and_the_server_keeps_serving(http, tiny_server, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({"model": tiny_server.model, **body}).encode()
    response = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert "Traceback" not in response.text
    await assert_still_serving(http, tiny_server.model)


async def test_engine_rejections_are_400s(http, tiny_server):
    steering = {"model": tiny_server.model, "messages": QUESTION, "steering": {"mode": "fasb"}}
    response = await http.post("/v1/chat/completions", json=steering)
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("steering")
    ids = {"model": tiny_server.model, "prompt": [10**6]}
    response = await http.post("/v1/completions", json=ids)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    await assert_still_serving(http, tiny_server.model)


async def test_client_disconnect_mid_stream_stops_the_generation(http, tiny_server):
    body = {"model": tiny_server.model, "messages": QUESTION, "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        request_id = response.headers["x-request-id"]
        lines = response.aiter_lines()
        for _ in range(4):
            await anext(lines)
    deadline = time.monotonic() + 10
    while await queue_running(http) != 0:
        assert time.monotonic() < deadline, "the abandoned generation is still running"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # the request log line is written when the response ends
    [line] = [line for line in tiny_server.log().splitlines() if request_id in line]
    assert "finish=-" in line, line  # no Finished event: it was cancelled, not run to the end
    await assert_still_serving(http, tiny_server.model)


async def test_health_and_metrics_answer_during_a_long_generation(http, tiny_server):
    body = {"model": tiny_server.model, "messages": QUESTION, "max_tokens": 200, "ignore_eos": True, "n": 4}
    generation = asyncio.create_task(http.post("/v1/chat/completions", json=body))
    saw_running = False
    while not generation.done():
        started = time.monotonic()
        assert (await http.get("/health")).status_code == 200
        saw_running |= await queue_running(http) > 0
        assert time.monotonic() - started < 2.0, "health/metrics were blocked by the generation"
        await asyncio.sleep(0.05)
    response = await generation
    assert response.status_code == 200
    assert all(choice["finish_reason"] == "length" for choice in response.json()["choices"])
    assert saw_running
