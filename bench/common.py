"""Helpers shared by the bench scripts: start the server, read its SSE streams, time generate(),
summarise samples and print markdown tables.

Nothing here keeps state between calls; every helper takes what it needs as arguments.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A prompt that makes an instruct model write at length, so many greedy tokens are reachable even
# without `ignore_eos` (the scripts check the token counts either way).
LONG_STORY_PROMPT = (
    "Write a long, detailed story of at least 600 words about a lighthouse keeper who finds a "
    "message in a bottle. Describe the island, the weather, the keeper's daily routine and the "
    "journey that the message leads to."
)


# ---------------------------------------------------------------------------------------------
# the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """A server subprocess (`cmd`, listening on `port`) that answers GET /health; its output goes to a
    log shown if it fails."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None, name: str = "server"):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "".join(Path(self.log.name).read_text(errors="replace").splitlines(True)[-lines:])

    def stop(self, keep_log: bool = False) -> None:
        """Stop the process; its log is deleted unless `keep_log` (then its path is printed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if keep_log:
            print(f"{self.name} log kept: {self.log.name}", file=sys.stderr)
        else:
            os.unlink(self.log.name)


class ServerProcess(BackgroundServer):
    """`python -m server <server_args>` on a free port."""

    def __init__(self, server_args: list[str], port: int = 0, threads: int = 0):
        port = port or free_port()
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *server_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
        super().__init__(cmd, port, env, name="fasb-bench-server")


# ---------------------------------------------------------------------------------------------
# SSE streams


@dataclass
class StreamRecord:
    """What one streamed completion looked like from the client, with perf_counter timestamps."""

    sent: float  # request sent
    content_times: list[float] = field(default_factory=list)  # each chunk with non-empty content
    text: str = ""
    usage: dict | None = None
    finished: float = 0.0  # [DONE] (or the end of the body)

    @property
    def ttft_s(self) -> float:
        return self.content_times[0] - self.sent if self.content_times else float("nan")

    @property
    def inter_token_s(self) -> list[float]:
        t = self.content_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def completion_tokens(self) -> int:
        # usage counts tokens; content chunks can be fewer (one may wait for the rest of a
        # multi-byte character), so chunks are only the fallback when there is no usage.
        return self.usage["completion_tokens"] if self.usage else len(self.content_times)


def sse_payload(line: str) -> dict | None:
    """The JSON of one `data:` line; None for other lines and for `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        raise RuntimeError(f"error in stream: {chunk['error']}")
    return chunk


def record_chunk(record: StreamRecord, chunk: dict, now: float) -> None:
    """Apply one chunk to `record`: content is appended, retractions delete their suffix."""
    if chunk.get("usage"):
        record.usage = chunk["usage"]
    for choice in chunk.get("choices", []):
        retract = choice.get("steering") or {}
        if retract.get("type") == "retract":
            record.text = record.text[: len(record.text) - len(retract["retract_text"])]
        content = (choice.get("delta") or {}).get("content")
        if content:
            record.content_times.append(now)
            record.text += content


def stream_chat(client: httpx.Client, body: dict) -> StreamRecord:
    """POST a streaming chat completion and record it (synchronous client)."""
    record = StreamRecord(sent=time.perf_counter())
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {r.read().decode(errors='replace')}")
        for line in r.iter_lines():
            chunk = sse_payload(line)
            if chunk is not None:
                record_chunk(record, chunk, time.perf_counter())
    record.finished = time.perf_counter()
    return record


async def astream_chat(client: httpx.AsyncClient, body: dict) -> StreamRecord:
    """POST a streaming chat completion and record it (asyncio client)."""
    record = StreamRecord(sent=time.perf_counter())
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode(errors='replace')}")
        async for line in r.aiter_lines():
            chunk = sse_payload(line)
            if chunk is not None:
                record_chunk(record, chunk, time.perf_counter())
    record.finished = time.perf_counter()
    return record


# ---------------------------------------------------------------------------------------------
# model.generate side


class TimingStreamer:
    """A generate() streamer that only timestamps: put() gets the prompt once, then each step's
    tokens (one per row of the batch)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The server's chat path: the tokenizer's chat template with the assistant turn opened."""
    from server.engine.hf_compat import chat_token_ids

    return chat_token_ids(tokenizer, [{"role": "user", "content": prompt}])


# ---------------------------------------------------------------------------------------------
# statistics and tables


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    values = sorted(values)
    if not values:
        return float("nan")
    pos = (len(values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats get 2 decimals unless already formatted as strings."""
    cells = [[c if isinstance(c, str) else f"{c:.2f}" if isinstance(c, float) else str(c) for c in row]
             for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                             for i, (v, w) in enumerate(zip(values, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def host_info() -> str:
    import platform

    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_name()} ({platform.machine()}, {os.cpu_count()} cpus){gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load avg {load:.1f}")


def cpu_name() -> str:
    """The CPU's model name and its matrix extensions (numbers differ between CPU models)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = [f for f in ("avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    if not extensions:
        extensions = ["AVX2 only" if "avx2" in flags else "no AVX2"]
    family = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "?")
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model\t")), "?")
    return f"{name} family {family} model {model} [{', '.join(extensions)}]"


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
