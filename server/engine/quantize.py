"""Weight-only int8 quantization of a loaded model's linear layers (`--quantization int8`, CPU).

Why this form: decoding one token reads every weight once, so on CPU a small model's step is
bound by memory traffic, and int8 weights are a quarter of fp32's bytes. torch's int8 weight-only
kernel (`aten._weight_int8pack_mm`) is slow with fp32 activations here, but fast with bf16 ones,
which use the CPU's bf16 dot-product instructions; so each quantized matmul runs on bf16
activations and its output returns to the model's dtype. Measured numbers: bench/README.md.

What is quantized: every decoder layer's q/k/v projections and MLP, and the LM head. Not the
attention output projection (`o_proj`): its weights are what the steering vectors are computed
from and what artifacts fingerprint (server/steering/artifact.py), and the probes read its input,
so steering and monitoring see exactly the fp32 model's math there. Embeddings stay as they are
(a lookup reads one row).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from server.steering.layers import decoder_layers

log = logging.getLogger(__name__)

# Rows up to which the packed int8 kernel is used (decode steps: one row per running request).
# Measured for a 576x1536 layer, 1 thread (best of 5): packed 0.07 / 0.46 / 0.84 / 1.98 ms at
# 1 / 8 / 16 / 32 rows, dequantize + bf16 GEMM ~1.3-1.5 ms up to 32 rows and 1.9 ms at 256
# (packed: 10.6 ms) on this CPU's bf16 matrix instructions; the crossover is near 24 rows.
_PACKED_MAX_ROWS = 16

_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj")


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b, q int8 per output channel (symmetric), the matmul on bf16 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()  # [N, K]
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # [N]
        self.register_buffer("qweight", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.shape[0] <= _PACKED_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        else:  # prefill: the packed kernel is a matrix-vector one; a bf16 GEMM is ~5x faster at 256 rows
            out = F.linear(flat, self.qweight.to(torch.bfloat16) * self.scale[:, None])
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias


def _replace(root: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    linear = getattr(parent, name)
    if isinstance(linear, nn.Linear):
        setattr(parent, name, Int8Linear(linear))


def quantize_weights(model: nn.Module, method: str) -> None:
    """Quantize `model` in place; "none" leaves it as it is."""
    if method == "none":
        return
    if method != "int8":
        raise ValueError(f"unknown quantization {method!r} (none or int8)")
    if model.device.type != "cpu":
        raise ValueError("--quantization int8 is implemented for CPU only; on CUDA use --dtype bfloat16")
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in decoder_layers(model):
        for path in _LAYER_LINEARS:
            _replace(layer, path)
    if isinstance(model.get_output_embeddings(), nn.Linear):
        # A tied LM head gets its own int8 copy; the embedding keeps the original for lookups.
        model.set_output_embeddings(Int8Linear(model.get_output_embeddings()))
    after = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    log.info("int8 weights: %.0f MiB -> %.0f MiB resident in the model", before / 2**20, after / 2**20)
