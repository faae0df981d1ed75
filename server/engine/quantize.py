"""Weight-only quantization of a loaded model's linear layers (`--quantization int8|int4`).

Weight-only because a decode step reads every weight once, so on CPU its time follows the weights'
bytes. int8: one scale per output channel. int4: GGUF's Q4_1 (fp16 scale and minimum per group of
32), the default model's own format, so it gives the shipped weights back exactly. The model's
`o_proj` stays as loaded (steering vectors and artifact fingerprints come from it); the LM head is
int8 under both (Q8_0, as the default model ships it, where our CPU kernel runs; else per
channel). How it works, and the measurements: docs/architecture.md "Quantized weights".
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.cpu_kernels import (
    cpu_has_amx,
    int4_q8_layout,
    int4_q8_mm,
    int8_q8_layout,
    int8_q8_mm,
    own_kernels_available,
)
from server.steering.layers import decoder_layers

log = logging.getLogger(__name__)

METHODS = ("none", "int8", "int4")

_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj")


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored quantized; the matmul on bf16 activations."""

    kernel_max_rows: int  # up to this many rows the packed kernel runs; above, dequantize + GEMM
    own_kernel = False  # whether the packed matmul is our kernel (nothing for inductor to tune)
    prompt_dtype = torch.bfloat16  # the prompt GEMM's; quantize_weights sets it per CPU (prompt_gemm_dtype)
    _gemm_weight: torch.Tensor | None = None  # in prompt_dtype, made by the first CPU call above kernel_max_rows

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= self.kernel_max_rows:
            out = self.packed_matmul(flat)
        else:
            out = F.linear(flat.to(self.prompt_dtype), self._prompt_weight())
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def _prompt_weight(self) -> torch.Tensor:
        """The weight for a prompt's GEMM: kept on CPU (see the module docstring); on CUDA, where
        dequantizing is cheap and memory is what int4 saves, made per call."""
        if self._gemm_weight is not None:
            return self._gemm_weight
        weight = self.dequantized(self.prompt_dtype)
        if weight.device.type == "cpu":
            self._gemm_weight = weight
        return weight

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] in the model's dtype -> [M, N] (bf16 or fp32, as the kernel gives it)."""
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight [N, K] (in prompt_dtype for the prefill's GEMM)."""
        raise NotImplementedError

    @classmethod
    def concatenated(cls, parts: list[QuantizedLinear]) -> QuantizedLinear:
        """One layer whose output is the parts' outputs side by side, from their quantized weights
        (each output channel is quantized on its own, so this is exact, not a re-quantization)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        fused.bias = None
        fused.prompt_dtype = parts[0].prompt_dtype
        some_bias = next((p.bias for p in parts if p.bias is not None), None)
        if some_bias is not None:  # Qwen2's q/k/v have biases
            biases = [p.bias if p.bias is not None else some_bias.new_zeros(p.out_features) for p in parts]
            fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
        fused.join_buffers(parts)
        return fused

    def join_buffers(self, parts: list[QuantizedLinear]) -> None:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights, symmetric, one scale per output channel."""

    # Above this many rows the kept bf16 weights' GEMM beats the packed kernel (the crossover is
    # near 24 rows; docs/architecture.md "Numbers behind the CPU step").
    kernel_max_rows = 16

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()  # [N, K]
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # [N]
        self.register_buffer("qweight", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)
        return self.cast_matmul(x)

    def cast_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The device-neutral form (CUDA): compiled, the cast fuses into the matmul's weight loads."""
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale[:, None].to(dtype)

    def join_buffers(self, parts: list[QuantizedLinear]) -> None:
        self.register_buffer("qweight", torch.cat([p.qweight for p in parts]))
        self.register_buffer("scale", torch.cat([p.scale for p in parts]))


class Int4Linear(QuantizedLinear):
    """int4 weights, asymmetric, per group of `GROUP` input weights: w = q * scale + min, q in 0..15.

    GGUF's Q4_1, with its fp16 scale and min, so a weight that came from a Q4_1 file (the default
    model's, server/engine/loader.py) is represented exactly: the codes and both fp16 numbers come
    back as they were. Our CPU kernel reads them so; torch's int4 kernels (CPU without our kernel, CUDA)
    take w = (q - 8) * scale + zero in bf16, derived from these and rounded (~3 significant digits).
    """

    GROUP = 32
    # Up to here our kernel beats the kept bf16 weights' GEMM on a whole prompt forward
    # (docs/architecture.md "Numbers behind the CPU step").
    kernel_max_rows = 24

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        n, k = self.out_features, self.in_features
        groups = linear.weight.detach().float().reshape(n, k // self.GROUP, self.GROUP)
        low, high = groups.amin(dim=2), groups.amax(dim=2)  # [N, K/G]
        scale = ((high - low) / 15).to(torch.float16).clamp(min=2**-24)  # >= fp16's smallest step: never 0
        minimum = low.to(torch.float16)
        codes = ((groups - minimum.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
        scale_min = torch.stack([scale, minimum], dim=2).transpose(0, 1).contiguous()  # [K/G, N, 2]
        self._store(codes.to(torch.uint8).reshape(n, k), scale_min)

    def _store(self, codes: torch.Tensor, scale_min: torch.Tensor) -> None:
        # The decode kernel's own layout (ours on a CPU that has it, decided here, on the weights'
        # device), and the codes two per byte (with scale_min) for dequantizing and `concatenated`.
        self.own_kernel = codes.device.type == "cpu" and own_kernels_available()
        if self.own_kernel:
            packed, kernel_scale_min = int4_q8_layout(codes, scale_min)
            self.register_buffer("kernel_scale_min", kernel_scale_min)
        else:
            packed = self._kernel_layout(codes)
            scale, minimum = scale_min.float().unbind(dim=2)
            self.register_buffer("scale_zero", torch.stack([scale, minimum + 8 * scale], dim=2).to(torch.bfloat16))
        self.register_buffer("packed", packed)
        self.register_buffer("nibbles", codes[:, 0::2] | (codes[:, 1::2] << 4))  # [N, K/2]
        self.register_buffer("scale_min", scale_min)

    def codes(self) -> torch.Tensor:
        """The codes [N, K], 0..15."""
        return torch.stack([self.nibbles & 15, self.nibbles >> 4], dim=2).reshape(self.out_features, self.in_features)

    def join_buffers(self, parts: list[QuantizedLinear]) -> None:
        self._store(torch.cat([p.codes() for p in parts]), torch.cat([p.scale_min for p in parts], dim=1))

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        """Shapes the kernels take, and weights inside fp16's range (its scales and mins)."""
        return (linear.in_features % Int4Linear.GROUP == 0 and linear.out_features % 16 == 0
                and bool(linear.weight.detach().abs().amax() < 6e4))

    @staticmethod
    def _kernel_layout(codes: torch.Tensor) -> torch.Tensor:
        """codes [N, K] uint8 in 0..15 -> the packed weight the device's int4 kernel reads."""
        if codes.device.type == "cpu":
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        # tinygemm (CUDA) takes two codes per byte, the even one high, and tiles K by 16 * inner_k_tiles;
        # the largest tiling K allows (GROUP = 32 divides K, so 2 always does).
        inner_k_tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (16 * t) == 0)
        pairs = (codes[:, 0::2] << 4) | codes[:, 1::2]
        return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel:  # activations as int8 parts, integer dot products (cpu_kernels.py)
            return int4_q8_mm(x, self.packed, self.kernel_scale_min)
        x = x.to(torch.bfloat16)
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.GROUP, self.scale_zero)
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.GROUP, self.scale_zero)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        codes = self.codes().reshape(n, k // self.GROUP, self.GROUP)
        scale, minimum = self.scale_min.float().transpose(0, 1).unbind(dim=2)  # [N, K/G] each
        return (codes * scale[..., None] + minimum[..., None]).reshape(n, k).to(dtype)


class Q8Linear(QuantizedLinear):
    """int8 weights, symmetric, per group of `GROUP` input weights: w = q * scale, q in -127..127.

    GGUF's Q8_0 with its fp16 scale, the format of the default model's embedding (tied to the LM
    head), so its head is represented exactly. Only on our CPU kernel (`Q8Linear.available`): on a
    CPU without AMX the LM head at a batch of 8 runs 6.5 -> 3.1 ms against inductor's kernel for
    torch's per-channel int8 one, which stays the head elsewhere (on an AMX CPU, where it uses
    AMX tiles, it was measured 3-8% faster per step than ours; docs/architecture.md).
    """

    GROUP = 32
    kernel_max_rows = 24
    own_kernel = True

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        n, k = self.out_features, self.in_features
        groups = linear.weight.detach().float().reshape(n, k // self.GROUP, self.GROUP)
        scale = (groups.abs().amax(dim=2) / 127).to(torch.float16).clamp(min=2**-24)  # [N, K/G], never 0
        codes = (groups / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        self.register_buffer("scale", scale)
        packed, kernel_scale = int8_q8_layout(codes, scale)
        self.register_buffer("packed", packed)
        self.register_buffer("kernel_scale", kernel_scale)

    @staticmethod
    def available(linear: nn.Linear) -> bool:
        """On a CPU with our kernel and without AMX, in shapes it takes, with scales inside fp16's range."""
        return (linear.weight.device.type == "cpu" and linear.in_features % Q8Linear.GROUP == 0
                and linear.out_features % 16 == 0 and bool(linear.weight.detach().abs().amax() < 6e4)
                and not cpu_has_amx() and own_kernels_available())

    def codes(self) -> torch.Tensor:
        """The codes [N, K], -127..127."""
        n, k = self.out_features, self.in_features
        unsigned = self.packed.reshape(n // 16, k // 4, 16, 4).permute(0, 2, 1, 3).reshape(n, k)
        return (unsigned.to(torch.int16) - 128).to(torch.int8)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_q8_mm(x, self.packed, self.kernel_scale)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        codes = self.codes().float().reshape(n, k // self.GROUP, self.GROUP)
        return (codes * self.scale.float()[..., None]).reshape(n, k).to(dtype)


@functools.cache
def prompt_gemm_dtype() -> torch.dtype:
    """The CPU prompt GEMM's dtype: bf16 where this CPU runs it clearly faster than fp32 (AMX tiles:
    ~4x), fp32 elsewhere (AVX2 alone converts bf16 in software: 5-9x slower than fp32 on a Zen 3).
    Timed once per process on a prompt-sized layer, not guessed from CPU flags; a near tie keeps
    fp32 (closer to the weights, and the choice must not flip between starts)."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG as it was
    x, w = torch.randn(128, 576, generator=generator), torch.randn(1536, 576, generator=generator)

    def fastest(dtype: torch.dtype) -> float:
        a, b = x.to(dtype), w.to(dtype)
        F.linear(a, b)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            F.linear(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    bf16, fp32 = fastest(torch.bfloat16), fastest(torch.float32)
    dtype = torch.bfloat16 if bf16 < 0.8 * fp32 else torch.float32
    log.info("prompt GEMMs of quantized layers in %s (128 x 576 x 1536: bf16 %.2f ms, fp32 %.2f ms)",
             str(dtype).removeprefix("torch."), bf16 * 1e3, fp32 * 1e3)
    return dtype


def _quantized(linear: nn.Module, method: str) -> nn.Module:
    if not isinstance(linear, nn.Linear):
        return linear
    if method == "int4" and Int4Linear.supports(linear):
        return Int4Linear(linear)
    return Int8Linear(linear)  # int8, or a shape the int4 kernel cannot take


def _replace(root: nn.Module, path: str, method: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, _quantized(getattr(parent, name), method))


def quantize_weights(model: nn.Module, method: str) -> None:
    """Quantize `model` in place; "none" leaves it as it is."""
    if method == "none":
        return
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r} ({', '.join(METHODS)})")
    if model.device.type not in ("cpu", "cuda"):
        raise ValueError(f"--quantization {method} runs on CPU and CUDA, not on {model.device.type}")
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in decoder_layers(model):
        for path in _LAYER_LINEARS:
            _replace(layer, path, method)
    if isinstance(model.get_output_embeddings(), nn.Linear):
        # A tied LM head gets its own quantized copy; the embedding keeps the original for lookups.
        # int8 even under int4: the head decides the next token among 49k and int4 moves it too
        # much (teacher-forced KL to fp32 of the int4 model: int4 head 0.050, per-channel int8 head
        # 0.0013, Q8_0 head 0.0001: the default model ships its embedding/head as Q8_0, which Q8Linear keeps).
        head = model.get_output_embeddings()
        model.set_output_embeddings(Q8Linear(head) if Q8Linear.available(head) else Int8Linear(head))
    if model.device.type == "cpu":
        dtype = prompt_gemm_dtype()
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.prompt_dtype = dtype
    after = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    log.info("%s weights: %.0f MiB -> %.0f MiB resident in the model", method, before / 2**20, after / 2**20)
