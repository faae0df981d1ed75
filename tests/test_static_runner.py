"""The static runner beyond the runner contract (tests/test_runner_contract.py): its slot cache
(written at a row's length, slots reused), its step against transformers' forward on Llama-family
variants (GQA, q/k/v biases), inline steering and capture against the hf runner's hooks, and the
compiled step end to end."""

import asyncio
import gc
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.quantize import Int4Linear, Q8Linear, quantize_weights
from server.engine.runners.hf import HFRunner
from server.engine.runners.prefill import PrefillGroup
from server.engine.runners.static import StaticRunner
from server.engine.runners.static.decode import FusedProjections
from server.engine.runners.static.runner import _cpu_inductor_options, batch_buckets
from server.engine.types import SteeringParams
from server.steering.layers import attention_output_projections
from server.steering.taps import HeadTaps
from tests.engine_helpers import collect
from tests.synthetic_artifact import write_synthetic_artifact

PAD = 0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).model


def fresh_logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1]


def join(model, runner, prompts):
    """Prefill prompts[:-1] as one group and hand it to the runner."""
    group = PrefillGroup([SimpleNamespace(prompt=p) for p in prompts], model.device, PAD)
    while not group.finished:
        runner.prefill(group, 512)
    runner.add_group(group)


def decode(runner, inputs, positions):
    runner.set_rows(None, False)
    return runner.decode(inputs, positions)[0]


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_step_writes_at_each_rows_length(tiny):
    runner = StaticRunner(tiny, None, max_rows=4, max_len=64, compile=False)
    a, b = [5, 9, 12, 7, 30], [8, 3]
    join(tiny, runner, [a, b])
    assert runner.slots == [0, 1]
    logits = decode(runner, [a[-1], b[-1]], [4, 1])
    assert_close(logits[0], fresh_logits(tiny, a))
    assert_close(logits[1], fresh_logits(tiny, b))
    k, end = runner.cache.layer(0)[0], runner.cache.zeroed  # k: [slots, kv_heads, max_len, D]
    assert end == 64  # zeroed lazily, up to the attention width of this step
    assert k[0, :, 4].abs().sum() > 0 and k[0, :, 5:end].abs().sum() == 0
    assert k[1, :, 1].abs().sum() > 0 and k[1, :, 2:end].abs().sum() == 0


@torch.inference_mode()
def test_rows_leave_and_join_into_free_slots(tiny):
    runner = StaticRunner(tiny, None, max_rows=4, max_len=64, compile=False)
    a, b, c = [5, 9, 12], [8, 3, 4, 6], list(range(10, 22))
    join(tiny, runner, [a, b])
    decode(runner, [a[-1], b[-1]], [2, 3])
    runner.remove_rows([1])  # a leaves: its slot 0 is free again
    join(tiny, runner, [c])
    assert runner.slots == [1, 0]
    logits = decode(runner, [60, c[-1]], [4, len(c) - 1])
    assert_close(logits[0], fresh_logits(tiny, b + [60]))
    assert_close(logits[1], fresh_logits(tiny, c))


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


def _family_model(kind, num_layers=2):
    common = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v projections carry biases
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:  # llama with rope scaling and multi-query attention
        common["num_key_value_heads"] = 1
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama-mqa"])
def test_llama_family_step_matches_transformers(kind):
    model = _family_model(kind)
    runner = StaticRunner(model, None, max_rows=2, max_len=32, compile=False)
    a, b = [3, 17, 4, 99, 23, 5], [42, 7]
    join(model, runner, [a, b])
    for n in range(4):
        logits = decode(runner, [a[-1] + n, b[-1] + n], [len(a) - 1 + n, len(b) - 1 + n])
        assert_close(logits[0], fresh_logits(model, a + [a[-1] + m for m in range(1, n + 1)]))
        assert_close(logits[1], fresh_logits(model, b + [b[-1] + m for m in range(1, n + 1)]))


