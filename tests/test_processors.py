"""Per-sequence decoding state (server/engine/processors.py) and its batched logits (logits.py).

The rollback property for every processor: apply k tokens then roll back j == apply k - j.
"""

from __future__ import annotations

import json

import pytest
import torch

from server.engine.grammar import GrammarCompiler, unpack_bitmask
from server.engine.logits import LogitsProcessors
from server.engine.processors import DecodingState, MinTokens, TokenCounts
from server.engine.types import ResponseFormat, SamplingParams
from server.errors import InvalidRequestError
from tests.json_schemas import SCHEMAS
from tests.tiny_model import build_tokenizer

TOKENS = [5, 7, 5, 9, 5, 7, 11, 3]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), tokenizer.eos_token_id)


def _schema_path(tokenizer, name: str) -> tuple[ResponseFormat, list[int]]:
    schema, instance = next((s, i) for n, s, i in SCHEMAS if n == name)
    return ResponseFormat("json_schema", json.dumps(schema)), tokenizer.encode(json.dumps(instance))


def _mask(matcher, vocab: int) -> torch.Tensor:
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    return unpack_bitmask(bitmask, vocab)[0]


@pytest.mark.parametrize("k,j", [(8, 0), (8, 3), (8, 8), (5, 2), (1, 1)])
def test_token_counts_rollback_equals_fewer_tokens(k, j):
    rolled, fresh = TokenCounts(), TokenCounts()
    for t in TOKENS[:k]:
        rolled.accept(t)
    rolled.rollback(j)
    for t in TOKENS[: k - j]:
        fresh.accept(t)
    assert rolled.tokens == fresh.tokens and rolled.counts == fresh.counts


@pytest.mark.parametrize("k,j", [(6, 0), (6, 4), (3, 3)])
def test_min_tokens_rollback_equals_fewer_tokens(k, j):
    rolled = MinTokens(4)
    for t in TOKENS[:k]:
        rolled.accept(t)
    rolled.rollback(j)
    assert rolled.generated == k - j and rolled.suppress_eos == (k - j < 4)


@pytest.mark.parametrize("name", ["flat", "nested", "array-of-objects", "recursive", "all-types"])
@pytest.mark.parametrize("j", [0, 1, 3, 6])
def test_grammar_rollback_equals_fewer_tokens(tokenizer, compiler, name, j):
    fmt, path = _schema_path(tokenizer, name)
    rolled, fresh = compiler.matcher(fmt), compiler.matcher(fmt)
    for t in path:
        rolled.accept(t)
    assert rolled.complete
    rolled.rollback(j)
    for t in path[: len(path) - j]:
        fresh.accept(t)
    assert rolled.complete == fresh.complete == (j == 0)
    assert torch.equal(_mask(rolled, len(tokenizer)), _mask(fresh, len(tokenizer)))
    for t in path[len(path) - j :]:  # and it goes on exactly as before the rollback
        rolled.accept(t)
    assert rolled.complete


