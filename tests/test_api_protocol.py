"""Unit tests of the HTTP layer's pure parts: schemas, error mapping, chunk builders, event folding."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from server.api.errors import INTERNAL_ERROR_MESSAGE, InvalidAPIKeyError, error_response, validation_error
from server.api.protocol import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, TokenizeRequest, Usage
from server.api.serving import (
    INLINE_ENCODE_BYTES,
    ChoiceResult,
    EngineBugError,
    encode_off_loop_if_long,
    submit_choices,
    submit_prompts,
    usage_of,
)
from server.api.sse import ChatChunks, ChoiceStreamState, CompletionChunks, next_chunk
from server.engine.types import Finished, Retraction, SteeringParams, TextDelta, TokenLogprob
from server.errors import EngineNotReadyError, ModelNotFoundError, QueueFullError
from tests.fake_engine import FakeEngine, backtracking_script

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def rejected_param(model: type, body: dict) -> str | None:
    """The `param` a 400 would name for `body`, exactly as the app's handler computes it."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**error, "loc": ("body", *error["loc"])} for error in info.value.errors()]
    return validation_error(RequestValidationError(errors)).param


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stop": ["x" * 257]}, "stop.0"),
        ({"stop": [""]}, "stop.0"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
        ({"logit_bias": {"a": 5}}, "logit_bias"),
        ({"logit_bias": {"-1": 5}}, "logit_bias"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
         "response_format.json_schema.name"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content.0.type"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
        ({"steering": {"foo": 1}}, "steering.foo"),
        ({"steering": {"alpha": -1}}, "steering.alpha"),
        ({"steering": {"threshold": 1.5}}, "steering.threshold"),
        ({"steering": {"backtrack_tokens": 0}}, "steering.backtrack_tokens"),
        ({"steering": {"num_heads": 0}}, "steering.num_heads"),
        ({"steering": {"max_backtracks": -1}}, "steering.max_backtracks"),
        ({"steering": {"mode": "sometimes"}}, "steering.mode"),
        ({"steering": {"stream_mode": "later"}}, "steering.stream_mode"),
        ({"steering": "fasb"}, "steering"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"messages": [{"role": "user", "content": "a \ud800 b"}]}, "messages.0.content.0.text"),
        ({"stop": ["\udc00"]}, "stop.0"),
    ],
)
def test_chat_request_rejects_with_the_field_path(fields, param):
    assert rejected_param(ChatCompletionRequest, {"model": "m", "messages": USER, **fields}) == param


def test_missing_model_is_named():
    assert rejected_param(ChatCompletionRequest, {"messages": USER}) == "model"


def test_text_parts_are_joined_and_developer_is_system():
    request = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert request.engine_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
    ]


def test_null_means_the_default():
    request = chat(n=None, stream=None, logprobs=None, presence_penalty=None, steering={"return_scores": None})
    assert (request.n, request.stream, request.logprobs, request.steering.return_scores) == (1, False, False, False)
    assert rejected_param(ChatCompletionRequest, {"model": None, "messages": USER}) == "model"


def test_unknown_top_level_fields_are_ignored():
    assert chat(metadata={"x": 1}, store=False).model == "m"


def test_stop_accepts_a_string_or_a_list():
    assert chat(stop="END").to_sampling_params(10).stop == ("END",)
    assert chat(stop=["a", "b"]).to_sampling_params(10).stop == ("a", "b")
    assert chat(stop=None).to_sampling_params(10).stop == ()


def test_max_completion_tokens_wins_over_max_tokens_and_default_applies():
    assert chat(max_tokens=5, max_completion_tokens=7).to_sampling_params(100).max_tokens == 7
    assert chat(max_tokens=5).to_sampling_params(100).max_tokens == 5
    assert chat().to_sampling_params(100).max_tokens == 100


def test_sampling_defaults_and_values():
    assert chat().to_sampling_params(1) == chat(temperature=None, top_p=None).to_sampling_params(1)
    params = chat(temperature=0, top_p=0.5, top_k=3, seed=9, logprobs=True, top_logprobs=2).to_sampling_params(1)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0, 0.5, 3, 9)
    assert (params.logprobs, params.top_logprobs) == (True, 2)
    assert chat().to_sampling_params(1).temperature == 1.0


def test_steering_params_only_when_the_request_has_a_steering_object():
    assert chat().to_steering_params() is None
    assert chat(steering={}).to_steering_params() == SteeringParams()
    steering = {"mode": "fasb", "alpha": 4, "stream_mode": "hold", "return_scores": True}
    params = chat(steering=steering).to_steering_params()
    assert (params.mode, params.alpha, params.stream_mode, params.return_scores) == ("fasb", 4, "hold", True)


