"""Replicas behind nginx: aggregate tokens/s through the proxy with 1, 2 and 3 replicas vs one
replica served directly, and the time to first token that the proxy adds.

Every replica is `python -m server` on loopback with the cores split between them
(--cores // replicas torch threads each, at least 1); nginx runs deploy/nginx/fasb.conf as the
multi-replica test does (tests/deploy/proxy.py; needs Debian's nginx). Closed-loop streaming
clients send greedy requests of --tokens tokens (ignore_eos) for --duration seconds per row.

    .venv/bin/python bench/bench_replicas.py                              # default model, 8 clients
    .venv/bin/python bench/bench_replicas.py --duration 5 --tokens 16 --ttft-pairs 5   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (common puts the repository root on sys.path too)
    LONG_STORY_PROMPT,
    ServerProcess,
    StreamRecord,
    astream_chat,
    free_port,
    host_info,
    markdown_table,
    median,
    percentile,
)

from tests.deploy.proxy import find_nginx, running_nginx  # noqa: E402


@dataclass
class Row:
    setup: str
    replicas: int
    threads: int
    requests: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    load_avg: float


def request_body(model: str, tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": LONG_STORY_PROMPT}], "temperature": 0,
            "max_tokens": tokens, "ignore_eos": True, "stream_options": {"include_usage": True}}


@contextlib.contextmanager
def replica_set(args, count: int) -> Iterator[list[ServerProcess]]:
    threads = args.threads or max(1, args.cores // count)
    server_args = ["--model", args.model, "--max-batch-size", str(args.max_batch_size), "--steering-mode", "off"]
    servers = [ServerProcess(server_args, threads=threads) for _ in range(count)]
    try:
        for server in servers:
            server.wait_healthy(args.startup_timeout)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def closed_loop(url: str, body: dict, clients: int, duration_s: float) -> tuple[list[StreamRecord], float]:
    """`clients` streaming clients, each sending its next request when the last one ends, until
    `duration_s` has passed; returns every record and the wall time until the last one ended."""
    records: list[StreamRecord] = []
    start = time.perf_counter()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while True:  # at least one request each
                records.append(await astream_chat(http, body))
                if time.perf_counter() - start >= duration_s:
                    return

    await asyncio.gather(*(client() for _ in range(clients)))
    return records, time.perf_counter() - start


async def measure_row(setup: str, url: str, model: str, replicas: int, args) -> Row:
    body = request_body(model, args.tokens)
    await closed_loop(url, body, args.clients, 0)  # warm-up: one request per client
    records, wall = await closed_loop(url, body, args.clients, args.duration)
    ttft = [r.ttft_s for r in records]
    return Row(setup, replicas, args.threads or max(1, args.cores // replicas), len(records),
               sum(r.completion_tokens for r in records) / wall, median(ttft), percentile(ttft, 90),
               os.getloadavg()[0])


async def proxy_ttft(direct_url: str, proxy_url: str, model: str, pairs: int) -> tuple[float, float]:
    """Median TTFT of one client on an idle replica, direct and through nginx, alternating."""
    body = request_body(model, 4)
    direct, proxied = [], []
    async with httpx.AsyncClient(base_url=direct_url, timeout=60) as d, \
            httpx.AsyncClient(base_url=proxy_url, timeout=60) as p:
        for _ in range(pairs + 1):  # the first pair warms both paths up
            direct.append((await astream_chat(d, body)).ttft_s)
            proxied.append((await astream_chat(p, body)).ttft_s)
    return median(direct[1:]), median(proxied[1:])


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def run(args) -> int:
    nginx = find_nginx()
    if nginx is None:
        print("no nginx found (apt-get install nginx, or set FASB_NGINX)", file=sys.stderr)
        return 2
    rows: list[Row] = []
    ttft = (float("nan"), float("nan"))
    with tempfile.TemporaryDirectory(prefix="fasb-bench-nginx-") as tmp:
        for count in args.replicas:
            print(f"starting {count} replica(s) ...", file=sys.stderr)
            with replica_set(args, count) as servers:
                ports = [s.port for s in servers]
                with running_nginx(nginx, Path(tmp) / f"nginx-{count}", ports, free_port()) as proxy_url:
                    model = served_model(proxy_url)
                    if count == 1:
                        rows.append(asyncio.run(measure_row("direct", servers[0].base, model, 1, args)))
                        print(rows[-1], file=sys.stderr)
                        ttft = asyncio.run(proxy_ttft(servers[0].base, proxy_url, model, args.ttft_pairs))
                        print(f"TTFT direct / nginx: {ttft}", file=sys.stderr)
                    rows.append(asyncio.run(measure_row("nginx", proxy_url, model, count, args)))
                    print(rows[-1], file=sys.stderr)
    threads = f"{args.threads} threads each" if args.threads else f"{args.cores} cores split between replicas"
    print(f"\nmodel {args.model} | {args.clients} streaming clients, closed loop, {args.duration:.0f} s per row, "
          f"{args.tokens} tokens per request (greedy, ignore_eos) | --max-batch-size {args.max_batch_size} per "
          f"replica, {threads} | {host_info()}\n")
    print(markdown_table(
        ["setup", "replicas x threads", "requests", "tokens/s", "TTFT p50 (s)", "TTFT p90 (s)", "load avg"],
        [[r.setup, f"{r.replicas} x {r.threads}", r.requests, f"{r.tokens_per_s:.1f}", f"{r.ttft_p50_s:.3f}",
          f"{r.ttft_p90_s:.3f}", f"{r.load_avg:.1f}"] for r in rows]))
    direct, proxied = ttft
    print(f"\nproxy-added TTFT (1 client, idle replica, median of {args.ttft_pairs} alternating pairs): "
          f"direct {direct * 1000:.1f} ms, through nginx {proxied * 1000:.1f} ms, "
          f"added {(proxied - direct) * 1000:+.1f} ms")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default | PATH | ORG/NAME (as fasb-server --model)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts behind nginx")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores to split between replicas")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per replica instead of --cores // replicas (1 on a busy machine)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of closed-loop load per row")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--ttft-pairs", type=int, default=20)
    p.add_argument("--startup-timeout", type=float, default=600)
    args = p.parse_args(argv)
    if 1 not in args.replicas:
        p.error("--replicas must include 1 (the direct row and the TTFT pairs use it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind (stop the servers) on `timeout`
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
