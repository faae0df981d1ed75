"""fasb-server against llama.cpp's own `llama-server`, both over HTTP on the same GGUF weights.

Two workloads, each server in turn, rounds alternating the order so load drift hits both alike:
  1. closed-loop streaming clients (1 / 4 / 8 / 16): each client sends its next greedy chat request as
     soon as the last one ends, 64 new tokens each (`ignore_eos`); aggregate tokens/s and time to
     first token p50 / p90 over every request of the cell;
  2. a growing chat: one client, a long system prompt, 8 turns of 96 tokens, each turn sent with the
     whole history; time to first token per turn (what a prefix cache saves), also on a second
     fasb-server with `--prefix-cache-mb 0` (one slot, chat only), to show what the cache itself saves.

fasb-server runs `--runner static --quantization int4` (the default model's own Q4_1 weights) with
the monitor on; llama-server runs the default model's GGUF file. Both get the same thread count.
Building llama-server: bench/README.md ("llama-server").

    .venv/bin/python bench/bench_serving.py --llama-server /path/to/llama-server
    .venv/bin/python bench/bench_serving.py --llama-server ... --levels 1 4 --seconds 5 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BackgroundServer,
    ServerProcess,
    StreamRecord,
    astream_chat,
    free_port,
    host_info,
    markdown_table,
    median,
    percentile,
    ratio,
    write_json,
)

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a friendly robot.",
    "Give me three tips for sleeping better.",
    "How do bees make honey?",
    "Describe a sunny day in the park.",
    "What should I pack for a beach trip?",
    "How do airplanes stay in the air?",
    "Suggest a relaxing hobby and explain why.",
]
SYSTEM_PROMPT = (
    "You are a patient, friendly assistant for a small public library. You help visitors find books, "
    "explain how to borrow and return them, describe the library's opening hours (Monday to Friday 9 to 18, "
    "Saturday 10 to 16, closed on Sunday), the reading rooms on the first floor, the children's corner with "
    "picture books and weekly story time on Wednesday afternoons, the study desks that can be booked for two "
    "hours at a time, the printers and scanners near the entrance (ten pence a page), the public computers, "
    "the free wireless network, the local history archive in the basement (by appointment only), and the "
    "events calendar with author talks, book clubs and language cafés. Answer in plain words, keep answers "
    "short unless the visitor asks for detail, never invent a rule the library does not have, and when you "
    "do not know something, say so and suggest asking the staff at the front desk."
)
CHAT_TURNS = [
    "Hello! I am new in town. What can I do at the library?",
    "How do I get a library card?",
    "Can I borrow e-books as well?",
    "What about the children's corner, is there anything for a five-year-old?",
    "Can I book a study desk for the whole afternoon?",
    "How much does printing cost?",
    "Tell me more about the local history archive.",
    "Thank you! Which events are on this month?",
]


@dataclass
class Cell:
    server: str
    clients: int
    seconds: float
    tokens: int
    ttft_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def llama_server(binary: str, gguf: str, threads: int, slots: int, slot_context: int) -> BackgroundServer:
    """`llama-server` on a free port with `slots` parallel sequences, each room for the growing chat."""
    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "--parallel", str(slots), "-c", str(slots * slot_context), "-ngl", "0"]
    return BackgroundServer(cmd, port, name="llama-server")


def body(server: str, model: str, messages: list[dict], tokens: int, ignore_eos: bool = True) -> dict:
    out = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0,
           "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    if server == "fasb":
        # the monitor scores every token; `retract` streams each token as it is decoded
        out["steering"] = {"mode": "monitor", "stream_mode": "retract"}
    return out


async def served_model(client: httpx.AsyncClient) -> str:
    return (await client.get("/v1/models")).json()["data"][0]["id"]


async def closed_loop(client: httpx.AsyncClient, server: str, clients: int, seconds: float, tokens: int) -> Cell:
    """`clients` loops, each sending its next request when the last ends, until `seconds` have passed."""
    records: list[StreamRecord] = []
    model = await served_model(client)
    start = time.perf_counter()
    deadline = start + seconds

    async def loop(index: int) -> None:
        k = index
        while time.perf_counter() < deadline:
            prompt = PROMPTS[k % len(PROMPTS)]
            messages = [{"role": "user", "content": prompt}]
            records.append(await astream_chat(client, body(server, model, messages, tokens)))
            k += clients

    await asyncio.gather(*(loop(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    return Cell(server, clients, elapsed, sum(r.completion_tokens for r in records), [r.ttft_s for r in records])


async def growing_chat(client: httpx.AsyncClient, server: str, tokens: int, visit: int) -> list[float]:
    """Time to first token of each turn of one conversation whose history grows turn by turn.

    Each round is a new conversation (`visit` changes its first turn; the system prompt stays shared):
    what a cache kept from the last round's turns must not count."""
    messages, ttfts = [{"role": "system", "content": SYSTEM_PROMPT}], []
    model = await served_model(client)
    for index, turn in enumerate(CHAT_TURNS):
        messages.append({"role": "user", "content": f"(visit {visit}) {turn}" if index == 0 else turn})
        record = await astream_chat(client, body(server, model, messages, tokens))
        ttfts.append(record.ttft_s)
        messages.append({"role": "assistant", "content": record.text})
    return ttfts