@torch.inference_mode()
@pytest.mark.parametrize("num_layers", [2, 7])  # 7: taps on some layers, not others, first and last
def test_inline_steering_and_capture_equal_the_hooks(tiny, num_layers):
    model = tiny if num_layers == 2 else _family_model("llama", num_layers=num_layers)
    layers = [0, 1] if num_layers == 2 else [1, 4, 5, 6]
    taps = HeadTaps(attention_output_projections(model), layers).install()
    try:
        hf, static = HFRunner(model, taps), StaticRunner(model, taps, max_rows=2, max_len=64, compile=False)
        prompts = [[5, 9, 12, 7, 30], [8, 3]]
        steer = torch.randn(2, len(layers), tiny.config.hidden_size)  # [B, taps, hidden]
        steer[1] = 0  # row 1 unsteered
        results = []
        for runner in (hf, static):
            join(model, runner, prompts)  # prefill unsteered, as the scheduler does (taps paused)
        for runner in (hf, static):
            runner.set_rows(steer, True)
            results.append(runner.decode([30, 3], [4, 1]))
        (hf_logits, hf_taps), (st_logits, st_taps) = results
        assert_close(st_logits, hf_logits)
        assert_close(st_taps, hf_taps)  # [taps, B, H*D]
        with taps.paused():
            assert not torch.allclose(hf_logits[0], fresh_logits(model, prompts[0]), atol=1e-3)  # row 0 was steered
            assert_close(hf_logits[1], fresh_logits(model, prompts[1]))
    finally:
        taps.remove()


async def test_compiled_static_runner_equals_hf_runner(tiny_model_dir, tmp_path):
    # The compiled step (inductor on CPU) gives the hf runner's greedy tokens and backtracks for a
    # mix of joins, leaves and backtracking requests. max_batch_size 2 keeps compilation short.
    artifact = write_synthetic_artifact(load_model(str(tiny_model_dir)).model, tmp_path, heads=4, seed=1)
    prompts = ["Hello", "What is the capital", "Is the earth flat?", "quick brown fox"]
    results = {}
    for runner in ("hf", "static"):
        engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact)], max_batch_size=2,
                                 runner=runner, compile=True))
        await engine.start()
        try:
            jobs = []
            for i, text in enumerate(prompts * 2):
                steering = SteeringParams(mode=["off", "fasb", "monitor", "always"][i % 4], threshold=0.6,
                                          backtrack_tokens=4, alpha=4.0)
                ids = engine.encode_chat([{"role": "user", "content": text * (1 + i % 3)}])
                jobs.append(collect(engine, ids, steering, request_id=str(i), max_tokens=[5, 20, 12, 30][i % 4]))
            results[runner] = [(r.token_ids, r.backtracks) for r in await asyncio.gather(*jobs)]
        finally:
            await engine.stop()
    assert results["static"] == results["hf"]
    assert any(backtracks for _, backtracks in results["hf"]), "the mix should include backtracking requests"


