"""Several behaviours monitored in one request, on a tiny model with two synthetic artifacts, on both runners."""

import asyncio

import pytest

from server.config import Settings
from server.engine.engine import Engine
from server.engine.types import SteeringParams
from server.errors import InvalidRequestError
from tests.engine_helpers import collect
from tests.synthetic_artifact import write_synthetic_artifact

PROMPTS = ["Hello", "What is the capital", "Is the earth flat?"]


@pytest.fixture(scope="module")
def artifact_dirs(tiny_model_dir, tmp_path_factory):
    from server.engine.loader import load_model

    model = load_model(str(tiny_model_dir)).model
    # "watchful" fires at every check (threshold 1), "calm" never does (threshold 0).
    watchful = write_synthetic_artifact(model, tmp_path_factory.mktemp("watchful"), heads=4, seed=1,
                                        behavior="watchful", threshold=1.0, alpha=6.0)
    calm = write_synthetic_artifact(model, tmp_path_factory.mktemp("calm"), heads=3, seed=2,
                                    behavior="calm", threshold=0.0, alpha=3.0)
    return [str(watchful), str(calm)]


@pytest.fixture(params=["hf", "static"])
async def engine(request, tiny_model_dir, artifact_dirs):
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=artifact_dirs, max_batch_size=8, max_queue=32,
                             runner=request.param, compile=False))
    await engine.start()
    yield engine
    await engine.stop()


def chat(engine, text):
    return engine.encode_chat([{"role": "user", "content": text}])


def monitor(*names):
    return SteeringParams(mode="monitor", behavior=names, return_scores=True, stream_mode="retract")


async def test_each_behaviours_scores_are_its_own_scores_alone(engine):
    ids = chat(engine, PROMPTS[0])
    both = await collect(engine, ids, monitor("watchful", "calm"), max_tokens=16)
    alone = {n: await collect(engine, ids, monitor(n), max_tokens=16) for n in ("watchful", "calm")}
    report = both.finished.steering
    assert report.behaviors == ("watchful", "calm") and not report.backtracks
    for name, replay in alone.items():
        assert both.token_ids == replay.token_ids
        assert report.behavior_scores[name] == pytest.approx(replay.finished.steering.scores, abs=1e-6)
    lowest = [min(a, b) for a, b in zip(report.behavior_scores["watchful"], report.behavior_scores["calm"])]
    assert report.scores == pytest.approx(lowest)


async def test_fasb_backtracks_for_the_behaviour_that_fired_and_steers_only_with_it(engine):
    """`calm` never fires and so never steers: the pair behaves exactly as `watchful` alone."""
    ids = chat(engine, PROMPTS[1])
    fasb = dict(mode="fasb", backtrack_tokens=4, max_backtracks=2, stream_mode="retract")
    pair = await collect(engine, ids, SteeringParams(behavior=("calm", "watchful"), **fasb), max_tokens=20)
    single = await collect(engine, ids, SteeringParams(behavior="watchful", **fasb), max_tokens=20)
    assert pair.token_ids == single.token_ids and pair.text == single.text
    assert pair.backtracks == single.backtracks and pair.backtracks
    assert all(b.behaviors == ("watchful",) for b in pair.finished.steering.backtracks)
    assert all(r.behaviors == ("watchful",) for r in pair.retractions)


async def test_both_firing_name_both_and_steer_with_both(engine):
    ids = chat(engine, PROMPTS[2])
    fasb = dict(mode="fasb", backtrack_tokens=4, threshold=1.0, stream_mode="retract")
    pair = await collect(engine, ids, SteeringParams(behavior=("watchful", "calm"), **fasb), max_tokens=12)
    first = pair.finished.steering.backtracks[0]
    assert set(first.behaviors) == {"watchful", "calm"} and first.strength > 0


async def test_rows_with_different_behaviour_sets_batch_as_they_run_alone(engine):
    jobs = []
    for i, text in enumerate(PROMPTS * 2):
        names = [("watchful",), ("calm",), ("watchful", "calm"), ("calm", "watchful")][i % 4]
        mode = ["monitor", "fasb"][i % 2]
        jobs.append(dict(prompt_ids=chat(engine, text), max_tokens=[8, 14, 20][i % 3],
                         steering=SteeringParams(mode=mode, behavior=names, backtrack_tokens=4, return_scores=True,
                                                 stream_mode="retract")))
    solo = [await collect(engine, **job) for job in jobs]
    together = await asyncio.gather(*[collect(engine, **job) for job in jobs])
    for alone, batched in zip(solo, together):
        assert batched.token_ids == alone.token_ids and batched.backtracks == alone.backtracks
        assert batched.finished.steering.scores == pytest.approx(alone.finished.steering.scores, abs=1e-5)


async def test_unknown_behaviour_in_a_list_is_refused(engine):
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, chat(engine, "Hi"), SteeringParams(mode="monitor", behavior=("calm", "nope")))
    assert err.value.param == "steering.behavior" and "nope" in err.value.message


async def test_server_default_can_monitor_a_list(tiny_model_dir, artifact_dirs):
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=artifact_dirs, default_behavior="calm, watchful"))
    await engine.start()
    try:
        replay = await collect(engine, chat(engine, "Hello"), None, max_tokens=8)
    finally:
        await engine.stop()
    assert replay.finished.steering.behaviors == ("calm", "watchful")


def test_server_refuses_an_unknown_default_behaviour(tiny_model_dir, artifact_dirs):
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=artifact_dirs, default_behavior="calm,nope"))
    with pytest.raises(ValueError, match="nope"):
        engine.load()
