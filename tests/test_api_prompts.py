"""/v1/completions with several prompts and with echo; /tokenize and /detokenize. In-process,
over ASGI, with the scripted FakeEngine (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from server.engine.types import Finished, GenerationRequest, TextDelta
from tests.fake_engine import BOS, FakeEngine
from tests.test_api_app import MODEL, assert_error, serving, sse_payloads, until_ready

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def engine() -> FakeEngine:
    return FakeEngine()


@pytest_asyncio.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(engine) as client:
        await until_ready(engine)
        yield client


def prompt_script(request: GenerationRequest) -> list:
    """Text that names the prompt (its length) and the choice (its seed)."""
    prompt = request.prompt_token_ids
    text = f"<{len(prompt)}:{request.sampling.seed}>"
    return [TextDelta(text, [1]), Finished("stop", len(prompt), 1, 0, None)]


def completions_body(**fields) -> dict:
    return {"model": MODEL, "seed": 0, **fields}


def streamed_texts(response) -> dict[int, str]:
    texts: dict[int, str] = {}
    for payload in sse_payloads(response.text)[:-1]:
        for choice in json.loads(payload)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


PROMPT_FORMS = [
    (["ab", "wxyz"], [3, 5]),  # the fake tokenizer: BOS + one token per character
    ([[7, 8], [7, 8, 9, 10]], [2, 4]),
]


@pytest.mark.parametrize("prompt, lengths", PROMPT_FORMS)
async def test_choices_are_prompt_major(client, engine, prompt, lengths):
    engine.script = prompt_script
    response = await client.post("/v1/completions", json=completions_body(prompt=prompt, n=2))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    expected = [f"<{length}:{seed}>" for length in lengths for seed in (0, 1)]
    assert [c["text"] for c in body["choices"]] == expected
    assert body["usage"] == {
        "prompt_tokens": sum(lengths), "completion_tokens": 4, "total_tokens": sum(lengths) + 4, "discarded_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


@pytest.mark.parametrize("prompt, lengths", PROMPT_FORMS)
async def test_streamed_choices_are_prompt_major(client, engine, prompt, lengths):
    engine.script = prompt_script
    body = completions_body(prompt=prompt, n=2, stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/completions", json=body)
    assert streamed_texts(response) == {i: f"<{lengths[i // 2]}:{i % 2}>" for i in range(4)}
    usage = json.loads(sse_payloads(response.text)[-2])["usage"]
    assert usage["prompt_tokens"] == sum(lengths) and usage["completion_tokens"] == 4


async def test_a_batch_gives_each_prompt_what_it_gets_alone(client, engine):
    engine.script = prompt_script
    prompts = ["one", "three", "x"]
    batched = (await client.post("/v1/completions", json=completions_body(prompt=prompts))).json()
    alone = [(await client.post("/v1/completions", json=completions_body(prompt=p))).json() for p in prompts]
    assert [c["text"] for c in batched["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert batched["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)


async def test_echo_prepends_each_prompt(client, engine):
    engine.script = prompt_script
    body = completions_body(prompt=["ab", "c"], n=2, echo=True)
    choices = (await client.post("/v1/completions", json=body)).json()["choices"]
    assert [c["text"] for c in choices] == ["ab<3:0>", "ab<3:1>", "c<2:0>", "c<2:1>"]


async def test_echo_of_token_ids_is_their_text(client, engine):
    engine.script = prompt_script
    body = completions_body(prompt=[[72, 105]], echo=True)
    assert (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"] == "Hi<2:0>"


async def test_streamed_echo_comes_first(client, engine):
    engine.script = prompt_script
    response = await client.post("/v1/completions", json=completions_body(prompt=["ab", "c"], echo=True, stream=True))
    first = json.loads(sse_payloads(response.text)[0])["choices"][0]
    assert first["text"] in ("ab", "c") and first["finish_reason"] is None
    assert streamed_texts(response) == {0: "ab<3:0>", 1: "c<2:0>"}


async def test_echo_with_backtracking_keeps_the_prompt(client):
    body = completions_body(prompt="Q: ", echo=True)
    assert (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"] == "Q: Paris is the capital."


async def test_echo_with_logprobs_is_a_400(client):
    response = await client.post("/v1/completions", json=completions_body(prompt="a", echo=True, logprobs=1))
    assert "logprobs" in assert_error(response, 400, "invalid_request_error", "echo")["message"]


async def test_more_choices_than_the_queue_holds_is_a_400_naming_the_prompt():
    engine = FakeEngine(max_queue=4)
    async with serving(engine) as client:
        await until_ready(engine)
        response = await client.post("/v1/completions", json=completions_body(prompt=["a", "b", "c"], n=2))
        assert "6 choices" in assert_error(response, 400, "invalid_request_error", "prompt")["message"]
        assert not engine.submitted
        assert (await client.post("/v1/completions", json=completions_body(prompt=["a", "b"], n=2))).status_code == 200


async def test_a_bad_prompt_in_a_batch_submits_nothing(client, engine):
    long = "x" * (engine.max_model_len + 1)
    response = await client.post("/v1/completions", json=completions_body(prompt=["fine", long]))
    assert_error(response, 400, "invalid_request_error", "prompt")
    assert not engine.submitted


# --------------------------------------------------------------------------- /tokenize, /detokenize


async def test_tokenize_a_prompt(client):
    body = (await client.post("/tokenize", json={"model": MODEL, "prompt": "Hi"})).json()
    assert body == {"count": 3, "max_model_len": 64, "tokens": [BOS, 72, 105], "token_strs": None}
    bare = (await client.post("/tokenize", json={"prompt": "Hi", "add_special_tokens": False})).json()
    assert bare["tokens"] == [72, 105]


async def test_tokenize_returns_token_strings_on_request(client):
    body = (await client.post("/tokenize", json={"prompt": "Hi", "return_token_strs": True})).json()
    assert body["token_strs"] == [f"<{BOS}>", "<72>", "<105>"]


async def test_tokenize_messages_uses_the_chat_template(client, engine):
    messages = [{"role": "user", "content": "Hi"}]
    body = (await client.post("/tokenize", json={"messages": messages})).json()
    assert body["tokens"] == engine.encode_chat([{"role": "user", "content": "Hi"}])
    plain = (await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})).json()
    assert body["count"] == plain["count"] + len("assistant")


async def test_detokenize_inverts_tokenize(client):
    tokens = (await client.post("/tokenize", json={"prompt": "round trip", "add_special_tokens": False})).json()
    body = (await client.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})).json()
    assert body == {"prompt": "round trip"}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "messages"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
        ("/tokenize", {"prompt": "x" * 65}, "prompt"),  # longer than the context
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ],
)
async def test_tokenize_and_detokenize_refuse_bad_input(client, path, body, param):
    assert_error(await client.post(path, json=body), 400, "invalid_request_error", param)
    assert (await client.post("/tokenize", json={"prompt": "still fine"})).status_code == 200


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_tokenize_and_detokenize_check_the_model(client, path):
    body = {"model": "gpt-4", "prompt": "a", "tokens": [1]}
    assert_error(await client.post(path, json=body), 404, "invalid_request_error", "model")


@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [65]})])
async def test_tokenize_and_detokenize_need_the_api_key(path, body):
    engine = FakeEngine()
    async with serving(engine, api_key="sesame") as client:
        await until_ready(engine)
        error = assert_error(await client.post(path, json=body), 401, "invalid_request_error")
        assert error["code"] == "invalid_api_key"
        assert (await client.post(path, json=body, headers={"Authorization": "Bearer sesame"})).status_code == 200


async def test_tokenize_is_503_while_the_model_loads():
    engine = FakeEngine(start_gate=asyncio.Event())
    async with serving(engine) as client:
        response = await client.post("/tokenize", json={"prompt": "a"})
        assert response.status_code == 503
        engine.start_gate.set()
