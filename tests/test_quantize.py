"""Weight-only int8 and int4 (--quantization int8|int4): close to the fp32 layer (int4: exact on
Q4_1-shaped weights), o_proj untouched (steering and artifact fingerprints read it), decode-step
and prefill paths agree, and both runners decode the quantized model alike (steered)."""

import asyncio
import shutil

import pytest
import torch
from torch import nn

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.quantize import (
    Int4Linear,
    Int8Linear,
    Q8Linear,
    QuantizedLinear,
    prompt_gemm_dtype,
    quantize_weights,
)
from server.engine.types import SteeringParams
from server.steering.artifact import model_fingerprint
from tests.engine_helpers import collect
from tests.synthetic_artifact import write_synthetic_artifact

pytestmark = pytest.mark.usefixtures("one_thread")


# relative error bound: int8 with bf16 activations ~1%; int4 (16 levels per group of 32 Gaussian
# weights) ~8% per weight, less after summing 256 terms
@pytest.mark.parametrize(("cls", "bound"), [(Int8Linear, 0.02), (Int4Linear, 0.12)])
def test_quantized_linear_is_close_to_the_fp32_layer(cls, bound):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(5, 3, 256)
    expected, got = linear(x), cls(linear)(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert (got - expected).norm() / expected.norm() < bound


def test_int4_gives_back_q4_1_weights_exactly():
    """Weights that are Q4_1 blocks (w = d * q + m, q in 0..15 per group of 32, d and m fp16), as the
    default model's are, come back unchanged: int4 is their own layout, unlike int8's per-channel scales."""
    torch.manual_seed(0)
    n, k = 48, 128
    codes = torch.randint(0, 16, (n, k // 32, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its full range, as a Q4_1 quantizer makes it
    d = (torch.rand(n, k // 32, 1) * 0.01 + 1e-3).half().float()
    m = (-8 * d + torch.randn(n, k // 32, 1) * 0.02).half().float()
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_((codes * d + m).reshape(n, k))
    quantized = Int4Linear(linear)
    assert torch.equal(quantized.codes(), codes.to(torch.uint8).reshape(n, k))
    assert torch.equal(quantized.dequantized(torch.float32), linear.weight)
    assert (Int8Linear(linear).dequantized().float() - linear.weight).abs().max() > 0  # int8 rounds them


@pytest.mark.skipif(not Q8Linear.available(nn.Linear(64, 64)), reason="needs our CPU kernel (AVX-512 VNNI or AVX2)")
def test_q8_gives_back_q8_0_weights_exactly_and_multiplies_them():
    """The default model's LM head is Q8_0 blocks (w = d * q, q in -127..127 per group of 32, d fp16):
    Q8Linear keeps them unchanged, and its kernel's product is the fp32 one within the activations'
    ~15-bit coding; many rows take the dequantized GEMM."""
    torch.manual_seed(0)
    n, k = 64, 128
    codes = torch.randint(-127, 128, (n, k // 32, 32)).float()
    codes[..., 0] = 127  # the group's largest weight sets its scale, as a Q8_0 quantizer makes it
    d = (torch.rand(n, k // 32, 1) * 0.01 + 1e-3).half().float()
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_((codes * d).reshape(n, k))
    quantized = Q8Linear(linear)
    assert torch.equal(quantized.codes(), codes.to(torch.int8).reshape(n, k))
    assert torch.equal(quantized.dequantized(torch.float32), linear.weight)
    for rows in (1, 5, Q8Linear.kernel_max_rows + 8):
        x = torch.randn(rows, k)
        expected = linear(x)
        bound = 1e-4 if rows <= Q8Linear.kernel_max_rows else 1e-2  # above: the bf16 GEMM
        assert (quantized(x) - expected).norm() / expected.norm() < bound


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 200])  # the packed kernel, and the dequantized GEMM
def test_concatenated_layer_gives_the_parts_outputs_side_by_side(cls, rows):
    """q|k|v and gate|up fused for the static step (server/engine/runners/static/decode.py): the same codes and
    scales, so the same weights; a part without a bias gets zeros beside one that has one (Qwen2)."""
    torch.manual_seed(0)
    parts = [cls(nn.Linear(128, n, bias=bias)) for n, bias in ((64, True), (32, False), (32, True))]
    fused = cls.concatenated(parts)
    assert torch.equal(fused.dequantized(), torch.cat([p.dequantized() for p in parts]))
    x = torch.randn(rows, 128)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=1e-5)


def test_int8_cast_form_matches_the_cpu_kernel():
    """CUDA runs int8 as linear(x, weight cast to x's dtype) * scale: the same product as the CPU kernel."""
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(256, 96, bias=False))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert torch.allclose(layer.cast_matmul(x).float(), layer.packed_matmul(x).float(), atol=0.05, rtol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 200])  # the packed kernel, and the dequantized GEMM
def test_quantized_linear_on_cuda_matches_the_cpu_layer(cls, rows):
    """The CUDA kernels (own int4 packing, int8 cast form) give the CPU layer's result."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 192, bias=True)  # K = 576: int4 tiles K by 64 on CUDA, not by 128
    x = torch.randn(rows, 576)
    on_cpu = cls(linear)(x)
    on_cuda = cls(linear.cuda())(x.cuda()).cpu()
    assert torch.allclose(on_cuda, on_cpu, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_decode_kernel_and_prefill_gemm_agree(cls):
    """Few rows run the packed kernel, many the dequantized GEMM: the same weights either way."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(128, 64, bias=True))
    x = torch.randn(cls.kernel_max_rows + 8, 128)
    many = layer(x)
    few = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    assert torch.allclose(many, few, atol=0.05, rtol=0.02)  # bf16 activations, different accumulation


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_prompt_rows_dequantize_the_weights_once(cls):
    """Dequantizing cost ~7x the GEMM itself (quantize.py): the bf16 weights are made by the first
    call with many rows and reused, unchanged, by the next."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(128, 64, bias=True))
    x = torch.randn(cls.kernel_max_rows + 8, 128)
    layer(x[:1])
    assert layer._gemm_weight is None  # decode-sized calls never make it
    first = layer(x)
    kept = layer._gemm_weight
    assert kept is not None and torch.equal(kept, layer.dequantized())
    assert torch.equal(layer(x), first) and layer._gemm_weight is kept


def test_prompt_gemms_run_in_the_dtype_measured_fastest_here(tiny_model_dir):
    """bf16 where this CPU runs it clearly faster (AMX), else fp32 (AVX2 converts bf16 in software):
    every quantized layer of the model takes the one choice, its kept weight is in it, and in fp32 the
    prompt rows are the dequantized weight's product."""
    model = load_model(str(tiny_model_dir)).model
    quantize_weights(model, "int4")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and {m.prompt_dtype for m in layers} == {prompt_gemm_dtype()}
    layer = next(m for m in layers if isinstance(m, Int4Linear))
    layer.prompt_dtype = torch.float32
    x = torch.randn(layer.kernel_max_rows + 8, layer.in_features)
    expected = x @ layer.dequantized(torch.float32).T + (0 if layer.bias is None else layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer._gemm_weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_keeps_o_proj_and_the_artifact_fingerprint(tiny_model_dir, method):
    model = load_model(str(tiny_model_dir)).model
    before = model_fingerprint(model, [0, 1])
    original_o_proj = model.model.layers[0].self_attn.o_proj
    quantize_weights(model, method)
    layer = model.model.layers[0]
    cls = Int4Linear if method == "int4" else Int8Linear
    assert isinstance(layer.self_attn.q_proj, cls) and isinstance(layer.mlp.down_proj, cls)
    # int8 under both (server/engine/quantize.py): Q8_0 groups on our CPU kernel where it runs
    assert isinstance(model.lm_head, Q8Linear if Q8Linear.available(nn.Linear(64, 64)) else Int8Linear)
    assert layer.self_attn.o_proj is original_o_proj and type(original_o_proj) is nn.Linear
    assert model_fingerprint(model, [0, 1]) == before


def _q4_1_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with every decoder-layer weight rounded to Q4_1 blocks, as the default model's are,
    so that int4 represents them exactly (test_int4_gives_back_q4_1_weights_exactly)."""
    folder = tmp_path / "q4_1"
    shutil.copytree(tiny_model_dir, folder)
    model = load_model(str(tiny_model_dir)).model
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (m for m in layer.modules() if type(m) is nn.Linear):
                linear.weight.copy_(Int4Linear(linear).dequantized(torch.float32))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["int8", "int4"])
async def test_both_runners_decode_the_quantized_model_alike(tiny_model_dir, tmp_path, method):
    """int8: both runners run the same layers. int4: the static step also reads o_proj as int4
    (server/engine/runners/static/decode.py), the hf runner in fp32: on Q4_1 weights (the default model's) the
    same weights, only o_proj's activations coded in ~15 bits instead of fp32's 24. The same tokens —
    except that steering (alpha 4 on a random model), added to o_proj's input by one runner and to
    its output by the other, differs in the last bits, which a kernel that codes its activations in
    ~15 bits (int4's layers, the LM head on our CPU kernel) can turn into a near-tie flip after a few
    tokens (seen on a Zen 4 EPYC): the FASB row must agree up to its first backtrack's retraction and
    back up alike, the always-steered row on its first two tokens (the prefill's, and the first
    steered step's)."""
    model_dir = _q4_1_model_dir(tiny_model_dir, tmp_path) if method == "int4" else tiny_model_dir
    artifact = write_synthetic_artifact(load_model(str(model_dir)).model, tmp_path, heads=4, seed=1)
    results = {}
    for runner in ("hf", "static"):
        engine = Engine(Settings(model=str(model_dir), artifacts=[str(artifact)], runner=runner, compile=False,
                                 quantization=method, max_batch_size=4))
        await engine.start()
        try:
            jobs = []
            for i, text in enumerate(["Hello", "What is the capital", "Is the earth flat?", "quick brown fox"]):
                steering = SteeringParams(mode=["off", "fasb", "monitor", "always"][i], threshold=0.6,
                                          backtrack_tokens=4, alpha=4.0)
                ids = engine.encode_chat([{"role": "user", "content": text}])
                jobs.append(collect(engine, ids, steering, request_id=str(i), max_tokens=16))
            results[runner] = [(r.token_ids, r.backtracks) for r in await asyncio.gather(*jobs)]
        finally:
            await engine.stop()
    assert results["static"][0] == results["hf"][0] and results["static"][2] == results["hf"][2]  # off, monitor
    fasb_static, fasb_hf = results["static"][1], results["hf"][1]
    assert fasb_static[1][:1] == fasb_hf[1][:1]  # the first backtrack: same token, same length
    kept = fasb_hf[1][0][0] - fasb_hf[1][0][1] if fasb_hf[1] else len(fasb_hf[0])
    assert fasb_static[0][:kept] == fasb_hf[0][:kept]
    assert results["static"][3][0][:2] == results["hf"][3][0][:2]  # always
