"""Penalties, logit_bias, min_tokens and structured output in the real decode loop (tiny model, both
runners), with FASB forced to backtrack: the per-sequence state must roll back with the tokens."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest

from server.config import Settings
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, ResponseFormat, SamplingParams, SteeringParams
from server.errors import InvalidRequestError
from tests.engine_helpers import collect
from tests.json_schemas import SCHEMAS
from tests.synthetic_artifact import write_synthetic_artifact

# Random probes score below 1, so threshold 1.0 fails every check: backtracks are certain.
FORCED = SteeringParams(mode="fasb", threshold=1.0, backtrack_tokens=3, max_backtracks=3)
# Schemas whose every answer is short, so a random model finishes them well within max_tokens.
BOUNDED = ["boolean", "enum", "const", "integer-range", "string-length", "pattern", "date"]


@pytest.fixture(scope="module")
def artifact_dir(tiny_model_dir, tmp_path_factory):
    from server.engine.loader import load_model

    model = load_model(str(tiny_model_dir)).model
    return write_synthetic_artifact(model, tmp_path_factory.mktemp("artifact"), heads=4, seed=1)


@pytest.fixture(params=["hf", "static"])
async def engine(request, tiny_model_dir, artifact_dir):
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact_dir)], max_batch_size=8,
                             runner=request.param, compile=False))
    await engine.start()
    yield engine
    await engine.stop()


def chat(engine, text):
    return engine.encode_chat([{"role": "user", "content": text}])


def _schema(name):
    return next((s for n, s, _ in SCHEMAS if n == name))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_json_schema_output_validates_under_forced_backtracks(engine, temperature):
    for i, name in enumerate(BOUNDED):
        fmt = ResponseFormat("json_schema", json.dumps(_schema(name)))
        replay = await collect(engine, chat(engine, f"Give JSON {i}"), FORCED, max_tokens=120,
                               temperature=temperature, seed=i, response_format=fmt)
        assert replay.finished.finish_reason == "stop", (name, replay.text)
        assert replay.backtracks, name  # the grammar state really was rolled back
        jsonschema.validate(json.loads(replay.text), _schema(name))


async def test_json_object_ends_at_the_closing_brace(engine):
    replay = await collect(engine, chat(engine, "JSON please"), FORCED, max_tokens=200, temperature=0.0,
                           response_format=ResponseFormat("json_object"),
                           logit_bias=tuple((t, -100.0) for t in engine._loaded.tokenizer.encode('"')))
    # With '"' banned no key can start: the only object the grammar still allows is {}.
    assert replay.text == "{}" and replay.finished.finish_reason == "stop"


async def test_logit_bias_bans_a_token_even_across_backtracks(engine):
    ids = chat(engine, "Hello")
    free = await collect(engine, ids, FORCED, max_tokens=24)
    banned = Counter(free.token_ids).most_common(1)[0][0]
    assert free.backtracks
    replay = await collect(engine, ids, FORCED, max_tokens=24, logit_bias=((banned, -100.0),))
    assert replay.backtracks and banned not in replay.token_ids


async def test_logit_bias_plus_100_forces_a_token(engine):
    replay = await collect(engine, chat(engine, "Hello"), max_tokens=6, logit_bias=((42, 100.0),))
    assert replay.token_ids == [42] * 6


async def test_frequency_penalty_reduces_repetition(engine):
    ids = chat(engine, "quick brown fox")
    plain = await collect(engine, ids, max_tokens=60, ignore_eos=True)
    penalised = await collect(engine, ids, max_tokens=60, ignore_eos=True, frequency_penalty=2.0)
    most = Counter(plain.token_ids).most_common(1)[0][1]
    assert most > 2  # greedy decoding of a random model repeats itself
    assert Counter(penalised.token_ids).most_common(1)[0][1] < most


async def test_presence_penalty_gives_more_distinct_tokens(engine):
    ids = chat(engine, "quick brown fox")
    plain = await collect(engine, ids, max_tokens=60, ignore_eos=True)
    penalised = await collect(engine, ids, max_tokens=60, ignore_eos=True, presence_penalty=2.0)
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


async def test_repetition_penalty_reduces_repetition(engine):
    ids = chat(engine, "quick brown fox")
    plain = await collect(engine, ids, max_tokens=60, ignore_eos=True)
    penalised = await collect(engine, ids, max_tokens=60, ignore_eos=True, repetition_penalty=1.8)
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


async def test_penalties_roll_back_with_backtracks(engine):
    """A backtracked answer with penalties equals a fresh decode of the kept prefix's continuation:
    checked through determinism: same request twice gives the same answer (counts rebuilt exactly)."""
    ids = chat(engine, "quick brown fox")
    a = await collect(engine, ids, FORCED, max_tokens=30, frequency_penalty=1.5, presence_penalty=0.5)
    b = await collect(engine, ids, FORCED, max_tokens=30, frequency_penalty=1.5, presence_penalty=0.5)
    assert a.backtracks and a.text == b.text


async def test_min_tokens_bans_eos(engine):
    eos = engine._loaded.tokenizer.eos_token_id
    ids = chat(engine, "Hello")
    replay = await collect(engine, ids, max_tokens=8, min_tokens=8, logit_bias=((eos, 100.0),))
    assert len(replay.token_ids) == 8 and replay.finished.finish_reason == "length"
    stopped = await collect(engine, ids, max_tokens=8, min_tokens=3, logit_bias=((eos, 100.0),))
    assert len(stopped.token_ids) == 3 and stopped.finished.finish_reason == "stop"


@pytest.mark.parametrize(
    "sampling,param",
    [
        (SamplingParams(max_tokens=4, logit_bias=((10**6, 1.0),)), "logit_bias"),
        (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        (SamplingParams(max_tokens=4, response_format=ResponseFormat("json_schema", '{"not": {}}')),
         "response_format.json_schema.schema"),
    ],
)
async def test_engine_refuses_what_it_cannot_honour(engine, sampling, param):
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(GenerationRequest("x", [5, 6], sampling))
    assert err.value.param == param
