"""Greedy multi-turn chats with the prefix cache on and off: are the answers the same?

Three chats of four turns (a long shared system prompt; each answer fed back as history), once in
`monitor` and once in `fasb` mode, on an in-process engine with `--prefix-cache-mb 0` and then 64.
Prints how many answers (and backtracks) are identical, and how many prompt tokens each turn read
from the cache. `--compare-chunk N` instead compares two cache-off engines whose prefills are cut
into 512- and N-token chunks (how much numerics alone move the answers).

    .venv/bin/python bench/check_prefix_cache.py --runner hf                        # fp32: ~3 min
    .venv/bin/python bench/check_prefix_cache.py --runner static --quantization int4
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.types import SteeringParams  # noqa: E402
from tests.engine_helpers import collect  # noqa: E402

SYSTEM = ("You are a helpful assistant for a travel company. Answer clearly and briefly, mention prices in "
          "euros, and always suggest one alternative. ") * 4
QUESTIONS = ["What should I see in Rome?", "How do I get there from Paris?", "And where should I stay?",
             "What food should I try?", "Is it safe at night?", "What about museums?"]


async def chats(engine: Engine, steering: SteeringParams, max_tokens: int) -> list[tuple]:
    out = []
    for start in range(3):
        messages = [{"role": "system", "content": SYSTEM}]
        for question in QUESTIONS[start : start + 4]:
            messages.append({"role": "user", "content": question})
            ids = engine.encode_chat(messages)
            answer = await collect(engine, ids, steering, max_tokens=max_tokens)
            out.append((answer.token_ids, answer.backtracks, answer.finished.cached_tokens, len(ids)))
            messages.append({"role": "assistant", "content": answer.text})
    return out


async def run_engine(settings: Settings, max_tokens: int) -> list[tuple]:
    engine = Engine(settings)
    await engine.start()
    try:
        return (await chats(engine, SteeringParams(mode="monitor"), max_tokens)
                + await chats(engine, SteeringParams(mode="fasb", threshold=0.9), max_tokens))
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runner", default="hf", choices=["hf", "static"])
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--compare-chunk", type=int, help="compare cache-off prefills in 512- and N-token chunks instead")
    args = p.parse_args(argv)
    base = dict(runner=args.runner, quantization=args.quantization, compile=False)
    if args.compare_chunk:
        a = Settings(**base, prefix_cache_mb=0, prefill_chunk_tokens=512)
        b = Settings(**base, prefix_cache_mb=0, prefill_chunk_tokens=args.compare_chunk)
        label = f"cache off, prefill chunks 512 vs {args.compare_chunk}"
    else:
        a, b = Settings(**base, prefix_cache_mb=0), Settings(**base, prefix_cache_mb=64)
        label = "prefix cache off vs on"
    first = asyncio.run(run_engine(a, args.max_tokens))
    second = asyncio.run(run_engine(b, args.max_tokens))
    same = sum(x[:2] == y[:2] for x, y in zip(first, second))
    print(f"\n{args.runner} runner, weights {args.quantization}, {label}: {same} / {len(first)} answers identical "
          f"(tokens and backtracks); backtracks: {sum(len(x[1]) for x in second)}")
    print("cached / prompt tokens per turn:", " ".join(f"{c}/{n}" for *_, c, n in second))
    for x, y in zip(first, second):
        if x[:2] != y[:2]:
            at = next((i for i, (s, t) in enumerate(zip(x[0], y[0])) if s != t), min(len(x[0]), len(y[0])))
            print(f"  an answer differs from token {at} on ({y[2]} prompt tokens cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