@torch.inference_mode()
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["qwen2", "mistral"])  # q/k/v biases; GQA
def test_fused_projections_give_the_steps_of_the_models_own(kind, method, monkeypatch):
    # With quantized weights the static step runs q|k|v and gate|up as one matmul each
    # (runners/static/decode.py); the layers' own modules give the same logits and captured heads.
    model = _family_model(kind)
    quantize_weights(model, method)
    layers = [0, 1]
    taps = HeadTaps(attention_output_projections(model), layers).install()
    steer = torch.randn(2, len(layers), model.config.hidden_size)
    a, b = [3, 17, 4, 99, 23, 5], [42, 7]
    results = []
    try:
        for fuse in (True, False):
            if not fuse:
                monkeypatch.setattr(FusedProjections, "applies", staticmethod(lambda layer: False))
            runner = StaticRunner(model, taps, max_rows=2, max_len=32, compile=False)
            assert len(runner.decoder.fused) == (len(model.model.layers) if fuse else 0)
            join(model, runner, [a, b])  # prefill: the model's own modules
            if fuse:  # under int4 an int4 copy of o_proj; the model keeps its own (steering reads it)
                step_o_projs = [runner.decoder.fused[str(i)].o_proj for i in range(len(model.model.layers))]
                assert all(type(layer.self_attn.o_proj) is nn.Linear for layer in model.model.layers)
                want = Int4Linear if method == "int4" else nn.Linear
                assert all(type(o_proj) is want for o_proj in step_o_projs)
            else:  # the layers' own step with the fused step's o_proj
                for layer, o_proj in zip(model.model.layers, step_o_projs):
                    monkeypatch.setattr(layer.self_attn, "o_proj", o_proj)
            runner.set_rows(steer, True)
            results.append(runner.decode([a[-1], b[-1]], [len(a) - 1, len(b) - 1]))
    finally:
        taps.remove()
    (fused_logits, fused_taps), (own_logits, own_taps) = results
    torch.testing.assert_close(fused_logits, own_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(fused_taps, own_taps, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_compiled_step_checks_fewer_guards_after_warm_up_and_still_compiles_what_it_lacks(tiny, caplog):
    # After the warm-up dynamo checks only the guards that told its graphs apart (runners/static/runner.py);
    # the rows in the slot order the runner makes still give the uncompiled step's logits, and inputs
    # no warmed-up graph was built for are compiled on demand, not an error.
    runner = StaticRunner(tiny, None, max_rows=2, max_len=64, compile=True)
    eager = StaticRunner(tiny, None, max_rows=2, max_len=64, compile=False)
    assert runner._skip_guards and not eager._skip_guards
    a, b = [5, 9, 12, 7, 30], [8, 3]
    for r in (runner, eager):
        join(tiny, r, [a, b])
    assert_close(decode(runner, [a[-1], b[-1]], [4, 1]), decode(eager, [a[-1], b[-1]], [4, 1]))
    ids = torch.tensor([a[-1], b[-1]], dtype=torch.int32)  # the runner's own ids are int64: no graph for these
    with caplog.at_level("WARNING", logger="server.engine.runners.static.runner"):
        logits, _ = runner._call_step(ids, torch.tensor([4, 1]), runner._steer, torch.arange(64))
    assert "compiling them now" in caplog.text
    assert_close(logits[0], fresh_logits(tiny, a))
    assert_close(logits[1], fresh_logits(tiny, b))
    runner.remove_rows([1])  # row b alone, in slot 1: bucket 2, its row gathered from the step's
    eager.remove_rows([1])
    assert_close(decode(runner, [11], [2]), decode(eager, [11], [2]))


@torch.inference_mode()
def test_a_step_dynamo_ran_uncompiled_is_run_again_and_no_collection_runs_inside(tiny, caplog):
    # Under load, a garbage-collection callback inside the step once left its frame uncompiled and
    # torch raised "found no compiled frames" after running it: the runner runs it again.
    runner = StaticRunner(tiny, None, max_rows=2, max_len=64, compile=True)
    join(tiny, runner, [[5, 9, 12]])
    runner.set_rows(None, False)
    compiled, calls = runner._step, []

    def flaky(*inputs):
        calls.append(gc.isenabled())
        if len(calls) == 1:
            raise RuntimeError("torch.compile with fullgraph=True found no compiled frames. Compilation was not "
                               "attempted and no cached compiled code was found.")
        return compiled(*inputs)

    runner._step = flaky
    with caplog.at_level("WARNING", logger="server.engine.runners.static.runner"):
        logits, _ = runner.decode([12], [2])
    assert "ran uncompiled once" in caplog.text and len(calls) == 2
    assert calls[0] is False and gc.isenabled()  # collection paused inside the step, back on after it
    assert_close(logits[0], fresh_logits(tiny, [5, 9, 12]))


def test_cpu_compile_autotunes_matmuls_only_for_torchs_quantized_kernels(tiny_model_dir):
    # Inductor's GEMM templates compete with torch's quantized kernels (int8 layers; the per-channel
    # int8 head); fp32 is not autotuned, nor int4 where every quantized layer is on our kernels (the
    # Q8_0 head included: a CPU with our kernels and without AMX).
    model = load_model(str(tiny_model_dir)).model
    assert _cpu_inductor_options(model) == {"freezing": True, "cpp_wrapper": True}
    int8 = load_model(str(tiny_model_dir)).model
    quantize_weights(int8, "int8")
    options = _cpu_inductor_options(int8)
    assert options["freezing"] and options["max_autotune"] and options["max_autotune_gemm_backends"] == "CPP,ATEN"
    quantize_weights(model, "int4")
    all_ours = Q8Linear.available(nn.Linear(64, 64))
    assert ("max_autotune" in _cpu_inductor_options(model)) == (not all_ours)


@torch.inference_mode()
def test_compiled_int4_step_agrees_with_eager(tiny_model_dir):
    # Compiled with quantized weights, each layer runs whichever kernel autotuning found faster,
    # inductor's own or torch's packed one (runners/static/runner.py), in another summation order than
    # eager: agreement, not equality.
    model = load_model(str(tiny_model_dir)).model
    quantize_weights(model, "int4")
    prompt = [5, 9, 12, 7, 30]
    logits = {}
    for compiled in (False, True):
        runner = StaticRunner(model, None, max_rows=1, max_len=64, compile=compiled)
        join(model, runner, [prompt])
        logits[compiled] = [decode(runner, [token], [pos])[0] for pos, token in zip(range(4, 7), (prompt[-1], 40, 41))]
    for compiled, eager in zip(logits[True], logits[False]):
        # logits up to ~8 here, rounded to bf16 by the int8 LM head (steps of 1/32 near 8): a few steps apart at most
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0.15)
        assert compiled.argmax() == eager.argmax()
