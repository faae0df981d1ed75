"""The decode loop end to end on a tiny model: parity with HF generate, batching, cancellation."""

import asyncio

import pytest
import torch

from server.config import Settings
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, SamplingParams, SteeringParams
from server.errors import InvalidRequestError, QueueFullError
from tests.engine_helpers import collect
from tests.synthetic_artifact import write_synthetic_artifact

PROMPTS = ["Hello", "What is the capital", "Is the earth flat?", "café 日本語", "quick brown fox", "Numbers 0 1 2"]


@pytest.fixture(scope="module")
def artifact_dir(tiny_model_dir, tmp_path_factory):
    from server.engine.loader import load_model

    model = load_model(str(tiny_model_dir)).model
    return write_synthetic_artifact(model, tmp_path_factory.mktemp("artifact"), heads=4, seed=1)


@pytest.fixture(params=["hf", "static"])
async def engine(request, tiny_model_dir, artifact_dir):
    # Every engine test runs on both runners (the static one eagerly; test_static_runner.py compiles).
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact_dir)], max_batch_size=8, max_queue=32,
                             runner=request.param, compile=False))
    await engine.start()
    yield engine
    await engine.stop()


def chat(engine, text):
    return engine.encode_chat([{"role": "user", "content": text}])


async def test_greedy_matches_hf_generate(engine):
    model, tokenizer = engine._loaded.model, engine._loaded.tokenizer
    for text in PROMPTS[:3]:
        ids = chat(engine, text)
        ours = await collect(engine, ids, SteeringParams(mode="off"), max_tokens=24)
        hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        hf = hf[: hf.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in hf else hf
        assert ours.token_ids == hf
        assert ours.text == tokenizer.decode(hf, skip_special_tokens=True)


async def test_server_default_is_monitor(engine):
    ids = chat(engine, "Hello")
    replay = await collect(engine, ids, None, max_tokens=24)
    report = replay.finished.steering
    assert report.mode == "monitor" and report.behavior == "synthetic"
    assert replay.retractions == [] and report.backtracks == [] and not report.intervened


async def test_fasb_server_default_streams_in_hold_mode(tiny_model_dir, artifact_dir):
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact_dir)], steering_mode="fasb",
                             threshold=1.0, backtrack_tokens=4))
    await engine.start()
    try:
        replay = await collect(engine, chat(engine, "Hello"), None, max_tokens=24)
    finally:
        await engine.stop()
    report = replay.finished.steering
    assert report.mode == "fasb" and report.backtracks  # threshold 1.0: every check fails
    assert replay.retractions == []  # hold mode: nothing sent is ever taken back


