"""POST /v1/responses through the real server on the embedded SmolLM2 and the official `openai`
SDK: text and function-call outputs, streamed (the Responses event sequence) and not, text.format
through the grammar engine also when FASB backtracks, and tool results given back as input items.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
import pytest_asyncio

from tests.e2e.harness import ServerProcess, running_server

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

FORCED = {"mode": "fasb", "threshold": 1.0, "backtrack_tokens": 3, "max_backtracks": 2, "stream_mode": "retract"}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
TEXT_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    "response.output_text.delta", "response.output_text.done", "response.content_part.done",
    "response.output_item.done", "response.completed",
]
CALL_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server-logs") / "default-responses.log"
    with running_server(["--model", "default", "--max-batch-size", "8"], log_path) as server:
        yield server


@pytest_asyncio.fixture
async def sdk(default_server):
    url = f"{default_server.base_url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        yield client


async def events_of(sdk: openai.AsyncOpenAI, **params) -> list:
    return [event async for event in await sdk.responses.create(**params, stream=True)]


def distinct(types: list[str]) -> list[str]:
    """The event types in order, runs of one type (deltas) counted once."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def applied_text(events: list) -> str:
    """The output text a client shows: deltas appended, our retraction events applied."""
    text = ""
    for event in events:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.steering.retract":
            retract = event.model_extra["retract_text"] if event.model_extra else event.retract_text
            assert text.endswith(retract)
            text = text[: len(text) - len(retract)]
    return text


async def test_text_answer_streamed_and_not(sdk, default_server):
    params = {"model": default_server.model, "input": "Say hello.", "instructions": "Be brief.",
              "max_output_tokens": 30, "temperature": 0}
    whole = await sdk.responses.create(**params)
    assert whole.object == "response" and whole.output[0].type == "message" and whole.output_text
    assert whole.usage.output_tokens > 0 and whole.usage.input_tokens > 0
    events = await events_of(sdk, **params)
    assert distinct([e.type for e in events]) == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert applied_text(events) == done.text == final.output_text == whole.output_text
    assert final.status == whole.status and final.usage.output_tokens == whole.usage.output_tokens


async def test_the_sdk_stream_helper_gets_the_final_response(sdk, default_server):
    # Greedy and a long-answer prompt, so the 8-token cap (not an early end of text) always ends it.
    async with sdk.responses.stream(model=default_server.model, input="Write a long story about a dragon.",
                                    max_output_tokens=8, temperature=0) as stream:
        final = await stream.get_final_response()
    assert final.output_text and final.status == "incomplete"  # 8 tokens: cut short, and says so
    assert final.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
async def test_function_calls_streamed_and_not(sdk, default_server, choice):
    params = {"model": default_server.model, "input": "What is the weather in Paris?", "tools": [WEATHER],
              "tool_choice": choice, "max_output_tokens": 60, "temperature": 0}
    whole = await sdk.responses.create(**params)
    (call,) = whole.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    events = await events_of(sdk, **params)
    assert distinct([e.type for e in events]) == CALL_EVENTS
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    (streamed_call,) = events[-1].response.output
    assert deltas == done.arguments == streamed_call.arguments == call.arguments
    assert streamed_call.call_id.startswith("call_") and streamed_call.name == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
async def test_text_format_validates_under_forced_backtracks(sdk, default_server, stream):
    async def one(seed: int):
        params = {"model": default_server.model, "input": f"Describe person number {seed} as JSON.",
                  "text": PERSON_FORMAT, "max_output_tokens": 80, "temperature": 0.8,
                  "extra_body": {"steering": FORCED}}
        if not stream:
            response = await sdk.responses.create(**params)
            return response.output_text, response.steering["backtracks"], response.status
        events = await events_of(sdk, **params)
        final = events[-1].response
        assert applied_text(events) == final.output_text  # retractions applied give the final text
        retracts = [e for e in events if e.type == "response.steering.retract"]
        return final.output_text, retracts, final.status

    for text, backtracks, status in await asyncio.gather(*(one(seed) for seed in range(4))):
        assert status == "completed" and backtracks, text
        jsonschema.validate(json.loads(text), PERSON)


async def test_function_call_output_items_reach_the_answer(sdk, default_server):
    items = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 24 degrees"},
    ]
    response = await sdk.responses.create(
        model=default_server.model, input=items, tools=[WEATHER], tool_choice="none", max_output_tokens=40,
        temperature=0,
    )
    assert [item.type for item in response.output] == ["message"] and "24" in response.output_text
