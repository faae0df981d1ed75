"""Tool calling on /v1/chat/completions through the real server on the embedded SmolLM2 and the
official `openai` SDK: forced calls parse and validate (also when FASB backtracks inside them),
streamed tool_calls deltas accumulate to the non-streamed calls, and a real agent framework (the
OpenAI Agents SDK) runs a two-step tool loop against the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import agents
import jsonschema
import openai
import pytest
import pytest_asyncio

from tests.e2e.harness import ServerProcess, running_server

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

# Every check fails (threshold 1.0), so FASB takes tokens back inside the call (a call starts at
# the first token when it is forced).
FORCED = {"mode": "fasb", "threshold": 1.0, "backtrack_tokens": 3, "max_backtracks": 2, "stream_mode": "retract"}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0, "maximum": 100}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "What is 2 plus 3?", "Is it raining in Tokyo?", "Add 40 and 2."]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server-logs") / "default-tools.log"
    with running_server(["--model", "default", "--max-batch-size", "8"], log_path) as server:
        yield server


@pytest_asyncio.fixture
async def sdk(default_server):
    url = f"{default_server.base_url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        yield client


def ask(server: ServerProcess, question: str, **params) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": question}], "tools": TOOLS,
            "max_tokens": 100, **params}


async def streamed(sdk: openai.AsyncOpenAI, **params) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) from the deltas, accumulated as the SDK's users do."""
    content, calls, finish = "", {}, None
    async for chunk in await sdk.chat.completions.create(**params, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        steering = getattr(choice, "steering", None) or {}
        if steering.get("type") == "retract":
            assert content.endswith(steering["retract_text"])
            content = content[: len(content) - len(steering["retract_text"])]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or "" if delta.function else ""
            call["arguments"] += delta.function.arguments or "" if delta.function else ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def assert_valid_call(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
async def test_required_and_named_calls_parse_and_validate(sdk, default_server, stream):
    choices = ["required", {"type": "function", "function": {"name": "add"}}]
    cases = [(q, c, seed) for seed, q in enumerate(QUESTIONS) for c in choices]

    async def one(question, choice, seed):
        params = ask(default_server, question, tool_choice=choice, temperature=0.8, seed=seed)
        if stream:
            content, calls, finish = await streamed(sdk, **params)
        else:
            message = (completion := await sdk.chat.completions.create(**params)).choices[0].message
            finish = completion.choices[0].finish_reason
            content = message.content
            calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                     for c in message.tool_calls or ()]
        return choice, content, calls, finish

    results = await asyncio.gather(*(one(*case) for case in cases))
    for choice, content, calls, finish in results:
        assert finish == "tool_calls" and len(calls) == 1 and not content, (choice, content, calls)
        allowed = {"add"} if isinstance(choice, dict) else set(SCHEMAS)
        assert_valid_call(calls[0]["name"], calls[0]["arguments"], allowed)  # 100% of them
        assert calls[0]["id"].startswith("call_")


async def test_streamed_calls_accumulate_to_the_non_streamed_ones(sdk, default_server):
    for question in QUESTIONS[:2]:
        params = ask(default_server, question, tool_choice="required", temperature=0)
        whole = (await sdk.chat.completions.create(**params)).choices[0]
        content, calls, finish = await streamed(sdk, **params)
        assert finish == whole.finish_reason == "tool_calls"
        assert content == (whole.message.content or "")
        expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert [(c["name"], c["arguments"]) for c in calls] == expected
        # The SDK's own accumulation (its stream helper) gives the same calls.
        async with sdk.chat.completions.stream(**params) as stream:
            helped = (await stream.get_final_completion()).choices[0]
        assert [(c.function.name, c.function.arguments) for c in helped.message.tool_calls] == expected
        assert helped.finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
async def test_backtracks_inside_a_call_keep_its_arguments_valid(sdk, default_server, stream):
    async def one(seed, question):
        params = ask(default_server, question, tool_choice="required", temperature=0.8, seed=seed,
                     extra_body={"steering": FORCED})
        if stream:
            _, calls, finish = await streamed(sdk, **params)
            backtracks = None
        else:
            choice = (await sdk.chat.completions.create(**params)).choices[0]
            finish, backtracks = choice.finish_reason, choice.steering["backtracks"]
            calls = [{"name": c.function.name, "arguments": c.function.arguments}
                     for c in choice.message.tool_calls or ()]
        return calls, finish, backtracks

    results = await asyncio.gather(*(one(seed, q) for seed, q in enumerate(QUESTIONS)))
    for calls, finish, backtracks in results:
        assert finish == "tool_calls" and len(calls) == 1, calls
        assert_valid_call(calls[0]["name"], calls[0]["arguments"], set(SCHEMAS))
        assert backtracks is None or backtracks  # FASB really took tokens of the call back


@pytest.mark.parametrize("steering", [None, FORCED], ids=["plain", "backtracking"])
async def test_auto_answers_in_text_or_with_a_valid_call(sdk, default_server, steering):
    # With FASB backtracking: the auto grammar (text, or text then a call) rolls back too.
    async def one(seed, question):
        extra = {"extra_body": {"steering": steering}} if steering else {}
        return (await sdk.chat.completions.create(**ask(default_server, question, tool_choice="auto",
                                                          temperature=0.8, seed=seed, **extra))).choices[0]

    for choice in await asyncio.gather(*(one(seed, q) for seed, q in enumerate(QUESTIONS))):
        if choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls:
                assert_valid_call(call.function.name, call.function.arguments, set(SCHEMAS))
        elif choice.message.tool_calls:  # text, then a call that max_tokens cut short
            assert choice.finish_reason == "length"
        else:  # text alone, and none of the call's markup
            assert choice.message.content and "<tool_call>" not in choice.message.content


async def test_tool_results_in_the_history_reach_the_answer(sdk, default_server):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees"},
    ]
    completion = await sdk.chat.completions.create(
        model=default_server.model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=40, temperature=0
    )
    message = completion.choices[0].message
    assert not message.tool_calls and completion.choices[0].finish_reason in ("stop", "length")
    assert "24" in message.content


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_openai_agents_sdk_runs_a_two_step_tool_loop(sdk, default_server, api):
    agents.set_tracing_disabled(True)  # the SDK would otherwise send traces to OpenAI
    asked = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        asked.append(city)
        return f"It is sunny and 24 degrees in {city}."

    if api == "chat":
        model = agents.OpenAIChatCompletionsModel(default_server.model, sdk)
    else:
        model = agents.OpenAIResponsesModel(default_server.model, sdk)
    # tool_choice "required" for the first step; the SDK resets it after a call, so the second
    # step may answer in text with the tool's result.
    settings = agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60)
    agent = agents.Agent(name="weather", instructions="Answer questions about the weather with the tool.",
                         tools=[get_weather], model=model, model_settings=settings)
    result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    assert len(asked) == 1 and asked[0]  # one well-formed call, run by the framework
    assert "24 degrees" in result.final_output  # the tool's result came back into the answer