async def measure(bases: dict[str, str], chat_only: dict[str, str],
                  args) -> tuple[list[Cell], dict[str, list[list[float]]]]:
    cells: list[Cell] = []
    chats: dict[str, list[list[float]]] = {name: [] for name in {**bases, **chat_only}}
    # A new connection per request for both: llama-server closes idle keep-alive connections, and a
    # request sent on one it just closed fails (a loopback connect costs well under a millisecond).
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    clients = {name: httpx.AsyncClient(base_url=base, timeout=600, limits=no_keepalive)
               for name, base in {**bases, **chat_only}.items()}
    try:
        for name, client in clients.items():  # warm-up: first-request costs out of the numbers
            await closed_loop(client, name, 1 if name in chat_only else 2, 1.0, 8)
            # Every prompt at once: each then sits in a llama-server slot of its own (one client's
            # requests otherwise all go to the one slot most like them and re-read ~14 tokens each),
            # as in our prefix cache, so no server's first round re-reads what the other has kept.
            model = await served_model(client)
            await asyncio.gather(*(astream_chat(client, body(name, model, [{"role": "user", "content": p}], 8))
                                   for p in PROMPTS))
        order = list(bases)
        for round_index in range(args.rounds):
            for name in order if round_index % 2 == 0 else order[::-1]:
                for level in args.levels:
                    cell = await closed_loop(clients[name], name, level, args.seconds, args.tokens)
                    print(f"round {round_index + 1} {name:5s} {level:2d} clients: {cell.tokens_per_s:7.1f} tok/s, "
                          f"TTFT p50 {median(cell.ttft_s) * 1000:6.0f} ms", file=sys.stderr)
                    cells.append(cell)
                chats[name].append(await growing_chat(clients[name], name, args.chat_tokens, round_index + 1))
            for name in chat_only:
                chats[name].append(await growing_chat(clients[name], name, args.chat_tokens, round_index + 1))
    finally:
        for client in clients.values():
            await client.aclose()
    return cells, chats


def serving_table(cells: list[Cell], levels: list[int]) -> str:
    rows = []
    for level in levels:
        f = [c for c in cells if c.server == "fasb" and c.clients == level]
        lm = [c for c in cells if c.server == "llama" and c.clients == level]
        f_tps, l_tps = median(c.tokens_per_s for c in f), median(c.tokens_per_s for c in lm)
        f_ttft = [t for c in f for t in c.ttft_s]
        l_ttft = [t for c in lm for t in c.ttft_s]
        rows.append([level, f"{f_tps:.0f}", f"{l_tps:.0f}", f"{ratio(f_tps, l_tps):.2f}",
                     f"{median(f_ttft) * 1000:.0f} / {percentile(f_ttft, 90) * 1000:.0f} ms",
                     f"{median(l_ttft) * 1000:.0f} / {percentile(l_ttft, 90) * 1000:.0f} ms"])
    return markdown_table(["clients", "fasb tok/s", "llama-server tok/s", "ratio", "fasb TTFT p50 / p90",
                           "llama-server TTFT p50 / p90"], rows)


