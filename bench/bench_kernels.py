"""Our quantized CPU kernels as the decode step meets them: every layer's matmuls in step order (so
the weights come from memory, not from a cache warmed by the call before) and the LM head, at a few
activation rows, with the bytes of weights each reads per second.

With `--compare-source FILE`, a second build of the kernels from FILE (e.g. the committed
server/engine/kernels/q8_mm.cpp at an earlier commit, or an edited copy) runs beside this tree's,
rounds alternating, and the table adds the per-round ratio: the honest A/B on a host that drifts
±20% between runs. The two builds must compute the same numbers: the outputs are compared.

    .venv/bin/python bench/bench_kernels.py
    git show HEAD~1:server/engine/kernels/q8_mm.cpp > /tmp/old_q8_mm.cpp
    .venv/bin/python bench/bench_kernels.py --compare-source /tmp/old_q8_mm.cpp --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_info, markdown_table  # noqa: E402

from server.engine import cpu_kernels  # noqa: E402
from server.engine.loader import load_model  # noqa: E402
from server.engine.quantize import Int4Linear, Q8Linear, quantize_weights  # noqa: E402
from server.steering.layers import decoder_layers  # noqa: E402

OTHER = "fasb_kernels_compared"  # the op namespace of the --compare-source build


def build_other(source: Path) -> None:
    """Build `source` with this CPU's flags under another op namespace, beside ours."""
    text = source.read_text()
    for macro in ("TORCH_LIBRARY(", "TORCH_LIBRARY_IMPL("):
        text = text.replace(f"{macro}fasb_kernels,", f"{macro}{OTHER},")
    path = Path(tempfile.mkdtemp(prefix="fasb-kernels-")) / "compared.cpp"
    path.write_text(text)
    isa = cpu_kernels.kernel_isa()
    cpu_kernels.build_kernels(f"{OTHER}_{isa}", [path], isa)


def layer_weights(model) -> list[Int4Linear]:
    """Each layer's q|k|v, o, gate|up and down, as the static step calls them."""
    out = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        out += [Int4Linear.concatenated([attn.q_proj, attn.k_proj, attn.v_proj]), Int4Linear(attn.o_proj),
                Int4Linear.concatenated([mlp.gate_proj, mlp.up_proj]), mlp.down_proj]
    return out


def weight_bytes(linears) -> int:
    """Bytes a call reads of its weights: the packed codes and their scales (and minimums)."""
    total = 0
    for m in linears:
        scales = m.kernel_scale_min if isinstance(m, Int4Linear) else m.kernel_scale
        total += m.packed.nbytes + scales.nbytes
    return total


def median_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="activation rows per call")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=30, help="timed calls per round (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-source", type=Path, help="another q8_mm.cpp to run beside this tree's")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernels.own_kernels_available():
        print("our kernels do not run on this CPU (torch's run instead): nothing to measure", file=sys.stderr)
        return 1
    loaded = load_model("default", "cpu", "auto", None, 2048)
    quantize_weights(loaded.model, "int4")
    layers, head = layer_weights(loaded.model), loaded.model.get_output_embeddings()
    if not isinstance(head, Q8Linear):
        print("the LM head is not on our Q8_0 kernel here (an AMX CPU keeps inductor's)", file=sys.stderr)
        return 1
    builds = {"this tree": torch.ops.fasb_kernels}
    if args.compare_source:
        build_other(args.compare_source)
        builds["compared"] = getattr(torch.ops, OTHER)
    layer_mb, head_mb = weight_bytes(layers) / 1e6, weight_bytes([head]) / 1e6
    rows_out = []
    with torch.inference_mode():
        for m in args.rows:
            inputs = {k: torch.randn(m, k) for k in (layers[0].in_features, layers[3].in_features)}

            def run_layers(ops) -> list[torch.Tensor]:
                return [ops.int4_q8_mm(inputs[w.in_features], w.packed, w.kernel_scale_min) for w in layers]

            def run_head(ops) -> torch.Tensor:
                return ops.int8_q8_mm(inputs[head.in_features], head.packed, head.kernel_scale)

            if len(builds) > 1:  # the same numbers, or the timing compares different work
                ours, other = builds.values()
                same = all(torch.equal(a, b) for a, b in zip(run_layers(ours), run_layers(other)))
                if not (same and torch.equal(run_head(ours), run_head(other))):
                    print(f"the two builds' outputs differ at {m} rows", file=sys.stderr)
            times = {name: ([], []) for name in builds}
            for r in range(args.rounds):
                for name in list(builds) if r % 2 == 0 else list(builds)[::-1]:
                    ops = builds[name]
                    times[name][0].append(median_ms(lambda: run_layers(ops), args.calls))
                    times[name][1].append(median_ms(lambda: run_head(ops), args.calls))
            for name, (lt, ht) in times.items():
                row = [m, name, f"{statistics.median(lt):.2f}", f"{layer_mb / statistics.median(lt):.1f}",
                       f"{statistics.median(ht):.2f}", f"{head_mb / statistics.median(ht):.1f}"]
                if len(builds) > 1:
                    base = times["compared"]
                    row += [f"{statistics.median(a / b for a, b in zip(lt, base[0])):.3f}",
                            f"{statistics.median(a / b for a, b in zip(ht, base[1])):.3f}"]
                rows_out.append(row)
    headers = ["rows", "build", f"{len(layers)} layer matmuls ms", "GB/s", "LM head ms", "GB/s"]
    if len(builds) > 1:
        headers += ["layers / compared (median of rounds)", "head / compared"]
    print(f"\n{len(layers)} int4 matmuls ({layer_mb:.0f} MB of codes and scales) and the Q8_0 LM head "
          f"({head_mb:.0f} MB); {args.rounds} rounds of {args.calls} calls, median | {host_info()}\n")
    print(markdown_table(headers, rows_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
