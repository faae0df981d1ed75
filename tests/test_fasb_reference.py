"""The fast FASB decoder against the slow reference (tests/fasb_reference.py): same greedy tokens,
same backtrack decisions, across thresholds that fire early, late, at EOS and at max_tokens."""

import pytest

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.types import SteeringParams
from server.steering.artifact import load_artifact
from tests.engine_helpers import collect
from tests.fasb_reference import reference_fasb
from tests.synthetic_artifact import write_synthetic_artifact

PROMPTS = ["Hello", "What is the capital", "Is the earth flat?", "café 日本語", "quick brown fox", "Numbers 0 1 2"]
CASES = [(prompt, threshold, max_tokens)
         for threshold in (0.3, 0.5, 0.7, 0.95)
         for prompt, max_tokens in zip(PROMPTS, (3, 12, 20, 3, 12, 20))]


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, tmp_path_factory):
    loaded = load_model(str(tiny_model_dir))
    folder = write_synthetic_artifact(loaded.model, tmp_path_factory.mktemp("artifact"), heads=4, seed=1)
    return loaded, load_artifact(folder), folder


@pytest.fixture
async def tiny_engine(tiny_setup, tiny_model_dir):
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(tiny_setup[2])]))
    await engine.start()
    yield engine
    await engine.stop()


async def test_fast_decoder_matches_reference(tiny_engine, tiny_setup):
    loaded, artifact, _ = tiny_setup
    outcomes = set()
    for prompt, threshold, max_tokens in CASES:
        ids = tiny_engine.encode_chat([{"role": "user", "content": prompt}])
        steering = SteeringParams(mode="fasb", threshold=threshold, alpha=4.0, backtrack_tokens=4)
        fast = await collect(tiny_engine, ids, steering, max_tokens=max_tokens)
        slow = reference_fasb(loaded.model, artifact, ids, max_tokens=max_tokens, eos_ids={loaded.tokenizer.eos_token_id},
                              alpha=4.0, threshold=threshold, backtrack_tokens=4, num_heads=4)
        assert fast.token_ids == slow.tokens, (prompt, threshold)
        assert fast.backtracks == slow.backtracks, (prompt, threshold)
        outcomes.update(("early" if t < 4 else "late") for t, _ in slow.backtracks)
        outcomes.add("none" if not slow.backtracks else "backtracked")
    assert outcomes >= {"early", "late", "none", "backtracked"}
