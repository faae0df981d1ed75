"""bench_decode.py --matrix: the runner x compile x batch x threads x monitoring table.

For each thread count, one process per configuration (bench/matrix_worker.py with
OMP_NUM_THREADS): HF `model.generate`, the hf runner, the static runner eager and compiled, and
compiled with int8 and int4 weights (server/engine/quantize.py), and llama.cpp on the same GGUF file
(batch 1, monitoring off; the `bench` extra, left out when it is not installed). They
stay loaded and take turns: every round measures each (batch, monitoring) cell on every
configuration before the next round, so load from other processes hits all of them alike. Medians
over `--runs` rounds after `--warmup`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, host_info, markdown_table, write_json

# name -> (runner, compile, quantization)
CONFIGS = {"generate": ("generate", False, "none"), "hf": ("hf", False, "none"), "static": ("static", False, "none"),
           "static+compile": ("static", True, "none"), "static+compile+int8": ("static", True, "int8"),
           "static+compile+int4": ("static", True, "int4"), "llama.cpp": ("llama.cpp", False, "none")}
CUDA_CONFIGS = ["generate", "hf", "static+compile", "static+compile+int8", "static+compile+int4"]


def _default_configs(args) -> list[str]:
    if args.device == "cuda":
        return CUDA_CONFIGS
    names = list(CONFIGS)
    if args.model != "default" or importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp left out: it needs the default model and llama-cpp-python (pip install -e '.[bench]')",
              file=sys.stderr)
        names.remove("llama.cpp")
    return names


def chosen_configs(args) -> list[tuple[str, bool, str]]:
    """--matrix-configs, else every configuration the device supports; generate always (the baseline)."""
    names = args.matrix_configs or _default_configs(args)
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"--matrix-configs: unknown {sorted(unknown)}; known: {list(CONFIGS)}")
    return [CONFIGS[n] for n in dict.fromkeys(["generate", "hf", *names])]


class Worker:
    def __init__(self, runner: str, compile: bool, quantization: str, threads: int, args):
        self.name = runner + ("+compile" if compile else "") + ("" if quantization == "none" else f"+{quantization}")
        self.runner, self.compile, self.threads = runner, compile, threads
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=str(ROOT))
        cmd = [sys.executable, str(Path(__file__).with_name("matrix_worker.py")), "--runner", runner,
               "--compile", str(int(compile)), "--quantization", quantization, "--model", args.model,
               "--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype,
               "--max-model-len", str(args.max_model_len or 2048), "--max-batch-size", str(max(args.matrix_batches))]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} ({self.threads} threads) exited with {self.proc.wait()}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.ask_quit()

    def ask_quit(self) -> None:
        self.proc.stdin.write(json.dumps({"kind": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(60)


def measure_threads(threads: int, args) -> list[dict]:
    workers = []
    try:
        for runner, compile, quantization in chosen_configs(args):
            start = time.perf_counter()
            workers.append(Worker(runner, compile, quantization, threads, args))
            print(f"[{threads} threads] {workers[-1].name} ready in {time.perf_counter() - start:.0f}s",
                  file=sys.stderr)
        cells = [(b, m) for b in args.matrix_batches for m in (False, True)]
        samples: dict[tuple, list[dict]] = {}
        for round_ in range(args.warmup + args.runs):
            for batch, monitor in cells:
                for w in workers:
                    if w.runner in ("generate", "llama.cpp") and monitor:
                        continue  # no probes there
                    if w.runner == "llama.cpp" and batch > 1:
                        continue  # one stream only (bench/matrix_worker.py)
                    kind = w.runner if w.runner in ("generate", "llama.cpp") else "engine"
                    result = w.ask(kind=kind, batch=batch, monitor=monitor)
                    if round_ >= args.warmup:
                        samples.setdefault((w.name, batch, monitor), []).append(result)
            print(f"[{threads} threads] round {round_ + 1}/{args.warmup + args.runs} done", file=sys.stderr)
        rows = []
        for w in workers:
            for batch, monitor in cells:
                runs = samples.get((w.name, batch, monitor))
                if runs:
                    rows.append({"threads": threads, "config": w.name, "batch": batch, "monitor": monitor,
                                 "startup_s": w.ready["startup_s"],
                                 "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
                                 "tps": statistics.median(r["tps"] for r in runs),
                                 "all_tps": [round(r["tps"], 2) for r in runs],
                                 "rss_mb": max(r["rss_mb"] for r in runs), "tokens": runs[0]["tokens"]})
        return rows
    finally:
        for w in workers:
            w.stop()


def run_matrix(args) -> int:
    rows = []
    for threads in args.matrix_threads:
        rows += measure_threads(threads, args)
    print_matrix(rows, args)
    if args.json_out:
        write_json(args.json_out, {"host": host_info(), "args": vars(args), "rows": rows})
    return 0


def _find(rows, threads, config, batch, monitor=False):
    return next((r for r in rows if (r["threads"], r["config"], r["batch"], r["monitor"]) ==
                 (threads, config, batch, monitor)), None)


def _agreement(ours: list[int], reference: list[int]) -> str:
    """'yes' when identical, else the share of leading tokens that agree (greedy runs diverge for good
    after their first difference)."""
    if ours == reference:
        return "yes"
    same = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    return f"first {same}/{len(reference)}"


def print_matrix(rows: list[dict], args) -> None:
    table = []
    for r in rows:
        gen = _find(rows, r["threads"], "generate", r["batch"])
        hf = _find(rows, r["threads"], "hf", r["batch"], r["monitor"])
        same = "-" if r["config"] == "generate" else _agreement(r["tokens"], gen["tokens"])
        table.append([str(r["threads"]), r["config"], str(r["batch"]), "on" if r["monitor"] else "off",
                      f"{r['tps']:.1f}", f"{r['tps'] / gen['tps']:.2f}", f"{r['tps'] / hf['tps']:.2f}" if hf else "-",
                      f"{r['ttft_ms']:.0f}", f"{r['rss_mb']:.0f}", f"{r['startup_s']:.0f}", same])
    print()
    print(f"{host_info()} | model {args.model} on {args.device}, {args.dtype} | {args.tokens} new tokens, "
          "greedy, ignore_eos | median of "
          f"{args.runs} rounds (+{args.warmup} warm-up), configurations interleaved | in process, no HTTP")
    print()
    print(markdown_table(["threads", "runner", "batch", "FASB monitor", "decode tok/s", "x generate", "x hf",
                          "TTFT ms", "peak RSS MB", "start s", "greedy tokens = generate's"], table))
    print()
    print("decode tok/s: all streams together. x generate / x hf: against model.generate (same batch, threads) / "
          "the hf runner (same batch, threads, monitoring). start s: load (+ compile) time.")
    for threads in args.matrix_threads:
        gen1, llama = _find(rows, threads, "generate", 1), _find(rows, threads, "llama.cpp", 1)
        for quantized in ("static+compile+int8", "static+compile+int4"):
            row = _find(rows, threads, quantized, 1, True)
            if row and gen1:
                versus_llama = f"; / llama.cpp: {row['tps'] / llama['tps']:.2f} (bar >= 0.6)" if llama else ""
                print(f"[{threads} threads] {quantized} single stream, monitoring on / generate fp32: "
                      f"{row['tps'] / gen1['tps']:.2f}{versus_llama}")
        single = _find(rows, threads, "static+compile", 1)
        wide, hf8 = _find(rows, threads, "static+compile", 8), _find(rows, threads, "hf", 8)
        if single and gen1:
            print(f"[{threads} threads] static+compile single stream / generate: {single['tps'] / gen1['tps']:.2f} "
                  "(bar >= 1.25)")
        if wide and hf8:
            print(f"[{threads} threads] static+compile 8 streams / hf runner 8 streams: {wide['tps'] / hf8['tps']:.2f} "
                  "(bar >= 1.5)")