def chat_table(chats: dict[str, list[list[float]]]) -> str:
    turns = len(CHAT_TURNS)
    per_turn = {name: [median(run[t] for run in runs) for t in range(turns)] for name, runs in chats.items()}
    baseline = per_turn.get(NO_CACHE)
    rows = [[t + 1, f"{per_turn['fasb'][t]:.3f}", f"{per_turn['llama'][t]:.3f}",
             f"{ratio(per_turn['fasb'][t], per_turn['llama'][t]):.2f}"]
            + ([f"{baseline[t]:.3f}", f"{ratio(baseline[t], per_turn['fasb'][t]):.1f}"] if baseline else [])
            for t in range(turns)]
    extra = ["fasb without prefix cache TTFT s", "saved by the cache (x)"] if baseline else []
    return markdown_table(["turn", "fasb TTFT s", "llama-server TTFT s", "fasb / llama"] + extra, rows)


NO_CACHE = "fasb-nocache"


def default_gguf() -> str:
    from server.engine.loader import DEFAULT_GGUF_FILE, embedded_gguf_folder

    return str(embedded_gguf_folder() / DEFAULT_GGUF_FILE)


def run(args) -> int:
    # Rows (fasb) and slots (llama-server) for the most clients, and at least one per prompt: the
    # warm-up sends every prompt at once, and each server keeps each prompt (`measure`).
    slots = max(*args.levels, len(PROMPTS))
    fasb = ServerProcess(["--model", args.model, "--runner", "static", "--quantization", "int4",
                          "--max-batch-size", str(slots), "--max-queue", str(4 * slots),
                          "--prefix-cache-mb", str(args.prefix_cache_mb)],
                         threads=args.threads)
    llama = llama_server(args.llama_server, args.gguf or default_gguf(), args.threads, slots,
                        args.slot_context)
    uncached = None
    if not args.skip_no_cache:
        uncached = ServerProcess(["--model", args.model, "--runner", "static", "--quantization", "int4",
                                  "--max-batch-size", "1", "--prefix-cache-mb", "0"], threads=args.threads)
    servers = [s for s in (fasb, llama, uncached) if s is not None]
    failed = True
    try:
        print("starting the servers (the static runner compiles its step first: minutes) ...", file=sys.stderr)
        for server in servers:
            server.wait_healthy(args.startup_timeout)
        chat_only = {NO_CACHE: uncached.base} if uncached else {}
        cells, chats = asyncio.run(measure({"fasb": fasb.base, "llama": llama.base}, chat_only, args))
        failed = False
    except Exception:
        for server in servers:
            print(f"{server.name} log:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        for server in servers:
            server.stop(keep_log=failed)
    print(f"\nfasb-server --runner static --quantization int4 (monitor on) vs llama-server on "
          f"{args.gguf or 'the default model GGUF'} | {args.threads} threads each | greedy, {args.tokens} tokens "
          f"(ignore_eos), streamed | {args.rounds} rounds of {args.seconds:.0f} s per cell, order alternating; "
          f"tok/s: median over rounds | {host_info()}\n")
    print(serving_table(cells, args.levels))
    print(f"\ngrowing chat: one client, a {len(SYSTEM_PROMPT.split())}-word system prompt, {len(CHAT_TURNS)} turns of "
          f"{args.chat_tokens} tokens; time to first token per turn, median over rounds\n")
    print(chat_table(chats))
    if args.json_out:
        write_json(args.json_out, {"args": vars(args), "host": host_info(), "cells": [asdict(c) for c in cells],
                                   "growing_chat": chats})
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", required=True, help="path to the llama-server binary (bench/README.md)")
    p.add_argument("--gguf", help="GGUF file for llama-server (default: the default model's own)")
    p.add_argument("--model", default="default", help="fasb-server --model (the same weights as --gguf)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16], help="closed-loop client counts")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each cell")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each alternates which server goes first")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--chat-tokens", type=int, default=96, help="new tokens per growing-chat turn")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each server")
    p.add_argument("--slot-context", type=int, default=2048, help="llama-server context per parallel slot")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--prefix-cache-mb", type=int, default=256, help="fasb-server's prefix cache")
    p.add_argument("--skip-no-cache", action="store_true", help="no growing chat on a server without the prefix cache")
    p.add_argument("--json-out", help="also write every cell as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