def test_include_usage_only_when_streaming():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage  # stream_options without stream is a 400 (see above)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hi", ["hi"]),
        (["hi"], ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        (["x"] * MAX_PROMPTS, ["x"] * MAX_PROMPTS),
    ],
)
def test_completion_prompt_forms_become_a_list_of_prompts(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompt == expected


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [[1], "a"]}, "prompt"),
        ({"prompt": [[1, True]]}, "prompt"),
        ({"prompt": [[[1]]]}, "prompt"),
        ({"prompt": ["a"] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": ["ok", "\ud800"]}, "prompt"),
        ({"echo": True, "logprobs": 0}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": ["\udfff"]}, "prompt"),
    ],
)
def test_completion_request_rejects(fields, param):
    assert rejected_param(CompletionRequest, {"model": "m", "prompt": "p", **fields}) == param


@pytest.mark.parametrize(
    "fields, param",
    [
        ({}, "messages"),  # neither prompt nor messages
        ({"prompt": "a", "messages": USER}, "messages"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": USER, "continue_final_message": True}, "continue_final_message"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
        ({"prompt": "a", "return_token_strs": "maybe"}, "return_token_strs"),
    ],
)
def test_tokenize_request_rejects(fields, param):
    assert rejected_param(TokenizeRequest, fields) == param


def test_tokenize_request_forms():
    assert TokenizeRequest(prompt="hi").messages is None
    chat_form = TokenizeRequest(messages=USER, add_generation_prompt=False, continue_final_message=True)
    assert chat_form.engine_messages() == [{"role": "user", "content": "hi"}]


def test_completion_logprobs_are_legacy_top_k():
    assert CompletionRequest(model="m", prompt="p", logprobs=0).to_sampling_params(1).logprobs
    params = CompletionRequest(model="m", prompt="p", logprobs=3).to_sampling_params(1)
    assert (params.logprobs, params.top_logprobs) == (True, 3)
    assert not CompletionRequest(model="m", prompt="p").to_sampling_params(1).logprobs


# --------------------------------------------------------------------------- error envelope


@pytest.mark.parametrize(
    "exc, status, type_, code",
    [
        (ModelNotFoundError("x"), 404, "invalid_request_error", "model_not_found"),
        (QueueFullError(), 429, "rate_limit_error", "queue_full"),
        (EngineNotReadyError(), 503, "service_unavailable", "model_loading"),
        (InvalidAPIKeyError(), 401, "invalid_request_error", "invalid_api_key"),
        (HTTPException(404, "Not Found"), 404, "invalid_request_error", "not_found"),
        (HTTPException(405, "Method Not Allowed"), 405, "invalid_request_error", "method_not_allowed"),
    ],
)
def test_error_response_maps_status_type_and_code(exc, status, type_, code):
    got_status, body = error_response(exc)
    assert (got_status, body.error.type, body.error.code) == (status, type_, code)


def test_unexpected_exceptions_become_a_generic_500():
    status, body = error_response(KeyError("secret internals"))
    assert status == 500
    assert body.error.type == "internal_error"
    assert body.error.message == INTERNAL_ERROR_MESSAGE
    assert "secret" not in body.model_dump_json()


def test_malformed_json_has_no_param():
    error = validation_error(
        RequestValidationError([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error", "ctx": {}}])
    )
    assert error.status == 400 and error.param is None and "JSON" in error.message


# --------------------------------------------------------------------------- chunks


def test_chat_chunk_shapes():
    chunks = ChatChunks(id="chatcmpl-1", model="m")
    role = json.loads(chunks.role(0).model_dump_json())
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["choices"][0]["finish_reason"] is None
    assert "steering" not in role["choices"][0] and "usage" not in role

    retract = Retraction(" x", tokens=3, sent_tokens=1, token_index=5, probe_score=0.2, strength=1.5)
    choice = json.loads(chunks.retract(0, retract).model_dump_json())["choices"][0]
    assert choice["delta"] == {} and choice["finish_reason"] is None
    assert choice["steering"] == {
        "type": "retract", "retract_tokens": 3, "retract_text": " x", "probe_score": 0.2, "strength": 1.5,
        "behavior": None, "behaviors": [],
    }

    finish = json.loads(chunks.finish(0, Finished("length", 3, 2, 0, None)).model_dump_json())["choices"][0]
    assert finish["finish_reason"] == "length" and finish["delta"] == {} and "steering" not in finish

    usage = json.loads(chunks.usage(Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)).model_dump_json())
    assert usage["choices"] == [] and usage["usage"]["discarded_tokens"] == 0


def test_completion_chunks_track_text_offsets_across_retractions():
    chunks = CompletionChunks(id="cmpl-1", model="m", with_logprobs=True)
    choice = ChoiceStreamState(0)
    lp = [TokenLogprob("ab", -1.0, None), TokenLogprob("c", -2.0, None)]
    first = next_chunk(chunks, choice, TextDelta("abc", [1, 2], lp))
    assert first.choices[0].logprobs.text_offset == [0, 2]
    next_chunk(chunks, choice, Retraction("c", 1, 1, 2, 0.1, 1.0))
    second = next_chunk(chunks, choice, TextDelta("d", [3], [TokenLogprob("d", -1.0, None)]))
    assert second.choices[0].logprobs.text_offset == [2]
    assert chunks.role(0) is None


def test_a_choice_cannot_finish_twice():
    chunks, choice = ChatChunks(id="c", model="m"), ChoiceStreamState(0)
    next_chunk(chunks, choice, Finished("stop", 1, 1, 0, None))
    with pytest.raises(EngineBugError):
        next_chunk(chunks, choice, Finished("stop", 1, 1, 0, None))


# --------------------------------------------------------------------------- folding events


def test_choice_result_applies_retractions_exactly():
    result = ChoiceResult(0)
    for event in backtracking_script(None):
        result.apply(event)
    assert result.text == "Paris is the capital."
    assert [entry.token for entry in result.logprobs] == ["Paris", " is", " the", " capital."]


def test_retraction_of_unsent_tokens_keeps_logprobs():
    result = ChoiceResult(0, text="ab", logprobs=[TokenLogprob("ab", -1.0, None)])
    result.apply(Retraction("", tokens=2, sent_tokens=0, token_index=3, probe_score=0.1, strength=1.0))
    assert result.text == "ab" and len(result.logprobs) == 1


def test_retraction_that_is_not_a_suffix_is_an_engine_bug():
    result = ChoiceResult(0, text="hello")
    with pytest.raises(EngineBugError):
        result.apply(Retraction("xyz", 1, 1, 1, 0.1, 1.0))


def test_usage_counts_the_prompt_once():
    usage = usage_of([Finished("stop", 5, 3, 1, None, cached_tokens=4),
                      Finished("length", 5, 4, 2, None, cached_tokens=4)])
    assert usage.model_dump() == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12, "discarded_tokens": 3,
                                  "prompt_tokens_details": {"cached_tokens": 4}}


def test_usage_counts_each_prompt_once():
    # two prompts (5 and 9 tokens) x n=2, in choice order
    finished = [Finished("stop", 5, 1, 0, None), Finished("stop", 5, 2, 0, None),
                Finished("stop", 9, 3, 1, None, cached_tokens=8), Finished("stop", 9, 4, 0, None, cached_tokens=8)]
    usage = usage_of(finished, prompts=2).model_dump()
    assert usage == {"prompt_tokens": 14, "completion_tokens": 10, "total_tokens": 24, "discarded_tokens": 1,
                     "prompt_tokens_details": {"cached_tokens": 8}}


# --------------------------------------------------------------------------- submitting choices


@pytest.mark.asyncio
async def test_prompts_are_submitted_prompt_major_with_the_seeds_of_a_single_request():
    engine = FakeEngine(ready=True)
    submit_prompts(engine, "r", [[1], [2, 3]], chat(seed=10).to_sampling_params(5), None, 2)
    assert [(r.prompt_token_ids, r.sampling.seed) for r in engine.submitted] == [
        ([1], 10), ([1], 11), ([2, 3], 10), ([2, 3], 11)
    ]
    assert len({r.request_id for r in engine.submitted}) == 4


@pytest.mark.asyncio
async def test_a_failed_submit_of_a_later_prompt_cancels_the_earlier_prompts_choices():
    class FullAfterTwo(FakeEngine):
        def submit(self, request):
            if len(self.submitted) == 2:
                raise QueueFullError()
            return super().submit(request)

    engine = FullAfterTwo(ready=True)
    with pytest.raises(QueueFullError):
        submit_prompts(engine, "r", [[1], [2]], chat().to_sampling_params(5), None, 2)
    assert [s.cancelled for s in engine.streams] == [True, True]


@pytest.mark.asyncio
async def test_each_choice_gets_seed_plus_index():
    engine = FakeEngine(ready=True)
    submit_choices(engine, "r", [1], chat(seed=10).to_sampling_params(5), None, 3)
    assert [r.sampling.seed for r in engine.submitted] == [10, 11, 12]
    assert [r.request_id for r in engine.submitted] == ["r-0", "r-1", "r-2"]


@pytest.mark.asyncio
async def test_a_failed_submit_cancels_the_choices_already_submitted():
    class FullAfterOne(FakeEngine):
        def submit(self, request):
            if self.submitted:
                raise QueueFullError()
            return super().submit(request)

    engine = FullAfterOne(ready=True)
    with pytest.raises(QueueFullError):
        submit_choices(engine, "r", [1], chat().to_sampling_params(5), None, 2)
    assert [s.cancelled for s in engine.streams] == [True]



@pytest.mark.parametrize(
    ("content_length", "on_loop"), [("180", True), (str(INLINE_ENCODE_BYTES), True), ("4096", False), (None, False)]
)
async def test_short_bodies_are_encoded_on_the_loop_and_long_or_unsized_ones_off_it(content_length, on_loop):
    headers = [] if content_length is None else [(b"content-length", content_length.encode())]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": headers})
    loop_thread = threading.get_ident()
    ran_on = await encode_off_loop_if_long(request, lambda a, b: (threading.get_ident(), a + b), 2, 3)
    assert ran_on[1] == 5
    assert (ran_on[0] == loop_thread) is on_loop