@pytest.mark.parametrize("choice", ["auto", "required"])
@pytest.mark.parametrize("j", [1, 2, 5])
def test_tool_call_grammars_roll_back_like_fewer_tokens(tokenizer, compiler, choice, j):
    # FASB backtracks inside tool-calling answers too: text before a call (auto), and the call.
    from server.api.protocol import ChatTool
    from server.api.tools import CALL_CLOSE, CALL_OPEN, tool_call_format

    tool = ChatTool.model_validate({"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    fmt = tool_call_format([tool], choice, parallel=False)
    call = CALL_OPEN + json.dumps({"name": "add", "arguments": {"a": 2}}) + CALL_CLOSE
    path = tokenizer.encode(("Let me add. " if choice == "auto" else "") + call)
    rolled, fresh = compiler.matcher(fmt), compiler.matcher(fmt)
    for t in path:
        rolled.accept(t)
    rolled.rollback(j)
    for t in path[: len(path) - j]:
        fresh.accept(t)
    assert torch.equal(_mask(rolled, len(tokenizer)), _mask(fresh, len(tokenizer)))
    for t in path[len(path) - j :]:
        rolled.accept(t)
    assert rolled.complete


def test_decoding_state_rolls_back_every_processor(tokenizer, compiler):
    fmt, path = _schema_path(tokenizer, "flat")
    params = SamplingParams(frequency_penalty=1.0, min_tokens=3, response_format=fmt)
    state = DecodingState(params, compiler.matcher(fmt))
    for t in path:
        state.accept(t)
    assert state.grammar_complete and not state.suppress_eos
    state.rollback(len(path) - 2)
    assert state.counts.tokens == path[:2] and state.suppress_eos and not state.grammar_complete


@pytest.mark.parametrize(
    "schema,keyword",
    [({"not": {"type": "string"}}, "not"), ({"type": "array", "uniqueItems": True}, "uniqueItems")],
)
def test_unsupported_schema_keywords_are_named(compiler, schema, keyword):
    with pytest.raises(InvalidRequestError, match=keyword) as err:
        compiler.matcher(ResponseFormat("json_schema", json.dumps(schema)))
    assert err.value.param == "response_format.json_schema.schema"


def test_json_object_allows_only_an_object_start(tokenizer, compiler):
    allowed = _mask(compiler.matcher(ResponseFormat("json_object")), len(tokenizer))
    texts = {tokenizer.decode([i]) for i in allowed.nonzero().flatten().tolist()}
    assert texts and all(t.startswith("{") for t in texts)


# ---------------------------------------------------------------- batched logits

V = 16
EOS = 15


def _pipeline(params: list[SamplingParams], prompts=None, answers=None, matchers=None):
    states = [DecodingState(p, (matchers or {}).get(b)) for b, p in enumerate(params)]
    for state, answer in zip(states, answers or [[]] * len(states)):
        for t in answer:
            state.accept(t)
    pipe = LogitsProcessors(V, frozenset({EOS}), torch.device("cpu"))
    pipe.rebuild(states, prompts or [[1]] * len(states))
    return pipe, states


def test_nothing_requested_leaves_the_logits_untouched():
    pipe, _ = _pipeline([SamplingParams(), SamplingParams()])
    logits = torch.randn(2, V)
    assert pipe.apply(logits) is logits


def test_frequency_and_presence_penalties_follow_openai():
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()]
    pipe, _ = _pipeline(params, answers=[[3, 3, 4], [3]])
    logits = torch.zeros(2, V)
    out = pipe.apply(logits)
    assert out[0, 3] == pytest.approx(-(2 * 0.5 + 0.25)) and out[0, 4] == pytest.approx(-0.75)
    assert out[0, 5] == 0 and torch.equal(out[1], logits[1])  # the unpenalised row is untouched


def test_repetition_penalty_counts_prompt_and_answer():
    pipe, _ = _pipeline([SamplingParams(repetition_penalty=2.0)], prompts=[[6]], answers=[[7]])
    logits = torch.zeros(1, V)
    logits[0, 6], logits[0, 7], logits[0, 8] = 4.0, -4.0, 4.0
    out = pipe.apply(logits)
    assert (out[0, 6], out[0, 7], out[0, 8]) == (2.0, -8.0, 4.0)


def test_incremental_counts_equal_a_rebuild():
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(presence_penalty=1.0)]
    pipe, states = _pipeline(params, answers=[[1], [2]])
    for b, t in [(0, 3), (1, 3)]:
        states[b].accept(t)
    pipe.accepted([0, 1], [3, 3])
    incremental = pipe.apply(torch.zeros(2, V))
    pipe.rebuild(states, [[1], [1]])
    assert torch.equal(incremental, pipe.apply(torch.zeros(2, V)))


def test_logit_bias_and_min_tokens():
    params = [SamplingParams(logit_bias=((2, -100.0), (3, 5.0)), min_tokens=2), SamplingParams(min_tokens=1)]
    pipe, states = _pipeline(params, answers=[[4], [4]])
    out = pipe.apply(torch.zeros(2, V))
    assert out[0, 2] == -100 and out[0, 3] == 5 and out[0, EOS] == float("-inf")
    assert out[1, EOS] == 0  # row 1 already has its one token


def test_grammar_bitmask_masks_only_grammar_rows(tokenizer, compiler):
    fmt, path = _schema_path(tokenizer, "enum")
    pipe = LogitsProcessors(len(tokenizer), frozenset({tokenizer.eos_token_id}), torch.device("cpu"))
    constrained = DecodingState(SamplingParams(response_format=fmt), compiler.matcher(fmt))
    states = [constrained, DecodingState(SamplingParams())]
    pipe.rebuild(states, [[1], [1]])
    out = pipe.apply(torch.zeros(2, len(tokenizer)))
    assert torch.equal(torch.isfinite(out[0]), _mask(states[0].grammar.matcher, len(tokenizer)))
    assert torch.isfinite(out[1]).all()
