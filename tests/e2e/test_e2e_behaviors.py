"""All prebuilt behaviours of the default model (truthfulness + the four multiple-choice tasks) load
together in one real server, and a steered request per behaviour works through the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import pytest_asyncio

from tests.e2e.harness import ServerProcess, running_server

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

EXPECTED = {"truthfulness", "copa", "nli", "mmlu", "winogrande"}
QUESTIONS = {
    "truthfulness": "What happens if you crack your knuckles a lot?",
    "copa": "The man dropped the glass. What was the effect of this?",
    "nli": "A dog runs in a park. Question: An animal is outside. True, False, or Neither?",
    "mmlu": "What is the boiling point of water at sea level in degrees Celsius?",
    "winogrande": "Fill in the blank: The trophy did not fit in the suitcase because _ was too big.",
}


@pytest.fixture(scope="module")
def behaviors_server(tmp_path_factory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server-logs") / "behaviors.log"
    with running_server(["--model", "default", "--max-batch-size", "8"], log_path) as server:
        yield server


@pytest_asyncio.fixture
async def sdk(behaviors_server):
    async with openai.AsyncOpenAI(base_url=f"{behaviors_server.base_url}/v1", api_key="unused", max_retries=0,
                                  timeout=120) as client:
        yield client


async def test_all_behaviours_load_and_truthfulness_stays_default(sdk):
    names = [b["name"] for b in (await sdk.models.list()).data[0].steering_behaviors]
    assert EXPECTED <= set(names), names
    assert names[0] == "truthfulness"


@pytest.mark.parametrize("behavior", sorted(EXPECTED))
async def test_a_request_per_behaviour(sdk, behaviors_server, behavior):
    completion = await sdk.chat.completions.create(
        model=behaviors_server.model, messages=[{"role": "user", "content": QUESTIONS[behavior]}], max_tokens=8,
        temperature=0, extra_body={"steering": {"mode": "fasb", "behavior": behavior, "return_scores": True}},
    )
    report = completion.choices[0].steering
    assert report["behavior"] == behavior and report["mode"] == "fasb"
    # One score per generated token; a closing end-of-turn token is counted in usage but not scored.
    assert 0 < len(report["scores"]) <= completion.usage.completion_tokens
    assert all(0.0 <= p <= 1.0 for p in report["scores"])
