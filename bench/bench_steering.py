"""What steering costs in decode speed, in one run, in-process through the Engine (no HTTP noise).

    (a) decode tokens/s with steering `monitor` and `fasb` (threshold 0: checks never fire) vs `off`;
    (b) `fasb` with a forced backtrack (threshold 1.0: the first check fires) vs `off`: total time,
        tokens/s counting only the final answer's tokens, and the tokens thrown away;
    (c) our `fasb` (KV cache, rollback by cropping) vs the paper's reference loop (no cache: the whole
        sequence re-run every step; tests/fasb_reference.py) at 50 and 200 new tokens.

Greedy, `ignore_eos` (every run produces exactly the asked number of tokens), one prompt, the
configurations of (a) and (b) alternated run by run so load from other processes hits all alike.

    .venv/bin/python bench/bench_steering.py                      # default model, 128 tokens, 5 runs
    .venv/bin/python bench/bench_steering.py --runs 2 --tokens 16 --reference-tokens 10 20   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LONG_STORY_PROMPT, host_info, markdown_table, median, ratio, write_json  # noqa: E402

# name -> the request's steering object (None fields: the artifact's defaults). `retract` so that
# text is sent as soon as it is decoded (`hold` would delay the deltas by s tokens).
NEVER_FIRES, ALWAYS_FIRES = 0.0, 1.0  # P(desired) < 0 never holds; < 1 always does
CONFIGS = {
    "off": dict(mode="off"),
    "monitor": dict(mode="monitor", stream_mode="retract"),
    "fasb (no trigger)": dict(mode="fasb", threshold=NEVER_FIRES, max_backtracks=1, stream_mode="retract"),
    "fasb (1 backtrack)": dict(mode="fasb", threshold=ALWAYS_FIRES, max_backtracks=1, stream_mode="retract"),
}


@dataclass
class Timing:
    """One request, timed where its events reach the consumer (perf_counter seconds)."""

    submitted: float
    first_delta: float = 0.0
    last_delta: float = 0.0
    finished: float = 0.0
    completion_tokens: int = 0
    discarded_tokens: int = 0
    backtracks: int = 0
    token_ids: list[int] = field(default_factory=list)  # the final answer

    @property
    def decode_tps(self) -> float:
        """(tokens - 1) / (first text -> last text): the decode loop's speed, prefill excluded."""
        return ratio(self.completion_tokens - 1, self.last_delta - self.first_delta)

    @property
    def total_s(self) -> float:
        return self.finished - self.submitted

    @property
    def final_tps(self) -> float:
        """Final-answer tokens / total time: what a client gets, backtracks and prefill included."""
        return ratio(self.completion_tokens, self.total_s)


# ---------------------------------------------------------------------------------------------
# running requests


async def timed_request(engine, prompt_ids: list[int], steering: dict, tokens: int, backtrack_tokens: int) -> Timing:
    from server.engine.types import Finished, GenerationRequest, Retraction, SamplingParams, SteeringParams, TextDelta

    params = SteeringParams(**steering, backtrack_tokens=None if steering["mode"] == "off" else backtrack_tokens)
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    timing = Timing(submitted=time.perf_counter())
    async for event in engine.submit(GenerationRequest("bench", list(prompt_ids), sampling, params)):
        now = time.perf_counter()
        if isinstance(event, TextDelta):
            timing.first_delta = timing.first_delta or now
            timing.last_delta = now
            timing.token_ids += event.token_ids
        elif isinstance(event, Retraction):
            del timing.token_ids[len(timing.token_ids) - event.sent_tokens:]
        elif isinstance(event, Finished):
            timing.finished = now
            timing.completion_tokens = event.completion_tokens
            timing.discarded_tokens = event.discarded_tokens
            timing.backtracks = len(event.steering.backtracks) if event.steering else 0
    return timing


async def measure_configs(engine, prompt_ids, args) -> dict[str, list[Timing]]:
    """Parts (a) and (b): every configuration once per round, `--warmup` rounds not kept."""
    runs: dict[str, list[Timing]] = {name: [] for name in CONFIGS}
    for round_no in range(args.warmup + args.runs):
        kept = round_no >= args.warmup
        for name, steering in CONFIGS.items():
            timing = await timed_request(engine, prompt_ids, steering, args.tokens, args.backtrack_tokens)
            if kept:
                runs[name].append(timing)
        tag = f"run {round_no - args.warmup + 1}/{args.runs}" if kept else "warm-up"
        print(f"{tag}: " + ", ".join(f"{n} {runs[n][-1].decode_tps:.1f} tok/s" for n in CONFIGS if kept and runs[n]),
              file=sys.stderr)
    return runs


