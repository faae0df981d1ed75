"""Our int4 x int8 and int8 x int8 CPU kernels (server/engine/kernels/q8_mm.cpp) against the same
arithmetic in torch: activations split per group of 32 into two int8 parts (x ~ d * (254 * hi + lo)),
integer products, the group scales applied after; decode attention against SDPA. They run on the
build this CPU takes (AVX-512 VNNI or AVX2); on an AVX-512 CPU the AVX2 build is checked too, in a
subprocess. Skipped where neither runs."""

import pytest
import torch

from server.engine.cpu_kernels import (
    decode_attention,
    int4_q8_layout,
    int4_q8_mm,
    int8_q8_layout,
    int8_q8_mm,
    kernel_isa,
    own_kernels_available,
)

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernels = pytest.mark.skipif(not own_kernels_available(), reason="needs AVX-512 VNNI or AVX2, and a C++ compiler")


def coded_activations(x):
    """x [M, K] per group of 32 as d * a, a = 254 * hi + lo: returns a [M, G, 32] and d [M, G]."""
    m, k = x.shape
    groups = x.float().reshape(m, k // 32, 32)
    d = groups.abs().amax(dim=2, keepdim=True) / 127 / 254  # the low part's step
    v = torch.where(d > 0, groups * (1 / d), 0)
    hi = (v / 254).round()  # round half to even, as the kernel
    lo = (v - hi * 254).round()
    assert hi.abs().max() <= 127 and lo.abs().max() <= 127  # both fit int8
    return (hi * 254 + lo).double(), d.squeeze(2).double()


def reference(x, codes, scale_min):
    """The kernel's sum: w = q * scale + min; x as d * (254 * hi + lo) per group of 32."""
    m, k = x.shape
    groups = x.float().reshape(m, k // 32, 32)
    a, d = coded_activations(x)
    scale, minimum = scale_min.double().unbind(2)  # [K/32, N] each
    q = codes.double().reshape(-1, k // 32, 32)  # [N, G, 32]
    integer = torch.einsum("mgt,ngt->mng", a, q)  # [M, N, G]
    return (integer * d[:, None, :] * scale.T[None]).sum(-1) + groups.double().sum(2) @ minimum


def random_weights(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = (torch.rand(k // 32, n) * 0.02 + 0.001).to(torch.float16)
    minimum = (-8 * scale.float() + torch.randn(k // 32, n) * 0.05).to(torch.float16)
    return codes, torch.stack([scale, minimum], dim=2)


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13])  # rows go in blocks of 8 (AVX2), 4, 2 and 1
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (576, 576)])
def test_kernel_computes_the_int8_activation_product(m, n, k):
    torch.manual_seed(m * n + k)
    codes, scale_min = random_weights(n, k)
    x = torch.randn(m, k)
    x[0, :32] = 0  # a group of zeros: scale 0, no division by it
    got = int4_q8_mm(x, *int4_q8_layout(codes, scale_min))
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(x, codes, scale_min), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (576, 576)])
def test_int8_kernel_computes_the_int8_activation_product(m, n, k):
    """Q8_0 weights (w = q * scale, q in -127..127): the offset the codes are stored with (+128) is
    taken out exactly, extreme codes times extreme activations included."""
    torch.manual_seed(m * n + k)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    codes[0, :], codes[-1, -32:] = 127, -127
    scale = (torch.rand(n, k // 32) * 0.02 + 0.001).to(torch.float16)
    x = torch.randn(m, k)
    x[-1, -32:] = -3.0  # a group at its largest code (254 * 127) everywhere, against codes of 127 and -127
    x[0, :32] = 0
    got = int8_q8_mm(x, *int8_q8_layout(codes, scale))
    assert got.shape == (m, n) and got.dtype == torch.float32
    a, d = coded_activations(x)
    integer = torch.einsum("mgt,ngt->mng", a, codes.double().reshape(n, k // 32, 32))
    expected = (integer * d[:, None, :] * scale.double()[None]).sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_is_as_close_to_the_float_product_as_bf16_activations():
    """Two int8 parts carry ~15 bits of each activation, more than bf16's 8: the product is closer to
    the fp32 one than torch's kernel on bf16 activations (the previous int4 path) gets."""
    torch.manual_seed(0)
    codes, scale_min = random_weights(192, 576)
    x = torch.randn(4, 576)
    scale, minimum = scale_min.float().unbind(2)
    weight = (codes.float().reshape(192, 18, 32) * scale.T[..., None] + minimum.T[..., None]).reshape(192, 576)
    exact = x.double() @ weight.double().T
    ours = int4_q8_mm(x, *int4_q8_layout(codes, scale_min)).double()
    bf16_activations = x.bfloat16().double() @ weight.double().T
    assert (ours - exact).norm() / exact.norm() < 1e-4  # measured 1.6e-5
    assert (bf16_activations - exact).norm() / exact.norm() > 1e-3  # measured 1.7e-3


@needs_kernels
def test_kernel_takes_bf16_activations():
    codes, scale_min = random_weights(32, 64)
    x = torch.randn(2, 64)
    packed = int4_q8_layout(codes, scale_min)
    torch.testing.assert_close(int4_q8_mm(x.bfloat16(), *packed), int4_q8_mm(x.bfloat16().float(), *packed))


@needs_kernels
def test_int4_layer_on_our_kernel_matches_torchs(monkeypatch):
    from torch import nn

    from server.engine import quantize

    torch.manual_seed(0)
    linear = nn.Linear(576, 192, bias=True)
    ours = quantize.Int4Linear(linear)
    monkeypatch.setattr(quantize, "own_kernels_available", lambda: False)
    theirs = quantize.Int4Linear(linear)
    assert ours.own_kernel and not theirs.own_kernel
    x = torch.randn(3, 576)
    torch.testing.assert_close(ours(x), theirs(x), atol=0.05, rtol=0.02)  # theirs: bf16 activations
    torch.testing.assert_close(ours(x), x @ ours.dequantized(torch.float32).T + linear.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("env", [{"FASB_CPU_KERNELS": "torch"}, {"CXX": "/bin/false"}])
def test_without_the_kernel_int4_falls_back_to_torchs(env, tmp_path):
    """Turned off, or no compiler to build it (an empty extension cache): torch's kernel, a warning, no error."""
    import os
    import subprocess
    import sys

    code = ("import torch; from torch import nn; from server.engine.quantize import Int4Linear; "
            "layer = Int4Linear(nn.Linear(64, 32)); print(layer.own_kernel, tuple(layer(torch.randn(2, 64)).shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "(2,", "32)"]
    if "CXX" in env:
        assert "could not build our quantized CPU kernels" in done.stderr


@needs_kernels
@pytest.mark.parametrize(("rows", "kv_heads", "group", "head_dim"), [(1, 3, 3, 64), (5, 3, 3, 64), (4, 2, 4, 128),
                                                                    (3, 4, 1, 16), (2, 1, 8, 32)])
def test_decode_attention_matches_masked_sdpa(rows, kv_heads, group, head_dim):
    """Each row attends over its own keys 0..length-1 of the cache, read in place (lengths 1, below
    and above 16, and the cache's whole length), as SDPA does with a mask; as close to float64 as SDPA."""
    import torch.nn.functional as F

    torch.manual_seed(rows * 100 + head_dim)
    slots, max_len = rows + 2, 77
    k_cache, v_cache = torch.randn(slots, kv_heads, max_len, head_dim), torch.randn(slots, kv_heads, max_len, head_dim)
    q = torch.randn(rows, kv_heads, group, head_dim) * 2
    lengths = torch.tensor([1, 16, 17, max_len, 40][:rows])
    got = decode_attention(q, k_cache, v_cache, lengths, 0.125)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None])[:, None, None, :]
    exact = F.scaled_dot_product_attention(q.double(), k_cache[:rows].double(), v_cache[:rows].double(), attn_mask=mask,
                                           scale=0.125)
    theirs = F.scaled_dot_product_attention(q, k_cache[:rows], v_cache[:rows], attn_mask=mask, scale=0.125)
    assert got.shape == q.shape
    ours_error, sdpa_error = (got.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert ours_error < 1e-6 and ours_error < 4 * sdpa_error + 1e-7


@needs_kernels
def test_decode_attention_refuses_a_length_outside_the_cache():
    k_cache = torch.zeros(2, 1, 8, 16)
    with pytest.raises(RuntimeError, match="length outside the cache"):
        decode_attention(torch.zeros(1, 1, 1, 16), k_cache, k_cache, torch.tensor([9]), 1.0)


def test_each_cpu_takes_the_best_build_it_runs(monkeypatch, caplog):
    from server.engine import cpu_kernels

    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma", "f16c"}
    cases = [(avx512, "", "avx512"), (avx512, "avx2", "avx2"), (avx512, "torch", None), (avx512, "TORCH", None),
             ({"avx2", "fma", "f16c"}, "", "avx2"), ({"avx2", "fma", "f16c"}, "avx512", None),
             ({"avx2", "fma"}, "", None), (set(), "", None), (avx512, "neon", "avx512")]
    for flags, env, expected in cases:
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setenv("FASB_CPU_KERNELS", env)
        assert kernel_isa() == expected, (flags, env)
    assert "FASB_CPU_KERNELS=neon is none of" in caplog.text


@pytest.mark.skipif(kernel_isa() != "avx512", reason="checks the AVX2 build on a CPU that also runs the AVX-512 one")
def test_the_avx2_build_passes_the_same_checks():
    """The op namespace is registered once per process, so the other build runs these tests in a child."""
    import os
    import subprocess
    import sys

    kernel_tests = "not avx2_build and not best_build and not falls_back"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           kernel_tests],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "FASB_CPU_KERNELS": "avx2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-500:]
