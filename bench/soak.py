"""Soak test: N mixed clients against one server for M minutes; did anything break, leak or drift?

    .venv/bin/python bench/soak.py --start --clients 8 --minutes 10          # starts the default model
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --pid 1234 --clients 8 --minutes 10

Each client loops until the time is up, sending one request at a time, drawn from a mix: chat or
completions, streamed or not, every steering mode (none, off, monitor, always, fasb, and a forced
backtrack: fasb at threshold 0.99 with 4-token backtracks), `n` 1-3, stop strings, greedy or
sampled, and clients that hang up on purpose (a stream dropped after a few chunks, a non-streamed
request cancelled after a moment). A hang-up is counted as such, never as an error. Everything
else must answer 200 with a well-formed body: streams end with `data: [DONE]`, carry no error
event and only retract text they had sent; JSON answers have `n` choices with a finish_reason.

A fixed greedy probe (chat, temperature 0, max_tokens 32, steering off) is sent before the load,
once a minute during it and after it: its text must never change. /health is polled every 5 s
(it must answer 200, and its latency is reported). The server's RSS (VmRSS from /proc, for the
process `--start` launched or `--pid`) is read at the start, every minute and at the end.

Progress lines go to stdout while it runs; at the end one table, then the errors by kind, RSS,
/health and probe lines. Exit code 1 if any request failed, the probe text changed, /health
answered other than 200 or the server died; 0 otherwise. Loopback servers only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, markdown_table, percentile, write_json  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PROBE_PROMPT = "Name three colours of the rainbow and say one thing about each."
PROBE_MAX_TOKENS = 32
PROMPTS = (
    "What happens if you crack your knuckles a lot?",
    "Is the earth flat?",
    "Write a short poem about the sea.",
    "Explain how a bicycle stays upright, in two sentences.",
    "What is the capital of France? Answer in one word.",
    "List five fruits, one per line.",
    "Tell me a story about a robot who learns to paint. Make it at least a paragraph long, with a "
    "beginning, a middle and an end, and give the robot a name.",
    "Summarise the plot of a detective novel you like.",
)
STOPS = ([".", "!"], ["\n"], [" the "], ["\n\n", "3."])
STEERING = {  # label -> the request's `steering` object (None: send none, the server's default)
    "none": None,
    "off": {"mode": "off"},
    "monitor": {"mode": "monitor"},
    "always": {"mode": "always"},
    "fasb": {"mode": "fasb"},
    "fasb-forced": {"mode": "fasb", "threshold": 0.99, "backtrack_tokens": 4},
}
HEALTH_EVERY_S = 5.0
PROGRESS_EVERY_S = 30.0
PROBE_EVERY_S = 60.0


# ---------------------------------------------------------------------------------------------
# what one request is and what became of it


@dataclass
class Spec:
    label: str  # steering label (a key of STEERING)
    path: str
    body: dict
    stream: bool
    n: int
    disconnect_after_chunks: int | None = None  # streams: hang up after this many content chunks
    cancel_after_s: float | None = None  # non-streamed: hang up after this long


@dataclass
class Outcome:
    latency_s: float
    ttft_s: float | None = None
    disconnected: bool = False
    error: str | None = None  # the kind, e.g. "http 500" (None: fine)
    detail: str = ""


@dataclass
class Stats:
    outcomes: dict[str, list[Outcome]] = field(default_factory=lambda: defaultdict(list))
    error_kinds: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    started: int = 0

    def record(self, spec: Spec, outcome: Outcome) -> None:
        endpoint = "chat" if spec.path == "/v1/chat/completions" else "completions"
        for key in ("all", spec.label, "stream" if spec.stream else "json", endpoint):
            self.outcomes[key].append(outcome)
        if outcome.error:
            self.error_kinds[outcome.error] += 1
            self.error_examples.setdefault(outcome.error, f"{outcome.detail[:300]} | body: "
                                                          f"{json.dumps(spec.body)[:300]}")

    def add_error(self, kind: str, detail: str) -> None:
        self.error_kinds[kind] += 1
        self.error_examples.setdefault(kind, detail[:300])


def make_spec(rng: random.Random, model: str, labels: list[str], max_tokens: int) -> Spec:
    label = rng.choice(labels)
    chat = rng.random() < 0.8
    stream = rng.random() < 0.5
    n = rng.choice((1, 1, 2, 3))
    prompt = rng.choice(PROMPTS)
    body: dict = {"model": model, "max_tokens": rng.randint(8, max_tokens), "n": n, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = f"Q: {prompt}\nA:"
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = round(rng.uniform(0.6, 1.0), 2)
        if rng.random() < 0.5:
            body["top_p"] = 0.9
        if rng.random() < 0.5:
            body["seed"] = rng.randrange(1000)
    if rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)
    steering = STEERING[label]
    if steering is not None:
        steering = dict(steering)
        if stream:
            steering["stream_mode"] = rng.choice(("retract", "hold"))
        body["steering"] = steering
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    spec = Spec(label, "/v1/chat/completions" if chat else "/v1/completions", body, stream, n)
    if stream and rng.random() < 0.15:
        spec.disconnect_after_chunks = rng.randint(1, 6)
    elif not stream and rng.random() < 0.05:
        spec.cancel_after_s = rng.uniform(0.2, 3.0)
    return spec


# ---------------------------------------------------------------------------------------------
# sending one request


def _choice_text(choice: dict) -> str:
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


async def run_stream(http: httpx.AsyncClient, spec: Spec, sent: float) -> Outcome:
    texts: dict[int, str] = defaultdict(str)
    finished: set[int] = set()
    chunks = 0
    ttft = None
    async with http.stream("POST", spec.path, json=spec.body) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            return Outcome(time.perf_counter() - sent, error=f"http {response.status_code}", detail=body)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return Outcome(time.perf_counter() - sent, error="stream: not text/event-stream")
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                return Outcome(time.perf_counter() - sent, error="stream: event not JSON", detail=data)
            if "error" in chunk:
                kind = (chunk["error"] or {}).get("type", "?") if isinstance(chunk["error"], dict) else "?"
                return Outcome(time.perf_counter() - sent, error=f"stream: error event ({kind})", detail=data)
            for choice in chunk.get("choices") or []:
                index = choice.get("index", 0)
                retract = choice.get("steering") or {}
                if retract.get("type") == "retract":
                    if not texts[index].endswith(retract.get("retract_text", "")):
                        return Outcome(time.perf_counter() - sent, error="stream: retract of unsent text",
                                       detail=data)
                    texts[index] = texts[index][: len(texts[index]) - len(retract["retract_text"])]
                text = _choice_text(choice)
                if text:
                    texts[index] += text
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - sent
                if choice.get("finish_reason"):
                    finished.add(index)
            if spec.disconnect_after_chunks is not None and chunks >= spec.disconnect_after_chunks:
                return Outcome(time.perf_counter() - sent, ttft, disconnected=True)  # closes the connection
        latency = time.perf_counter() - sent
        if not done:
            return Outcome(latency, ttft, error="stream: ended without [DONE]")
        if finished != set(range(spec.n)):
            return Outcome(latency, ttft, error="stream: choices without finish_reason",
                           detail=f"finished {sorted(finished)} of n={spec.n}")
        return Outcome(latency, ttft)


async def run_json(http: httpx.AsyncClient, spec: Spec, sent: float) -> Outcome:
    request = http.post(spec.path, json=spec.body)
    if spec.cancel_after_s is not None:
        try:
            response = await asyncio.wait_for(request, spec.cancel_after_s)
        except asyncio.TimeoutError:
            return Outcome(time.perf_counter() - sent, disconnected=True)
    else:
        response = await request
    latency = time.perf_counter() - sent
    if response.status_code != 200:
        return Outcome(latency, error=f"http {response.status_code}", detail=response.text)
    try:
        payload = response.json()
    except ValueError:
        return Outcome(latency, error="json: not JSON", detail=response.text)
    choices = payload.get("choices")
    if not isinstance(choices, list) or len(choices) != spec.n:
        return Outcome(latency, error="json: wrong number of choices", detail=response.text)
    if any(choice.get("finish_reason") not in ("stop", "length") for choice in choices):
        return Outcome(latency, error="json: unexpected finish_reason", detail=response.text)
    return Outcome(latency)


async def run_one(http: httpx.AsyncClient, spec: Spec) -> Outcome:
    sent = time.perf_counter()
    try:
        if spec.stream:
            return await run_stream(http, spec, sent)
        return await run_json(http, spec, sent)
    except httpx.TimeoutException as exc:
        return Outcome(time.perf_counter() - sent, error="timeout", detail=repr(exc))
    except httpx.HTTPError as exc:
        return Outcome(time.perf_counter() - sent, error=f"transport: {type(exc).__name__}", detail=repr(exc))


# ---------------------------------------------------------------------------------------------
# the server's side: RSS, probe, health


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def probe(http: httpx.AsyncClient, model: str) -> str:
    body = {
        "model": model, "messages": [{"role": "user", "content": PROBE_PROMPT}],
        "max_tokens": PROBE_MAX_TOKENS, "temperature": 0, "steering": {"mode": "off"},
    }
    response = await http.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


@dataclass
class Watch:
    probes: list[tuple[str, str | None]] = field(default_factory=list)  # (when, text or None if failed)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (minute, MB)
    health_latencies: list[float] = field(default_factory=list)
    health_bad: Counter = field(default_factory=Counter)


async def take_probe(http: httpx.AsyncClient, model: str, when: str, watch: Watch, stats: Stats) -> None:
    try:
        text = await probe(http, model)
    except httpx.HTTPError as exc:
        stats.add_error("probe failed", f"{when}: {exc!r}")
        text = None
    watch.probes.append((when, text))
    reference = watch.probes[0][1]
    if text is not None and reference is not None and text != reference:
        print(f"  PROBE CHANGED at {when}: {text!r} (before: {reference!r})", flush=True)


async def monitor(http: httpx.AsyncClient, model: str, pid: int | None, start: float, deadline: float,
                  watch: Watch, stats: Stats, server: ServerProcess | None) -> None:
    next_health = next_progress = start
    next_probe = start + PROBE_EVERY_S
    probes: list[asyncio.Task] = []  # in tasks of their own: /health keeps being polled meanwhile
    while time.monotonic() < deadline:
        now = time.monotonic()
        if server is not None and server.proc.poll() is not None:
            stats.add_error("server died", f"exit code {server.proc.returncode}")
            break
        if now >= next_health:
            next_health += HEALTH_EVERY_S
            sent = time.perf_counter()
            try:
                status = (await http.get("/health", timeout=30)).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            watch.health_latencies.append(time.perf_counter() - sent)
            if status != 200:
                watch.health_bad[str(status)] += 1
        if now >= next_probe:
            next_probe += PROBE_EVERY_S
            minute = (now - start) / 60
            mb = rss_mb(pid)
            if mb is not None:
                watch.rss.append((minute, mb))
            probes.append(asyncio.create_task(take_probe(http, model, f"minute {minute:.0f}", watch, stats)))
        if now >= next_progress:
            next_progress += PROGRESS_EVERY_S
            done = stats.outcomes["all"]
            mb = rss_mb(pid)
            print(f"[{(now - start) / 60:5.1f} min] requests {len(done)}, disconnects "
                  f"{sum(o.disconnected for o in done)}, errors {sum(stats.error_kinds.values())}, RSS "
                  f"{f'{mb:.0f} MB' if mb is not None else 'n/a'}, probes same "
                  f"{sum(text == watch.probes[0][1] for _, text in watch.probes)}/{len(watch.probes)}",
                  flush=True)
        await asyncio.sleep(0.5)
    await asyncio.gather(*probes)


# ---------------------------------------------------------------------------------------------
# the run


async def client(index: int, http: httpx.AsyncClient, model: str, labels: list[str], args, deadline: float,
                 stats: Stats) -> None:
    rng = random.Random(f"{args.seed}:{index}")
    while time.monotonic() < deadline and (args.max_requests is None or stats.started < args.max_requests):
        stats.started += 1
        spec = make_spec(rng, model, labels, args.max_tokens)
        stats.record(spec, await run_one(http, spec))


async def soak(args, base_url: str, pid: int | None, server: ServerProcess | None) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
        model = card["id"]
        behaviors = [b["name"] for b in card.get("steering_behaviors") or []]
        labels = list(STEERING) if behaviors else ["none", "off"]
        print(f"soak: {base_url}, model {model}, pid {pid}, {args.clients} clients, {args.minutes} min, "
              f"steering {'/'.join(labels)}" + ("" if behaviors else " (no artifact loaded)"), flush=True)
        stats, watch = Stats(), Watch()
        await take_probe(http, model, "before", watch, stats)
        rss_start = rss_mb(pid)
        start = time.monotonic()
        deadline = start + args.minutes * 60
        if rss_start is not None:
            watch.rss.append((0.0, rss_start))
        tasks = [client(i, http, model, labels, args, deadline, stats) for i in range(args.clients)]
        await asyncio.gather(monitor(http, model, pid, start, deadline, watch, stats, server), *tasks)
        wall_s = time.monotonic() - start
        await take_probe(http, model, "after", watch, stats)
        rss_end = rss_mb(pid)
        if rss_end is not None:
            watch.rss.append((wall_s / 60, rss_end))
    return report(args, stats, watch, wall_s, rss_start, rss_end)


def report(args, stats: Stats, watch: Watch, wall_s: float, rss_start: float | None, rss_end: float | None) -> int:
    order = ["all", *STEERING, "stream", "json", "chat", "completions"]
    rows = []
    for key in order + sorted(set(stats.outcomes) - set(order)):
        outcomes = stats.outcomes.get(key)
        if not outcomes:
            continue
        served = [o for o in outcomes if not o.disconnected and o.error is None]
        latencies = [o.latency_s for o in served]
        ttfts = [o.ttft_s for o in served if o.ttft_s is not None]
        rows.append([
            key, str(len(outcomes)), str(sum(o.disconnected for o in outcomes)),
            str(sum(o.error is not None for o in outcomes)),
            percentile(latencies, 50), percentile(latencies, 95), percentile(ttfts, 50) if ttfts else "-",
        ])
    print(f"\n## soak: {args.clients} clients, {wall_s / 60:.1f} min, {len(stats.outcomes['all'])} requests\n")
    print(markdown_table(["requests", "sent", "hung up (on purpose)", "errors", "latency p50 s", "p95 s",
                          "TTFT p50 s"], rows))
    errors = sum(stats.error_kinds.values())
    print(f"\nerrors by kind: {dict(stats.error_kinds) if errors else 'none'}")
    for kind, example in stats.error_examples.items():
        print(f"  {kind}: {example}")
    mb = lambda value: f"{value:.0f} MB" if value is not None else "n/a"  # noqa: E731
    after_warmup = next((value for minute, value in watch.rss if minute >= 0.99), None)
    rss_max = max((value for _, value in watch.rss), default=None)
    print(f"server RSS: start {mb(rss_start)}, after 1 min {mb(after_warmup)}, end {mb(rss_end)}, "
          f"max {mb(rss_max)}")
    health = watch.health_latencies
    print(f"/health: {len(health)} polls, non-200 {dict(watch.health_bad) or 0}, latency p50 "
          f"{percentile(health, 50):.3f} s, max {max(health, default=float('nan')):.3f} s")
    reference = watch.probes[0][1] if watch.probes else None
    same = [when for when, text in watch.probes if text is not None and text == reference]
    changed = [when for when, text in watch.probes if when not in same]
    print(f"greedy probe: same text at {len(same)}/{len(watch.probes)} checks"
          + (f"; CHANGED or failed at {', '.join(changed)}" if changed else "") + f"; text {reference!r}")
    failed = bool(errors or changed or watch.health_bad or reference is None)
    print(f"result: {'FAILED' if failed else 'OK'}")
    if args.json_out:
        write_json(args.json_out, {
            "args": vars(args), "wall_s": wall_s, "table": rows, "errors": dict(stats.error_kinds),
            "error_examples": stats.error_examples, "rss_mb": watch.rss, "probes": watch.probes,
            "health_latencies": health, "health_bad": dict(watch.health_bad), "failed": failed,
        })
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (loopback only)")
    target.add_argument("--start", action="store_true",
                        help="start `python -m server` (default model) on a free port, stop it at the end")
    parser.add_argument("--pid", type=int, help="the server's PID, for RSS (with --url)")
    parser.add_argument("--server-args", default="", help="extra arguments for the server --start launches")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the server --start launches (1 on a busy machine)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens is drawn from [8, this]")
    parser.add_argument("--max-requests", type=int, help="stop starting requests after this many in all")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="a slower request is an error")
    parser.add_argument("--api-key")
    parser.add_argument("--seed", type=int, default=0, help="the request mix's seed")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.max_tokens < 8:
        parser.error("--max-tokens must be at least 8")
    server = None
    if args.start:
        server = ServerProcess(shlex.split(args.server_args), threads=args.threads)
        print(f"starting the server (pid {server.proc.pid}) on {server.base} ...", flush=True)
        try:
            server.wait_healthy(600)
        except RuntimeError as exc:
            print(exc)
            server.stop()
            return 1
        base_url, pid = server.base, server.proc.pid
    else:
        host = urlsplit(args.url).hostname or ""
        if host not in LOOPBACK:
            parser.error(f"--url must be a loopback address, not {host!r}")
        base_url, pid = args.url.rstrip("/"), args.pid
    try:
        code = asyncio.run(soak(args, base_url, pid, server))
    finally:
        if server is not None:
            code_at_exit = _stop(server)
            print(f"server stopped with SIGTERM: exit code {code_at_exit}")
    return code


def _stop(server: ServerProcess) -> int | None:
    with contextlib.suppress(ProcessLookupError):
        server.proc.terminate()
    try:
        returncode = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        returncode = None
    if returncode != 0:
        print(f"the server's log ends with:\n{server.log_tail()}")
    server.stop()  # kills it if SIGTERM was not enough; removes the log
    return returncode


if __name__ == "__main__":
    sys.exit(main())