def reference_run(reference_model, artifact, prompt_ids, tokens: int, settings: dict) -> tuple[float, list[int], int]:
    """The paper's loop on its own copy of the model: (seconds, final tokens, backtracks)."""
    from tests.fasb_reference import reference_fasb

    start = time.perf_counter()
    result = reference_fasb(reference_model, artifact, prompt_ids, max_tokens=tokens, eos_ids=frozenset(),
                            **settings)  # no EOS ids: the reference's ignore_eos
    return time.perf_counter() - start, result.tokens, len(result.backtracks)


async def measure_reference(engine, reference_model, artifact, prompt_ids, args) -> dict[int, dict]:
    """Part (c): ours and the reference alternated, forced-backtrack FASB, at each length."""
    steering = CONFIGS["fasb (1 backtrack)"]
    settings = dict(alpha=artifact.alpha, threshold=ALWAYS_FIRES, backtrack_tokens=args.backtrack_tokens,
                    num_heads=artifact.num_heads, adaptive=True, max_backtracks=1)
    out = {}
    for tokens in args.reference_tokens:
        ours, reference = [], []
        for i in range(max(args.runs, args.reference_runs)):
            ours.append(await timed_request(engine, prompt_ids, steering, tokens, args.backtrack_tokens))
            if i < args.reference_runs:
                reference.append(reference_run(reference_model, artifact, prompt_ids, tokens, settings))
            print(f"{tokens} tokens, run {i + 1}: ours {ours[-1].total_s:.2f}s"
                  + (f", reference {reference[-1][0]:.2f}s" if i < args.reference_runs else ""), file=sys.stderr)
        out[tokens] = {"ours": ours, "reference": reference}
    return out


# ---------------------------------------------------------------------------------------------
# tables


def table_a(runs: dict[str, list[Timing]]) -> str:
    base = median(t.decode_tps for t in runs["off"])
    rows = []
    for name in ("off", "monitor", "fasb (no trigger)"):
        tps = median(t.decode_tps for t in runs[name])
        rows.append([name, f"{tps:.2f}", f"{100 * (base - tps) / base:+.1f}%", f"{ratio(tps, base):.3f}"])
    return markdown_table(["steering", "decode tok/s", "overhead vs off", "ratio vs off"], rows)


def table_b(runs: dict[str, list[Timing]]) -> str:
    rows = []
    base_total = median(t.total_s for t in runs["off"])
    for name in ("off", "fasb (1 backtrack)"):
        timings = runs[name]
        total = median(t.total_s for t in timings)
        rows.append([name, f"{total:.2f}", f"{ratio(total, base_total):.3f}",
                     f"{median(t.final_tps for t in timings):.2f}", str(timings[-1].completion_tokens),
                     str(timings[-1].discarded_tokens), str(timings[-1].backtracks)])
    headers = ["steering", "total s", "time vs off", "final tok/s", "final tokens", "discarded", "backtracks"]
    return markdown_table(headers, rows)


def table_c(reference: dict[int, dict]) -> str:
    rows = []
    for tokens, sides in reference.items():
        ours = median(t.total_s for t in sides["ours"])
        ref = median(s for s, _, _ in sides["reference"])
        same = sides["ours"][-1].token_ids == sides["reference"][-1][1]
        rows.append([str(tokens), f"{ours:.2f}", f"{ref:.2f}", f"{ratio(ref, ours):.1f}x",
                     f"{sides['ours'][-1].backtracks}/{sides['reference'][-1][2]}", "yes" if same else "no"])
    headers = ["new tokens", "ours s", "reference s", "speedup", "backtracks ours/ref", "same tokens"]
    return markdown_table(headers, rows)


def acceptance(runs: dict[str, list[Timing]], reference: dict[int, dict]) -> list[str]:
    """The issue's targets, reported (never asserted: timings on a shared machine are noisy)."""
    base = median(t.decode_tps for t in runs["off"])
    lines = []
    for name in ("monitor", "fasb (no trigger)"):
        overhead = 100 * (base - median(t.decode_tps for t in runs[name])) / base
        lines.append(f"{name} overhead {overhead:+.1f}% (target <= 5%): {'OK' if overhead <= 5 else 'MISSED'}")
    for tokens, sides in reference.items():
        speedup = ratio(median(s for s, _, _ in sides["reference"]), median(t.total_s for t in sides["ours"]))
        verdict = ("OK" if speedup >= 10 else "MISSED") if tokens >= 200 else "(target applies at 200)"
        lines.append(f"speedup at {tokens} tokens {speedup:.1f}x (target >= 10x at 200): {verdict}")
    return lines


# ---------------------------------------------------------------------------------------------
# setup


