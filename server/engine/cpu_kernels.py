"""Our own CPU kernels, built on first use: int4 or int8 weights times int8-coded activations
(`int4_q8_mm`, `int8_q8_mm`), and the decode step's attention (`decode_attention`).

`Int4Linear` and `Q8Linear` (server/engine/quantize.py) run their decode-step matmuls on them when
this CPU has AVX-512 VNNI, or AVX2 with FMA and F16C (one build per instruction set, the best the
CPU runs: `kernel_isa`), and the kernels build; otherwise int4 runs on torch's packed kernel and
the LM head on torch's per-channel int8 one. On an AVX2-only CPU (AMD Zen 3) ours made the whole
int4 step 1.44x / 1.45x / 1.58x faster at a batch of 1 / 8 / 16, the same tokens
(bench/results/2026-12-07.md). Why kernels of our own: torch's (and inductor's) int4
kernels unpack every weight to a float and multiply in floats, and its int8 one multiplies bf16
activations in floats, ~3x slower than integer dot products from 8 rows up (the LM head at a
batch of 8: 6.5 against 3.1 ms, docs/architecture.md "Quantized weights").
This one writes each group of 32 activations as two int8 parts (~15 bits, finer than bf16) and
multiplies 4 codes at a time with integer dot-product instructions, as llama.cpp does with one
part. Inside the compiled step it gains little per step (the weights come from the L3 cache), but
it spares inductor autotuning the int4 layers, so a cold start is much shorter, and it is no
further from fp32: docs/architecture.md "Quantized weights" has the numbers.

The static runner's quantized step attends with `decode_attention` (kernels/decode_attention.cpp):
torch's SDPA is a flash kernel for long query blocks, and a decode row's few queries per kv head
made it a third of the int4 step at a batch of 8.

The sources (kernels/*.cpp) are compiled by torch's extension builder with the system C++
compiler and ninja (~30 s, once per instruction set; cached under TORCH_EXTENSIONS_DIR,
~/.cache/torch_extensions).
They register `torch.ops.fasb_kernels.int4_q8_mm`, `int8_q8_mm` and `decode_attention`; the shape
functions below let torch.compile put each call in its graph as one opaque op.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "kernels" / name for name in ("q8_mm.cpp", "decode_attention.cpp")]
# One build per instruction set, best first: the CPU flags it needs, and the compiler flags that
# target them (the sources pick their code path from the macros these define).
_BUILDS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()  # not Linux, or no flags line: do not guess
    return frozenset(flags.split(":", 1)[1].split())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's int8 tiles, which inductor's int8 GEMM kernels use where present."""
    return {"amx_tile", "amx_int8"} <= _cpu_flags()


def kernel_isa() -> str | None:
    """The instruction set our kernels are built for on this CPU: the best it has, or the one
    FASB_CPU_KERNELS names (`avx2` on an AVX-512 CPU, e.g. to test that build); None where none
    runs, or with FASB_CPU_KERNELS=torch (torch's kernels instead, e.g. to compare them)."""
    choice = os.environ.get("FASB_CPU_KERNELS", "").lower()
    if choice == "torch":
        return None
    if choice and choice not in _BUILDS:
        log.warning("FASB_CPU_KERNELS=%s is none of torch, %s; using the best this CPU runs", choice,
                    ", ".join(_BUILDS))
    candidates = [choice] if choice in _BUILDS else list(_BUILDS)
    return next((isa for isa in candidates if set(_BUILDS[isa][0]) <= _cpu_flags()), None)


@functools.cache
def own_kernels_available() -> bool:
    """Whether `torch.ops.fasb_kernels` can run here (builds it the first time)."""
    isa = kernel_isa()
    if isa is None:
        return False
    try:
        build_kernels(f"fasb_kernels_{isa}", _SOURCES, isa)
    except Exception as exc:  # no compiler, no ninja: torch's kernels still work
        log.warning("could not build our quantized CPU kernels (%s); torch's run instead", exc)
        return False

    @torch.library.register_fake("fasb_kernels::int4_q8_mm")
    def _(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0] * 16, dtype=torch.float32)

    @torch.library.register_fake("fasb_kernels::int8_q8_mm")
    def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0] * 16, dtype=torch.float32)

    @torch.library.register_fake("fasb_kernels::decode_attention")
    def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
          scale: float) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    log.info("quantized layers run on our %s kernels (server/engine/kernels/)", isa.upper())
    return True


def build_kernels(name: str, sources: list[Path], isa: str) -> None:
    """Compile and load `sources` as extension `name` for instruction set `isa` (a key of _BUILDS);
    the ops they register appear under torch.ops. Also how bench/bench_kernels.py builds a second
    copy of the kernels to compare."""
    from torch.utils.cpp_extension import load

    load(name=name, sources=[str(path) for path in sources], extra_cflags=["-O3", "-fopenmp", *_BUILDS[isa][1]],
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


def int4_q8_layout(codes: torch.Tensor, scale_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] uint8 (0..15), scale_min [K/32, N, 2] fp16 (w = q * scale + min) -> the kernel's
    (packed, scale_min) (layouts: kernels/q8_mm.cpp). N must be a multiple of 16, K of 32."""
    n, k = codes.shape
    steps = codes.reshape(n // 16, 16, k // 8, 2, 4)  # [block, row, k-step, low/high half, 4 codes]
    packed = (steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)).permute(0, 2, 1, 3).reshape(n // 16, k // 8, 64)
    blocked = scale_min.reshape(k // 32, n // 16, 16, 2).permute(1, 0, 3, 2)  # [block, group, scale/min, row]
    return packed.contiguous(), blocked.contiguous()


def int4_q8_mm(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) -> x @ W.T [M, N] in fp32."""
    return torch.ops.fasb_kernels.int4_q8_mm(x, packed, scale_min)


def int8_q8_layout(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] int8 (-127..127), scale [N, K/32] fp16 (w = q * scale) -> the kernel's (packed,
    scale) (layouts: kernels/q8_mm.cpp). N must be a multiple of 16, K of 32."""
    n, k = codes.shape
    unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)
    packed = unsigned.reshape(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).reshape(n // 16, k // 4, 64)
    blocked = scale.reshape(n // 16, 16, k // 32).permute(0, 2, 1)  # [block, group, row]
    return packed.contiguous(), blocked.contiguous()


def int8_q8_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) -> x @ W.T [M, N] in fp32."""
    return torch.ops.fasb_kernels.int8_q8_mm(x, packed, scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v per row over its keys 0..length-1, read from the cache in place.

    q [S, KVH, G, D] fp32; k_cache, v_cache [slots >= S, KVH, L, D] fp32, contiguous; lengths [S].
    Returns [S, KVH, G, D]. Takes D a multiple of 16 up to 256 and G up to 8 (`takes_attention`).
    """
    return torch.ops.fasb_kernels.decode_attention(q, k_cache, v_cache, lengths, scale)


def takes_attention(cache: torch.Tensor, query_heads: int) -> bool:
    """Whether `decode_attention` runs for this cache ([slots, KVH, L, D]) and query head count here."""
    _, kv_heads, _, head_dim = cache.shape
    group = query_heads // kv_heads
    return (cache.device.type == "cpu" and cache.dtype == torch.float32 and cache.is_contiguous()
            and head_dim % 16 == 0 and head_dim <= 256 and group <= 8 and own_kernels_available())
