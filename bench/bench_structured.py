"""Decode throughput at batch B with a grammar (response_format json_schema) vs without, in-process.

B requests run concurrently in the engine (no HTTP): one round is free text, one is a JSON schema
whose answers can run long (an object holding an array of strings), one adds penalties and
logit_bias; cases alternate, each round starting with a different one, so load from other
processes hits all alike. Two rates: per round (wall time, prefill included) and per decode step
(answer tokens over the time spent in `Batch.step`, timed by wrapping it). They differ because
building a grammar matcher in `submit` releases the GIL, so the decode worker may start the first
requests before the last are submitted: a JSON round then prefills in two groups (one extra
prefill and step), as staggered arrivals do in a server; the step rate is the grammar's own cost. tokens/s counts the
answer tokens of all B requests over the round's wall time (prefill included, the same for all).
The issue's target: grammar / free >= 0.8.

    .venv/bin/python bench/bench_structured.py                       # default model, batch 8, 3 rounds
    .venv/bin/python bench/bench_structured.py --model /path --device cuda --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import Settings  # noqa: E402
from server.engine.batch import Batch  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.types import Finished, GenerationRequest, ResponseFormat, SamplingParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "facts": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "facts"],
    "additionalProperties": False,
}
PROMPT = "List many facts about lighthouses as JSON with a title and an array of facts."


def variants(tokens: int) -> dict[str, SamplingParams]:
    base = {"max_tokens": tokens, "temperature": 0.0}
    return {
        "free text": SamplingParams(**base),
        "json_schema": SamplingParams(**base, response_format=ResponseFormat("json_schema", json.dumps(SCHEMA))),
        "penalties+bias": SamplingParams(**base, frequency_penalty=0.5, presence_penalty=0.5,
                                         repetition_penalty=1.1, logit_bias=((11, -100.0), (12, 5.0))),
    }


STEP_SECONDS = [0.0]


def _timed_step(step):
    def timed(self) -> None:
        start = time.perf_counter()
        step(self)
        STEP_SECONDS[0] += time.perf_counter() - start

    return timed


async def one_round(engine: Engine, prompt: list[int], sampling: SamplingParams, batch: int) -> tuple[float, int]:
    async def run(stream) -> int:
        async for event in stream:
            if isinstance(event, Finished):
                return event.completion_tokens
        return 0

    STEP_SECONDS[0] = 0.0
    start = time.perf_counter()
    # Every request is submitted (and its grammar compiled) before any is read, so that all of
    # them join the batch in one prefill group whatever the per-request submit cost.
    streams = [engine.submit(GenerationRequest(f"b{i}", prompt, sampling)) for i in range(batch)]
    tokens = sum(await asyncio.gather(*(run(s) for s in streams)))
    return time.perf_counter() - start, STEP_SECONDS[0], tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runner", default="hf", choices=["hf", "static"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    Batch.step = _timed_step(Batch.step)
    engine = Engine(Settings(model=args.model, device=args.device, runner=args.runner, max_batch_size=args.batch,
                             no_default_artifacts=True, steering_mode="off"))
    await engine.start()
    try:
        prompt = engine.encode_chat([{"role": "user", "content": PROMPT}])
        cases = variants(args.tokens)
        await one_round(engine, prompt, cases["free text"], args.batch)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in cases}
        step_rates: dict[str, list[float]] = {name: [] for name in cases}
        counts: dict[str, int] = {}
        names = list(cases)
        for r in range(args.rounds):  # each round starts with a different case: no order bias
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds, step_seconds, tokens = await one_round(engine, prompt, cases[name], args.batch)
                rates[name].append(tokens / seconds)
                step_rates[name].append(tokens / step_seconds)
                counts[name] = tokens
    finally:
        await engine.stop()
    free = statistics.median(rates["free text"])
    free_steps = statistics.median(step_rates["free text"])
    print(f"\nbatch {args.batch}, max_tokens {args.tokens}, runner {args.runner}, device {args.device}, "
          f"median of {args.rounds} rounds\n")
    print("| sampling | tokens / round | round tokens/s | vs free text | decode-step tokens/s | vs free text |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in rates.items():
        rate, step_rate = statistics.median(values), statistics.median(step_rates[name])
        print(f"| {name} | {counts[name]} | {rate:.1f} | {rate / free:.2f}x | {step_rate:.1f} | "
              f"{step_rate / free_steps:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