def artifact_folder(args, loaded, scratch: Path) -> tuple[Path, str]:
    """--artifact, else the model's prebuilt one, else a synthetic one (random probes) in `scratch`."""
    from server.steering.artifact import find_default_artifacts

    if args.artifact:
        return Path(args.artifact), "given"
    prebuilt = find_default_artifacts(loaded.model_id)
    if prebuilt:
        return prebuilt[0], "prebuilt"
    from tests.synthetic_artifact import write_synthetic_artifact

    return write_synthetic_artifact(loaded.model, scratch / "synthetic", heads=args.heads), "synthetic (random probes)"


async def start_engine(args, folder: Path, behavior: str):
    from server.config import Settings
    from server.engine.engine import Engine

    settings = Settings(model=args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                        artifacts=[str(folder)], no_default_artifacts=True, default_behavior=behavior,
                        steering_mode="off", max_batch_size=1)
    engine = Engine(settings)
    await engine.start()
    return engine


async def run(args) -> int:
    import torch

    from server.engine.loader import load_model
    from server.steering.artifact import load_artifact

    if args.threads:
        torch.set_num_threads(args.threads)
    # The reference gets its own copy of the model: the engine's copy carries the engine's hooks.
    reference_model = load_model(args.model, args.device, args.dtype, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="fasb-bench-") as scratch:
        folder, source = artifact_folder(args, reference_model, Path(scratch))
        artifact = load_artifact(folder)
        engine = await start_engine(args, folder, artifact.behavior)
        try:
            prompt_ids = engine.encode_chat([{"role": "user", "content": args.prompt}])
            runs = await measure_configs(engine, prompt_ids, args)
            reference = await measure_reference(engine, reference_model.model, artifact, prompt_ids, args)
        finally:
            await engine.stop()
    report(args, runs, reference, dict(model=engine.model_name, artifact=f"{folder} ({source})",
                                       behavior=artifact.behavior, heads=artifact.num_heads, alpha=artifact.alpha,
                                       prompt_tokens=len(prompt_ids), host=host_info()))
    return 0


def report(args, runs, reference, info: dict) -> None:
    print()
    print(f"model {info['model']} | artifact {info['artifact']}, {info['heads']} heads, alpha {info['alpha']} | "
          f"prompt {info['prompt_tokens']} tokens | greedy, ignore_eos | s = {args.backtrack_tokens} | {info['host']}")
    print(f"\n(a) decode tokens/s, {args.tokens} new tokens, median of {args.runs} (+{args.warmup} warm-up)\n")
    print(table_a(runs))
    print(f"\n(b) forced backtrack (threshold 1.0, one backtrack of s tokens) vs off, {args.tokens} final tokens\n")
    print(table_b(runs))
    print(f"\n(c) our FASB vs the reference loop (full recompute every step), forced backtrack, total time; "
          f"ours median of {max(args.runs, args.reference_runs)}, reference median of {args.reference_runs}\n")
    print(table_c(reference))
    print()
    for line in acceptance(runs, reference):
        print(line)
    short = {n: t.completion_tokens for n, ts in runs.items() for t in ts if t.completion_tokens != args.tokens}
    if short:
        print(f"WARNING: runs with a token count other than {args.tokens}: {short}")
    if args.json_out:
        write_json(args.json_out, {
            "info": info, "args": vars(args),
            "runs": {n: [asdict(t) | {"decode_tps": t.decode_tps, "total_s": t.total_s} for t in ts]
                     for n, ts in runs.items()},
            "reference": {str(n): {"ours_total_s": [t.total_s for t in s["ours"]],
                                   "reference_s": [r[0] for r in s["reference"]]} for n, s in reference.items()},
            "acceptance": acceptance(runs, reference),
        })


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default | PATH | ORG/NAME (as fasb-server --model)")
    p.add_argument("--artifact", default=None,
                   help="steering artifact folder (default: the model's prebuilt one, else a synthetic one)")
    p.add_argument("--heads", type=int, default=24, help="heads of the synthetic artifact, when one is made")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--runs", type=int, default=5, help="measured runs per configuration (median)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per run in (a) and (b)")
    p.add_argument("--reference-tokens", type=int, nargs="+", default=[50, 200], help="lengths for (c)")
    p.add_argument("--reference-runs", type=int, default=3, help="runs of the (slow) reference loop per length")
    p.add_argument("--backtrack-tokens", type=int, default=10, help="s, the tokens one backtrack drops")
    p.add_argument("--prompt", default=LONG_STORY_PROMPT)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--json-out", default=None, help="also write all numbers to this JSON file")
    args = p.parse_args(argv)
    if args.runs < 1 or args.tokens <= args.backtrack_tokens or args.reference_runs < 1:
        p.error("need --runs >= 1, --reference-runs >= 1 and --tokens > --backtrack-tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind (stop the engine) on `timeout`
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
