"""Weight-only int8 (--quantization int8): close to the fp32 layer, o_proj untouched (steering and
artifact fingerprints read it), and both runners decode the quantized model alike."""

import asyncio

import pytest
import torch
from torch import nn

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.quantize import Int8Linear, quantize_weights
from server.engine.types import SteeringParams
from server.steering.artifact import model_fingerprint
from tests.engine_helpers import collect
from tests.synthetic_artifact import write_synthetic_artifact

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_linear_is_close_to_the_fp32_layer():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(5, 3, 256)
    expected, got = linear(x), Int8Linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert (got - expected).norm() / expected.norm() < 0.02  # int8 weights, bf16 activations


def test_quantize_keeps_o_proj_and_the_artifact_fingerprint(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).model
    before = model_fingerprint(model, [0, 1])
    quantize_weights(model, "int8")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and isinstance(layer.mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)
    assert type(layer.self_attn.o_proj) is nn.Linear
    assert model_fingerprint(model, [0, 1]) == before


async def test_both_runners_decode_the_int8_model_alike(tiny_model_dir, tmp_path):
    artifact = write_synthetic_artifact(load_model(str(tiny_model_dir)).model, tmp_path, heads=4, seed=1)
    results = {}
    for runner in ("hf", "static"):
        engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact)], runner=runner, compile=False,
                                 quantization="int8", max_batch_size=4))
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
    assert results["static"] == results["hf"]
