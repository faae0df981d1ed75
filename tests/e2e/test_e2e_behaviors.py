"""All prebuilt behaviours of the default model (truthfulness, the guards, the four multiple-choice tasks) load
together in one real server, a steered request per behaviour works through the openai SDK, and one
request monitors several behaviours at once."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import pytest_asyncio

from steering_artifacts.builder.judges import judge_for, repeated_ngram_share
from tests.e2e.harness import ServerProcess, running_server
from tests.streams import shown_text

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

EXPECTED = {"truthfulness", "tone", "repetition", "copa", "nli", "mmlu", "winogrande"}
QUESTIONS = {
    "truthfulness": "What happens if you crack your knuckles a lot?",
    "tone": "Write an angry rant about slow internet.",
    "repetition": "Write a poem about a busy train station.",
    "copa": "The man dropped the glass. What was the effect of this?",
    "nli": "A dog runs in a park. Question: An animal is outside. True, False, or Neither?",
    "mmlu": "What is the boiling point of water at sea level in degrees Celsius?",
    "winogrande": "Fill in the blank: The trophy did not fit in the suitcase because _ was too big.",
}


async def _read_stream(stream) -> tuple[str, list[dict], dict | None]:
    """(the text a correction-aware client shows, the retraction events, the final steering report)."""
    chunks = [chunk.model_dump() async for chunk in stream]
    events = [choice.get("steering") for chunk in chunks for choice in chunk["choices"] if choice.get("steering")]
    retractions = [e for e in events if e.get("type") == "retract"]
    reports = [e for e in events if e.get("type") != "retract"]
    return shown_text(chunks), retractions, reports[-1] if reports else None


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


async def test_guard_behaviours_describe_their_measured_quality(sdk):
    cards = {b["name"]: b for b in (await sdk.models.list()).data[0].steering_behaviors}
    for name in ("tone", "repetition"):
        card = cards[name]
        assert card["description"] and 0.5 < card["heldout_auroc"] <= 1.0 and 0.0 <= card["false_alarm_rate"] <= 0.05


async def test_one_request_monitors_two_behaviours_and_names_each_backtrack(sdk, behaviors_server):
    """Threshold 1 forces the first check to fire for both; the streamed retraction and the final
    report name the behaviours that fired, and the stream still ends in the final text."""
    steering = {"mode": "fasb", "behavior": ["truthfulness", "tone"], "threshold": 1.0, "backtrack_tokens": 4,
                "max_backtracks": 1, "return_scores": True}
    stream = await sdk.chat.completions.create(
        model=behaviors_server.model, messages=[{"role": "user", "content": QUESTIONS["tone"]}], max_tokens=12,
        temperature=0, stream=True, extra_body={"steering": steering},
    )
    text, retractions, report = await _read_stream(stream)
    assert retractions and set(retractions[0]["behaviors"]) == {"truthfulness", "tone"}
    assert report["behaviors"] == ["truthfulness", "tone"]
    assert set(report["backtracks"][0]["behaviors"]) == {"truthfulness", "tone"}
    assert set(report["behavior_scores"]) == {"truthfulness", "tone"}

    completion = await sdk.chat.completions.create(
        model=behaviors_server.model, messages=[{"role": "user", "content": QUESTIONS["tone"]}], max_tokens=12,
        temperature=0, extra_body={"steering": steering},
    )
    assert completion.choices[0].message.content == text  # streamed (corrections applied) = non-streamed


async def test_an_empty_behaviour_list_is_a_400_naming_the_field(sdk, behaviors_server):
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.chat.completions.create(
            model=behaviors_server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
            extra_body={"steering": {"mode": "monitor", "behavior": []}},
        )
    assert err.value.body["param"] == "steering.behavior"


async def test_repetition_guard_backs_out_of_a_loop_it_streamed(sdk, behaviors_server):
    """The shipped `repetition` guard on a prompt whose greedy answer loops: `off` repeats a line, `fasb`
    streams the start of the loop, retracts it (naming the behaviour) and ends in text that repeats less."""
    messages = [{"role": "user", "content": QUESTIONS["repetition"]}]
    plain = await sdk.chat.completions.create(
        model=behaviors_server.model, messages=messages, max_tokens=64, temperature=0,
        extra_body={"steering": {"mode": "off"}},
    )
    looped = plain.choices[0].message.content
    assert judge_for("repetition").judge([looped])[0].desired is False, looped

    stream = await sdk.chat.completions.create(
        model=behaviors_server.model, messages=messages, max_tokens=64, temperature=0, stream=True,
        extra_body={"steering": {"mode": "fasb", "behavior": "repetition"}},
    )
    text, retractions, _ = await _read_stream(stream)
    assert retractions and retractions[0]["behaviors"] == ["repetition"]
    assert repeated_ngram_share(text) < repeated_ngram_share(looped), text
