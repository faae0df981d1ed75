"""What monitoring several behaviours at once costs in decode speed, in-process through the Engine.

Each configuration monitors the first 0, 1, 2, ... of `--behaviors` in every request (`monitor`
mode: the probes of every listed behaviour score every token; nothing intervenes, so the tokens are
the same in every configuration). Greedy, `ignore_eos`, `--tokens` new tokens per request,
`--concurrency` requests at once; configurations alternate round by round, so load from other
processes hits all alike. Prints tokens/s per configuration (median over rounds) and its ratio to
monitoring one behaviour.

    .venv/bin/python bench/bench_behaviors.py                         # hf runner, batch 1 and 8
    .venv/bin/python bench/bench_behaviors.py --runner static --quantization int4
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LONG_STORY_PROMPT, host_info, markdown_table, median, ratio, write_json  # noqa: E402


def start_engine(args):
    from server.config import Settings
    from server.engine.engine import Engine

    settings = Settings(model=args.model, runner=args.runner, quantization=args.quantization,
                        max_batch_size=max(args.concurrency), steering_mode="off")
    engine = Engine(settings)
    engine.load()
    loaded = {b.name for b in engine.behaviors()}
    missing = [b for b in args.behaviors if b not in loaded]
    if missing:
        raise SystemExit(f"behaviours not loaded: {missing}; loaded: {sorted(loaded)}")
    return engine


async def _one(engine, request) -> list[int]:
    from server.engine.types import Finished, TextDelta

    ids: list[int] = []
    async for event in engine.submit(request):
        if isinstance(event, TextDelta):
            ids += event.token_ids
        elif not isinstance(event, Finished):
            raise RuntimeError(str(event))
    return ids


def timed_round(engine, prompt_ids: list[int], behaviors: tuple[str, ...], tokens: int, concurrency: int):
    """Seconds for `concurrency` requests of `tokens` tokens each, and their tokens."""
    from server.engine.types import GenerationRequest, SamplingParams, SteeringParams

    steering = (SteeringParams(mode="monitor", behavior=behaviors, stream_mode="retract") if behaviors
                else SteeringParams(mode="off"))
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(f"bench-{len(behaviors)}-{i}", prompt_ids, sampling, steering)
                for i in range(concurrency)]

    async def run():
        return await asyncio.gather(*(_one(engine, r) for r in requests))

    start = time.perf_counter()
    outputs = asyncio.run(run())
    return time.perf_counter() - start, outputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--runner", default="hf", choices=("hf", "static"))
    p.add_argument("--quantization", default="none", choices=("none", "int8", "int4"))
    p.add_argument("--behaviors", default="truthfulness,repetition,tone",
                   help="comma-separated; configuration k monitors the first k of them")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    args.behaviors = [b for b in args.behaviors.split(",") if b]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = start_engine(args)
    prompt_ids = engine.encode_chat([{"role": "user", "content": LONG_STORY_PROMPT}])
    configs = [tuple(args.behaviors[:k]) for k in range(len(args.behaviors) + 1)]
    seconds: dict[tuple[int, int], list[float]] = {}
    outputs: dict[tuple[int, int], list] = {}
    for concurrency in args.concurrency:
        for c in configs:  # warm-up round, unmeasured
            timed_round(engine, prompt_ids, c, args.tokens, concurrency)
        for _ in range(args.rounds):
            for k, c in enumerate(configs):
                took, out = timed_round(engine, prompt_ids, c, args.tokens, concurrency)
                seconds.setdefault((concurrency, k), []).append(took)
                outputs[(concurrency, k)] = out
    asyncio.run(engine.stop())
    rows, results = [], []
    for concurrency in args.concurrency:
        one = median(seconds[(concurrency, 1)]) if len(configs) > 1 else None
        for k, c in enumerate(configs):
            s = median(seconds[(concurrency, k)])
            tok_s = concurrency * args.tokens / s
            same = outputs[(concurrency, k)] == outputs[(concurrency, 0)]
            vs_one = ratio(concurrency * args.tokens / s, concurrency * args.tokens / one) if one else None
            rows.append([concurrency, ", ".join(c) or "(off)", len(c), f"{tok_s:.1f}",
                         f"{vs_one:.3f}" if vs_one else "-", "yes" if same else "NO"])
            results.append({"concurrency": concurrency, "behaviors": list(c), "tokens_per_s": tok_s,
                            "vs_one_behavior": vs_one, "same_tokens_as_off": same,
                            "seconds": seconds[(concurrency, k)]})
    print(f"\nmonitoring several behaviours ({args.runner}, quantization {args.quantization}, {args.tokens} "
          f"tokens per request, median of {args.rounds} rounds; {host_info()})\n")
    print(markdown_table(["requests at once", "behaviours monitored", "k", "tokens/s", "vs k=1",
                          "same tokens as off"], rows))
    if args.json_out:
        write_json(args.json_out, {"args": vars(args), "host": host_info(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
