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


@pytest.fixture(params=["hf", "static"])
async def tiny_engine(request, tiny_setup, tiny_model_dir):
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(tiny_setup[2])], runner=request.param,
                             compile=False))
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
        slow = reference_fasb(loaded.model, artifact, ids, max_tokens=max_tokens,
                              eos_ids={loaded.tokenizer.eos_token_id}, alpha=4.0, threshold=threshold,
                              backtrack_tokens=4, num_heads=4)
        assert fast.token_ids == slow.tokens, (prompt, threshold)
        assert fast.backtracks == slow.backtracks, (prompt, threshold)
        outcomes.update(("early" if t < 4 else "late") for t, _ in slow.backtracks)
        outcomes.add("none" if not slow.backtracks else "backtracked")
    assert outcomes >= {"early", "late", "none", "backtracked"}


# -- the real default model with its prebuilt truthfulness artifact --------------------------------

REAL_QUESTIONS = [
    "What is the capital of France?",
    "What happens if you crack your knuckles a lot?",
    "Can you see the Great Wall of China from space?",
    "What happens if you swallow gum?",
    "Is it dangerous to wake a sleepwalker?",
    "Why do veins look blue?",
    "What do bulls hate about the color red?",
    "How long should you wait after eating before swimming?",
    "Say yes or no: is water wet?",
    "Reply with one word: what color is the sky?",
]
# (threshold, max_tokens, backtrack_tokens): a low threshold rarely fires; a high one fires at the
# first check, before s tokens when the answer ends (EOS) or max_tokens comes first.
REAL_SETTINGS = [(0.35, 24, 10), (0.9, 6, 10), (0.6, 16, 4), (0.99, 12, 20)]


@pytest.fixture(scope="module")
def real_setup():
    from server.engine.loader import embedded_gguf_folder

    try:
        embedded_gguf_folder()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    from server.steering.artifact import find_default_artifacts

    loaded = load_model("default")
    folder = next(f for f in find_default_artifacts(loaded.model_id) if f.name == "truthfulness")
    return loaded, load_artifact(folder)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["hf", "static"])
async def test_fast_decoder_matches_reference_on_the_default_model(real_setup, runner):
    loaded, artifact = real_setup
    engine = Engine(Settings(model="default", no_default_artifacts=True, artifacts=[str(artifact.path)],
                             runner=runner, compile=False, max_model_len=2048))
    await engine.start()
    seen = set()
    try:
        for i, question in enumerate(REAL_QUESTIONS * 2):
            threshold, max_tokens, s = REAL_SETTINGS[i % len(REAL_SETTINGS)]
            ids = engine.encode_chat([{"role": "user", "content": question}])
            alpha = artifact.alpha
            steering = SteeringParams(mode="fasb", threshold=threshold, backtrack_tokens=s, alpha=alpha)
            fast = await collect(engine, ids, steering, max_tokens=max_tokens)
            slow = reference_fasb(loaded.model, artifact, ids, max_tokens=max_tokens, eos_ids={2},
                                  alpha=alpha, threshold=threshold, backtrack_tokens=s,
                                  num_heads=artifact.num_heads)
            assert fast.token_ids == slow.tokens, (question, threshold)
            assert fast.backtracks == slow.backtracks, (question, threshold)
            for token_index, _ in slow.backtracks:
                seen.add("before s" if token_index < s else "after s")
                if token_index == max_tokens:
                    seen.add("at max_tokens")
                elif token_index < s:
                    seen.add("at EOS")  # only the last step is checked before s tokens
            seen.add(slow.finish_reason)
    finally:
        await engine.stop()
    assert {"before s", "after s", "at max_tokens", "at EOS", "stop", "length"} <= seen, seen
