"""The real server on the tiny random model: several prompts in one /v1/completions request, echo,
/tokenize and /detokenize, and the raised n / stop caps, through the `openai` SDK and httpx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

pytestmark = pytest.mark.asyncio

PROMPTS = ["The quick brown fox", "What is the capital of France?", "Hello world! How are"]
GREEDY = {"max_tokens": 10, "temperature": 0}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def assert_still_serving(http: httpx.AsyncClient, model: str) -> None:
    assert (await http.get("/health")).json() == {"status": "ok"}
    response = await http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200, response.text


async def streamed_texts(stream) -> dict[int, str]:
    texts: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return texts


async def test_batched_string_prompts_give_the_single_prompt_texts(sdk, tiny_server):
    alone = [await sdk.completions.create(model=tiny_server.model, prompt=p, **GREEDY) for p in PROMPTS]
    batched = await sdk.completions.create(model=tiny_server.model, prompt=PROMPTS, **GREEDY)
    assert [c.index for c in batched.choices] == [0, 1, 2]
    assert [c.text for c in batched.choices] == [a.choices[0].text for a in alone]
    assert [c.finish_reason for c in batched.choices] == [a.choices[0].finish_reason for a in alone]
    assert batched.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batched.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    stream = await sdk.completions.create(model=tiny_server.model, prompt=PROMPTS, stream=True, **GREEDY)
    assert await streamed_texts(stream) == {i: a.choices[0].text for i, a in enumerate(alone)}


async def test_batched_token_prompts_with_n_are_prompt_major(sdk, tiny_server, tokenizer):
    ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    alone = [await sdk.completions.create(model=tiny_server.model, prompt=i, **GREEDY) for i in ids]
    batched = await sdk.completions.create(model=tiny_server.model, prompt=ids, n=2, **GREEDY)
    assert [c.index for c in batched.choices] == [0, 1, 2, 3]
    assert [c.text for c in batched.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    stream = await sdk.completions.create(
        model=tiny_server.model, prompt=ids, n=2, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    texts, usage = {}, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {i: c.text for i, c in enumerate(batched.choices)}
    assert usage.prompt_tokens == len(ids[0]) + len(ids[1]) == batched.usage.prompt_tokens


async def test_echo_prepends_the_prompt(sdk, tiny_server, tokenizer):
    plain = await sdk.completions.create(model=tiny_server.model, prompt=PROMPTS[0], **GREEDY)
    echoed = await sdk.completions.create(model=tiny_server.model, prompt=PROMPTS[0], echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text
    stream = await sdk.completions.create(model=tiny_server.model, prompt=PROMPTS[0], echo=True, stream=True, **GREEDY)
    assert await streamed_texts(stream) == {0: echoed.choices[0].text}
    ids = tokenizer(PROMPTS[1]).input_ids
    from_ids = await sdk.completions.create(model=tiny_server.model, prompt=ids, echo=True, **GREEDY)
    assert from_ids.choices[0].text.startswith(tokenizer.decode(ids))


async def test_echo_with_logprobs_is_refused(sdk, tiny_server):
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.completions.create(model=tiny_server.model, prompt="Hi", echo=True, logprobs=1, max_tokens=2)
    assert err.value.body["param"] == "echo"


async def test_more_than_eight_choices_and_many_stop_strings(sdk, tiny_server):
    answer = await sdk.completions.create(model=tiny_server.model, prompt="Hello", n=12, max_tokens=3, seed=1)
    assert [c.index for c in answer.choices] == list(range(12))
    greedy = await sdk.completions.create(model=tiny_server.model, prompt=PROMPTS[0], **GREEDY)
    text = greedy.choices[0].text
    stops = [f"never{i}" for i in range(15)] + [text[2:4]]
    stopped = await sdk.completions.create(model=tiny_server.model, prompt=PROMPTS[0], stop=stops, **GREEDY)
    assert stopped.choices[0].text == text[: text.index(text[2:4])]
    assert stopped.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- /tokenize, /detokenize


@pytest.mark.parametrize("add_special", [None, False, True])
async def test_tokenize_prompt_matches_the_tokenizer(http, tiny_server, tokenizer, add_special):
    prompt = "Hello world! café"
    body = {"model": tiny_server.model, "prompt": prompt}
    if add_special is not None:
        body["add_special_tokens"] = add_special
    result = (await http.post("/tokenize", json=body)).json()
    expected = tokenizer.encode(prompt, add_special_tokens=add_special is not False)
    context = (await http.get("/v1/models")).json()["data"][0]["max_model_len"]
    assert result == {"count": len(expected), "max_model_len": context, "tokens": expected, "token_strs": None}


async def test_tokenize_chat_matches_the_template(http, tiny_server, tokenizer):
    conversation = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello"}]
    for add_generation, continue_final in [(True, False), (False, False), (False, True)]:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation, continue_final_message=continue_final, tokenize=False
        )
        body = {"messages": conversation, "add_generation_prompt": add_generation,
                "continue_final_message": continue_final}
        result = (await http.post("/tokenize", json=body)).json()
        assert result["tokens"] == tokenizer.encode(text, add_special_tokens=False)


async def test_tokenize_chat_equals_what_generation_counts(sdk, http, tiny_server):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokens = (await http.post("/tokenize", json={"messages": messages})).json()
    reply = await sdk.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=1)
    assert tokens["count"] == reply.usage.prompt_tokens


async def test_token_strs_and_detokenize(http, tiny_server, tokenizer):
    prompt = "The quick brown fox"
    result = (await http.post("/tokenize", json={"prompt": prompt, "return_token_strs": True})).json()
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(result["tokens"])
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    response = await http.post("/detokenize", json={"model": tiny_server.model, "tokens": ids})
    assert response.json() == {"prompt": prompt}


BAD = [
    ("/v1/completions", {"prompt": ["a", 1]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": [[1], [10**6]]}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "word " * 400]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 20, "n": 4}, "prompt"),  # 80 choices > --max-queue 64
    ("/v1/completions", {"prompt": "a", "n": 129}, "n"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": 0}, "echo"),
    ("/tokenize", {}, "messages"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "continue_final_message": True},
     "continue_final_message"),
    ("/tokenize", {"prompt": "word " * 10_000}, "prompt"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
]


@pytest.mark.parametrize("path, fields, param", BAD)
async def test_bad_input_is_a_400_envelope_and_the_server_keeps_serving(http, tiny_server, path, fields, param):
    response = await http.post(path, json={"model": tiny_server.model, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    await assert_still_serving(http, tiny_server.model)


async def test_the_model_is_checked(http, tiny_server):
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        response = await http.post(path, json={"model": "gpt-4", **body})
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert json.loads((await http.post("/tokenize", json={"prompt": "a"})).text)["count"] > 0
