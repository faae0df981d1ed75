"""The in-process engine the builder and evaluations use: final answers with retractions applied."""

import pytest

from server.engine import offline
from server.engine.types import GenerationRequest, SamplingParams, SteeringParams
from tests.synthetic_artifact import write_synthetic_artifact


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    from server.engine.loader import load_model

    artifact = write_synthetic_artifact(load_model(str(tiny_model_dir)).model, tmp_path_factory.mktemp("a"),
                                        heads=4, seed=1)
    engine = offline.start_engine(str(tiny_model_dir), requests=8, max_batch_size=4, artifacts=[str(artifact)])
    yield engine
    offline.stop_engine(engine)


def _request(engine, name: str, stream_mode: str) -> GenerationRequest:
    # threshold 1.0 fires at every check: the streamed answer is retracted and rewritten several times
    steering = SteeringParams(mode="fasb", threshold=1.0, backtrack_tokens=3, max_backtracks=3,
                              stream_mode=stream_mode)
    ids = engine.encode_chat([{"role": "user", "content": "Is the earth flat?"}])
    return GenerationRequest(name, ids, SamplingParams(max_tokens=16, temperature=0.0), steering)


def test_retracted_text_is_removed_as_a_client_would(engine):
    retracted, held = offline.complete_all(engine, [_request(engine, "r", "retract"), _request(engine, "h", "hold")])
    assert retracted.backtracks == held.backtracks == 3
    assert retracted.finished.discarded_tokens > 0
    # hold mode never streams what a backtrack discards, so its text is the reference
    assert retracted.text == held.text
    assert retracted.finished.completion_tokens == held.finished.completion_tokens


def test_answers_come_back_in_request_order(engine):
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = ["Hello", "What is the capital", "quick brown fox"]
    requests = [GenerationRequest(f"p{i}", engine.encode_chat([{"role": "user", "content": p}]), sampling, None)
                for i, p in enumerate(prompts)]
    together = offline.complete_all(engine, requests)
    alone = [offline.complete_all(engine, [r])[0] for r in requests]
    assert [c.text for c in together] == [c.text for c in alone]
