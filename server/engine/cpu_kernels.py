"""Our own CPU kernel, built on first use: int4 weights times int8-coded activations (`int4_q8_mm`).

`Int4Linear` (server/engine/quantize.py) runs its decode-step matmul on it when this CPU has
AVX-512 VNNI and the kernel builds; otherwise on torch's packed int4 kernel. Why a kernel of our
own: torch's (and inductor's) int4 kernels unpack every weight to a float and multiply in floats.
This one writes each group of 32 activations as two int8 parts (~15 bits, finer than bf16) and
multiplies 4 codes at a time with integer dot-product instructions, as llama.cpp does with one
part. Inside the compiled step it gains little per step (the weights come from the L3 cache), but
it spares inductor autotuning the int4 layers, so a cold start is much shorter, and it is no
further from fp32: docs/architecture.md "Quantized weights" has the numbers.

The source (kernels/int4_q8_mm.cpp) is compiled by torch's extension builder with the system C++
compiler and ninja (~30 s, once; cached under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions).
It registers `torch.ops.fasb_kernels.int4_q8_mm`; the shape function below lets torch.compile put
the call in its graph as one opaque op.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "kernels" / "int4_q8_mm.cpp"
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")  # as _COMPILE_FLAGS targets
_COMPILE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]


def _cpu_has_vnni() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False  # not Linux, or no flags line: do not guess
    return set(_CPU_FLAGS) <= set(flags.split(":", 1)[1].split())


@functools.cache
def int4_q8_available() -> bool:
    """Whether `torch.ops.fasb_kernels.int4_q8_mm` can run here (builds it the first time).

    FASB_INT4_KERNEL=torch turns it off (torch's packed kernel instead), e.g. to compare the two.
    """
    if os.environ.get("FASB_INT4_KERNEL", "").lower() == "torch" or not _cpu_has_vnni():
        return False
    try:
        from torch.utils.cpp_extension import load

        load(name="fasb_kernels", sources=[str(_SOURCE)], extra_cflags=_COMPILE_FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja: the torch kernel still works
        log.warning("could not build the int4 x int8 CPU kernel (%s); int4 uses torch's kernel", exc)
        return False

    @torch.library.register_fake("fasb_kernels::int4_q8_mm")
    def _(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0] * 16, dtype=torch.float32)

    log.info("int4 layers run on our int4 x int8 VNNI kernel (server/engine/kernels/int4_q8_mm.cpp)")
    return True


def int4_q8_layout(codes: torch.Tensor, scale_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] uint8 (0..15), scale_min [K/32, N, 2] fp16 (w = q * scale + min) -> the kernel's
    (packed, scale_min) (layouts: kernels/int4_q8_mm.cpp). N must be a multiple of 16, K of 32."""
    n, k = codes.shape
    steps = codes.reshape(n // 16, 16, k // 8, 2, 4)  # [block, row, k-step, low/high half, 4 codes]
    packed = (steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)).permute(0, 2, 1, 3).reshape(n // 16, k // 8, 64)
    blocked = scale_min.reshape(k // 32, n // 16, 16, 2).permute(1, 0, 3, 2)  # [block, group, scale/min, row]
    return packed.contiguous(), blocked.contiguous()


def int4_q8_mm(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) -> x @ W.T [M, N] in fp32."""
    return torch.ops.fasb_kernels.int4_q8_mm(x, packed, scale_min)