async def test_seed_reproducible_and_temperature_varies(engine):
    ids = chat(engine, "Hello")
    a = await collect(engine, ids, max_tokens=16, temperature=1.0, seed=7)
    b = await collect(engine, ids, max_tokens=16, temperature=1.0, seed=7)
    c = await collect(engine, ids, max_tokens=16, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


async def test_stop_string_cuts_text_and_is_not_included(engine):
    ids = chat(engine, "Hello")
    full = await collect(engine, ids, max_tokens=30)
    stop = full.text[5:7]
    cut = await collect(engine, ids, max_tokens=30, stop=(stop,))
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finished.finish_reason == "stop"


async def test_concurrent_mixed_requests_equal_their_solo_runs(engine):
    jobs = []
    for i, text in enumerate(PROMPTS * 3):
        mode = ["off", "monitor", "always", "fasb"][i % 4]
        steering = SteeringParams(mode=mode, threshold=[0.3, 0.6, 0.9][i // len(PROMPTS)], backtrack_tokens=4,
                                  alpha=4.0, stream_mode=["retract", "hold"][i % 2])
        jobs.append(dict(prompt_ids=chat(engine, text * (1 + i % 3)), steering=steering,
                         max_tokens=[3, 12, 20, 40][i % 4], stop=("a",) if i % 5 == 0 else ()))
    solo = [await collect(engine, **job) for job in jobs]
    together = await asyncio.gather(*[collect(engine, **job) for job in jobs])
    for alone, batched in zip(solo, together):
        assert batched.token_ids == alone.token_ids
        assert batched.text == alone.text
        assert batched.backtracks == alone.backtracks
    assert any(r.backtracks for r in solo), "the mix should include backtracking requests"


async def test_cancel_stops_generation(engine):
    request = GenerationRequest("c", chat(engine, "Hello"), SamplingParams(max_tokens=200, ignore_eos=True))
    stream = engine.submit(request)
    await stream.__anext__()
    stream.cancel()
    for _ in range(100):
        if engine.stats() == {"waiting": 0, "running": 0}:
            break
        await asyncio.sleep(0.02)
    assert engine.stats() == {"waiting": 0, "running": 0}


async def test_prompt_longer_than_context_is_rejected(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(GenerationRequest("x", [5] * 400, SamplingParams(max_tokens=4)))
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(GenerationRequest("x", [5] * 10, SamplingParams(max_tokens=1000)))
    assert err.value.param == "max_tokens"


async def test_unknown_behavior_lists_loaded_ones(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(GenerationRequest("x", [5, 6], SamplingParams(max_tokens=4), SteeringParams(behavior="nope")))
    assert err.value.param == "steering.behavior" and "synthetic" in err.value.message


async def test_queue_full_is_reported(tiny_model_dir):
    engine = Engine(Settings(model=str(tiny_model_dir), max_queue=1, max_batch_size=1))
    await engine.start()
    try:
        first = engine.submit(GenerationRequest("a", [5, 6], SamplingParams(max_tokens=200, ignore_eos=True)))
        with pytest.raises(QueueFullError):
            engine.submit(GenerationRequest("b", [5, 6], SamplingParams(max_tokens=4)))
        first.cancel()
    finally:
        await engine.stop()


async def test_model_loads_and_decodes_on_one_worker_thread(tiny_model_dir, monkeypatch):
    # One thread runs all torch work: a second OpenMP team in the process slows decoding ~30% on CPU.
    import threading

    import server.engine.engine as engine_module
    from server.engine.batch import Batch

    threads: dict[str, str] = {}
    real_load, real_step = engine_module.load_model, Batch.step

    def load(*args, **kwargs):
        threads["load"] = threading.current_thread().name
        return real_load(*args, **kwargs)

    def step(self):
        threads["step"] = threading.current_thread().name
        return real_step(self)

    monkeypatch.setattr(engine_module, "load_model", load)
    monkeypatch.setattr(Batch, "step", step)
    engine = Engine(Settings(model=str(tiny_model_dir), max_batch_size=1))
    await engine.start()
    try:
        await collect(engine, [5, 6], max_tokens=2)
    finally:
        await engine.stop()
    assert threads["load"] == threads["step"] == "fasb-decode"
    assert threading.current_thread().name != "fasb-decode"


async def test_load_failure_reaches_start(tmp_path):
    engine = Engine(Settings(model=str(tmp_path / "no-such-model")))
    with pytest.raises(FileNotFoundError, match="no-such-model does not exist"):
        await engine.start()
    assert not engine.ready
    await engine.stop()  # nothing running: returns at once


@pytest.mark.parametrize("runner", ["hf", "static"])
async def test_small_prefill_chunks_give_the_same_tokens(tiny_model_dir, runner):
    # --prefill-chunk-tokens 16: a burst of prompts is prefilled over many iterations, interleaved
    # with decode steps of the rows already running; every row's greedy tokens stay the same.
    engine = Engine(Settings(model=str(tiny_model_dir), max_batch_size=8, prefill_chunk_tokens=16, runner=runner,
                             compile=False))
    await engine.start()
    try:
        prompts = [chat(engine, text * 3) for text in PROMPTS]
        model = engine._loaded.model
        together = await asyncio.gather(*(collect(engine, ids, request_id=str(i), max_tokens=12)
                                          for i, ids in enumerate(prompts)))
        for ids, ours in zip(prompts, together):
            hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
            eos = engine._loaded.tokenizer.eos_token_id
            assert ours.token_ids == (hf[: hf.index(eos)] if eos in hf else hf)
    finally:
        await engine.stop()
