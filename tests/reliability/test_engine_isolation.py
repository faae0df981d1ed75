"""In-process engine on the tiny model: one row's failure, a dead worker, budgets and deadlines.

The HTTP-level reproducers are in the other modules of this tier; these need to reach inside the
engine (make one row's sampling raise, kill the worker thread) which no request can do any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from server.config import Settings
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, SamplingParams, SteeringParams
from server.errors import EngineUnavailableError, ServerError
from tests.engine_helpers import collect

pytestmark = pytest.mark.asyncio

PROMPTS = ["Hello", "What is the capital", "Is the earth flat?", "quick brown fox"]


@pytest.fixture(params=["hf", "static"])
async def engine(request, long_model_dir, artifact_dir):
    settings = Settings(model=str(long_model_dir), artifacts=[str(artifact_dir)], max_batch_size=8, max_queue=16,
                        runner=request.param, compile=False)
    engine = Engine(settings)
    await engine.start()
    yield engine
    await engine.stop()


def chat(engine: Engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


@contextlib.asynccontextmanager
async def started_engine(model_dir, **settings):
    engine = Engine(Settings(model=str(model_dir), **settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


class ExplodingGenerator:
    """Stands in for a torch.Generator whose use raises: a failure inside one row's sampling."""

    def __getattr__(self, name):
        raise RuntimeError("this row's sampling is broken")


async def test_a_row_whose_sampling_fails_fails_alone(engine):
    solo = {text: await collect(engine, chat(engine, text), max_tokens=12, temperature=0.8, seed=7)
            for text in PROMPTS}
    poisoned = engine.submit(GenerationRequest("poison", chat(engine, "Hello"), SamplingParams(
        max_tokens=12, temperature=0.8, seed=1)))
    engine._queue._waiting[-1].generator = ExplodingGenerator()  # reach the row before the worker does

    async def poisoned_outcome():
        with pytest.raises(ServerError, match="failed for this request"):
            async for _ in poisoned:
                pass

    healthy = [collect(engine, chat(engine, text), max_tokens=12, temperature=0.8, seed=7) for text in PROMPTS]
    results = await asyncio.gather(poisoned_outcome(), *healthy)
    for text, replay in zip(PROMPTS, results[1:]):
        assert replay.text == solo[text].text
        assert replay.finished.finish_reason == solo[text].finished.finish_reason


async def test_backtracks_end_within_the_decode_budget(engine):
    # Threshold 1 fails every check: only the caps end this request.
    steering = SteeringParams(mode="fasb", threshold=1.0, backtrack_tokens=1, max_backtracks=32)
    replay = await collect(engine, chat(engine, "Hello"), steering, max_tokens=4, ignore_eos=True)
    finished = replay.finished
    assert finished.completion_tokens + finished.discarded_tokens <= 4 * 4
    assert 1 <= len(finished.steering.backtracks) <= 32


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_worker_that_dies_fails_its_requests_and_health(engine):
    def die():
        raise KeyboardInterrupt("simulated: the decode worker is gone")

    engine._scheduler._iteration = die  # the worker runs it on its next wake-up
    request = GenerationRequest("x", chat(engine, "Hello"), SamplingParams(max_tokens=4))
    with pytest.raises(EngineUnavailableError):
        async for _ in engine.submit(request):
            pass
    deadline = time.monotonic() + 5
    while engine.health() != "dead" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert engine.health() == "dead"
    with pytest.raises(EngineUnavailableError):  # refused at once, not queued for a worker that is gone
        engine.submit(request)


async def test_stalled_worker_is_reported(engine, monkeypatch):
    monkeypatch.setattr(engine.settings, "worker_stall_timeout", 0.2)
    monkeypatch.setattr(engine._queue, "stats", lambda: {"waiting": 1, "running": 0})
    engine._scheduler.waiting_for_work = False  # as if stuck inside a step
    engine._scheduler.heartbeat = time.monotonic() - 1
    assert engine.health() == "stalled"


async def test_a_burst_after_a_long_idle_spell_is_not_a_stall(engine, monkeypatch):
    """The worker's heartbeat is as old as the idle spell until its thread wakes: the second of two
    requests submitted in one go after an idle spell longer than the stall timeout must not be
    refused as 'stalled'."""
    monkeypatch.setattr(engine.settings, "worker_stall_timeout", 0.2)
    ids = chat(engine, "Hi")
    await asyncio.sleep(0.5)  # idle, longer than the stall timeout
    streams = [engine.submit(GenerationRequest(f"burst{i}", ids, SamplingParams(max_tokens=2)))
               for i in range(8)]  # back to back in one event-loop turn: the worker has not run yet
    for stream in streams:
        async for _ in stream:
            pass
    assert engine.health() == "ok"


async def test_deadline_ends_a_request_with_finish_reason_length(long_model_dir):
    async with started_engine(long_model_dir, request_timeout=0.5, max_batch_size=2) as engine:
        started = time.monotonic()
        replay = await collect(engine, chat(engine, "Hello"), max_tokens=3000, ignore_eos=True)
        assert replay.finished.finish_reason == "length"
        assert replay.finished.completion_tokens < 3000
        assert time.monotonic() - started < 10


async def test_cancelled_waiting_request_frees_its_place_at_once(long_model_dir):
    async with started_engine(long_model_dir, max_batch_size=1, max_queue=2) as engine:
        long = SamplingParams(max_tokens=3000, ignore_eos=True)
        running = engine.submit(GenerationRequest("a", chat(engine, "Hi"), long))
        waiting = engine.submit(GenerationRequest("b", chat(engine, "Hi"), long))
        waiting.cancel()
        third = engine.submit(GenerationRequest("c", chat(engine, "Hi"), SamplingParams(max_tokens=2)))  # no 429
        running.cancel()
        async for _ in third:
            pass


async def test_abort_all_ends_running_and_waiting_requests(long_model_dir):
    async with started_engine(long_model_dir, max_batch_size=1, max_queue=4) as engine:
        streams = [engine.submit(GenerationRequest(f"r{i}", chat(engine, "Hi"),
                                                   SamplingParams(max_tokens=3000, ignore_eos=True)))
                   for i in range(3)]
        await streams[0].__anext__()  # the first one runs
        engine.abort_all(ServerError("stop now"))
        for stream in streams:
            with pytest.raises(ServerError, match="stop now"):
                async for _ in stream:
                    pass
        assert engine.idle()
