"""The real embedded model (SmolLM2-135M-Instruct) behind the real server: a sensible answer.

Slow: the first run converts the GGUF weights (~25 s); later starts load the cached copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import pytest_asyncio

from tests.e2e.harness import ServerProcess, running_server

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> Iterator[ServerProcess]:
    # With the prebuilt artifacts for this model, as `fasb-server` serves it out of the box.
    log_path = tmp_path_factory.mktemp("server-logs") / "default.log"
    with running_server(["--model", "default"], log_path) as server:
        yield server


@pytest_asyncio.fixture
async def sdk(default_server):
    base_url = f"{default_server.base_url}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


async def test_answers_the_capital_of_france(sdk, default_server):
    params = {"model": default_server.model, "messages": QUESTION, "max_tokens": 40, "temperature": 0}
    whole = await sdk.chat.completions.create(**params)
    answer = whole.choices[0].message.content
    assert "Paris" in answer, answer

    stream = await sdk.chat.completions.create(**params, stream=True)
    streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert streamed == answer


async def test_steered_request_reports_what_steering_did(sdk, default_server):
    behaviors = (await sdk.models.list()).data[0].steering_behaviors
    if not behaviors:
        pytest.skip("no prebuilt steering artifact for the default model")
    steering = {"mode": "fasb", "return_scores": True}
    completion = await sdk.chat.completions.create(
        model=default_server.model, messages=QUESTION, max_tokens=40, temperature=0, extra_body={"steering": steering}
    )
    report = completion.choices[0].steering
    assert report["mode"] == "fasb" and report["behavior"] == behaviors[0]["name"]
    # one score per answer token; usage also counts the end-of-sequence token when the answer ends with it
    # (no stop strings here, so finish_reason "stop" means EOS)
    eos = completion.choices[0].finish_reason == "stop"
    assert len(report["scores"]) == completion.usage.completion_tokens - eos
    assert completion.choices[0].message.content.strip()
