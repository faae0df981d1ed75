"""Single-stream decode speed: fasb-server over HTTP streaming vs. `model.generate`, in one run.

Starts `python -m server` as a subprocess on a free port, loads the same model in this process with
`server.engine.loader.load_model` (same device and dtype), and alternates runs of the two on the
same prompt token ids, greedy, with the same number of new tokens. Prints medians:

    time-to-first-token (ms) and decode tokens/s = (tokens - 1) / (time of last - time of first),

and the ratio server / generate. See bench/README.md for what exactly each side includes.

    .venv/bin/python bench/bench_decode.py                # default model, 128 tokens, 5 runs
    .venv/bin/python bench/bench_decode.py --model PATH --device cuda --runs 7 --json-out r.json
    .venv/bin/python bench/bench_decode.py --runner static   # the server on the static runner

`--matrix` instead prints one table of the engine in process (no HTTP): runner (hf, static) x
compile (off, on) x batch (1, 8) x threads (1, 2) x FASB monitoring (off, on), beside HF
`model.generate` fp32, with decode tok/s, TTFT and peak RSS; each configuration is a process of
its own (bench/matrix_worker.py), and the configurations take turns run by run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LONG_STORY_PROMPT, ServerProcess, TimingStreamer, chat_prompt_ids, stream_chat  # noqa: E402

DEFAULT_PROMPT = LONG_STORY_PROMPT


@dataclass
class Run:
    ttft_s: float  # request sent (or generate called) -> first new token's text available
    decode_s: float  # first token -> last token
    tokens: int  # new tokens produced
    text: str = ""

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class Side:
    name: str
    runs: list[Run] = field(default_factory=list)

    def median_ttft_ms(self) -> float:
        return 1000 * statistics.median(r.ttft_s for r in self.runs)

    def median_tps(self) -> float:
        return statistics.median(r.decode_tps for r in self.runs)


# ---------------------------------------------------------------------------------------------
# server side


def start_server(args: argparse.Namespace) -> ServerProcess:
    """`python -m server` with this bench's flags: one stream at a time, no batching."""
    server_args = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
                   "--steering-mode", args.steering_mode, "--max-batch-size", "1", "--runner", args.runner,
                   "--compile" if args.compile else "--no-compile", "--quantization", args.quantization]
    if args.max_model_len:
        server_args += ["--max-model-len", str(args.max_model_len)]
    if args.cache_dir:
        server_args += ["--cache-dir", args.cache_dir]
    return ServerProcess(server_args, port=args.port, threads=args.threads)


def server_run(client: httpx.Client, model: str, args: argparse.Namespace) -> tuple[Run, int | None]:
    """One streamed greedy completion. Returns the run and the server's prompt token count."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
        # An explicit steering object: mode off, and no `hold` buffering of the newest tokens.
        "steering": {"mode": args.steering_mode},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True  # fasb-server extension (not OpenAI): exactly max_tokens tokens
    record = stream_chat(client, body)
    if not record.content_times:
        raise RuntimeError("the stream carried no content")
    decode_s = record.content_times[-1] - record.content_times[0]
    prompt_tokens = record.usage["prompt_tokens"] if record.usage else None
    return Run(record.ttft_s, decode_s, record.completion_tokens, record.text), prompt_tokens


# ---------------------------------------------------------------------------------------------
# model.generate side


def generate_run(loaded, ids: list[int], tokens: int) -> Run:
    import torch

    input_ids = torch.tensor([ids], device=loaded.device)
    streamer = TimingStreamer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=loaded.tokenizer.eos_token_id,
            streamer=streamer,
        )
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    new = out[0, len(ids):].tolist()
    text = loaded.tokenizer.decode(new, skip_special_tokens=True)
    return Run(streamer.times[0] - start, streamer.times[-1] - streamer.times[0], len(new), text)


# ---------------------------------------------------------------------------------------------


def print_table(server: Side, generate: Side, args: argparse.Namespace, info: dict) -> None:
    rows = [(server.name, server), (generate.name, generate)]
    gen_ttft, gen_tps = generate.median_ttft_ms(), generate.median_tps()
    print()
    print(f"model {info['model']} | device {info['device']} | dtype {info['dtype']} | prompt "
          f"{info['prompt_tokens']} tokens | {args.tokens} new tokens, greedy | median of {args.runs} runs "
          f"(+{args.warmup} warm-up) | torch threads {info['torch_threads']} | {info['host']}")
    print()
    print(f"| {'':<22} | {'TTFT ms':>9} | {'decode tok/s':>12} | {'ratio server/generate':>21} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 14}|{'-' * 23}|")
    for name, side in rows:
        ratio = side.median_tps() / gen_tps
        print(f"| {name:<22} | {side.median_ttft_ms():>9.1f} | {side.median_tps():>12.2f} | {ratio:>21.3f} |")
    print()
    paired = statistics.median(s.decode_tps / g.decode_tps for s, g in zip(server.runs, generate.runs))
    print(f"ratio column: decode tok/s (>= 0.9 is the goal); median of the per-run paired ratios: {paired:.3f}.")
    print(f"TTFT ratio server/generate: {server.median_ttft_ms() / gen_ttft:.2f} "
          "(the server's includes HTTP, templating, tokenisation and SSE).")
    for name, side in rows:
        print(f"  {name}: TTFT ms {[round(1000 * r.ttft_s, 1) for r in side.runs]}, "
              f"tok/s {[round(r.decode_tps, 2) for r in side.runs]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default | PATH | ORG/NAME (as fasb-server --model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--cache-dir", default=None, help="converted-weights cache (as fasb-server --cache-dir)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per side (median; >= 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per side first")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send the server's ignore_eos extension; rely on the prompt (plain OpenAI request)")
    p.add_argument("--steering-mode", default="off", choices=["off", "monitor", "always", "fasb"],
                   help="server steering mode (off: the raw decoder, comparable with generate)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads on both sides (default: torch's)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--json-out", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--runner", default="hf", choices=["hf", "static"], help="the server's --runner")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="the server's --compile")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                   help="the server's --quantization (generate stays fp32)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the server's --max-model-len (sizes the static runner's cache); --matrix default 2048")
    p.add_argument("--matrix", action="store_true", help="the runner x compile x batch x threads table (see above)")
    p.add_argument("--matrix-threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--matrix-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--matrix-configs", nargs="+", default=None,
                   help="subset of generate hf static static+compile static+compile+int8 static+compile+int4 llama.cpp "
                        "(generate and hf are "
                        "always run: the ratios need them); default: all the device supports")
    args = p.parse_args(argv)
    if args.runs < 1 or args.tokens < 2:
        p.error("--runs must be >= 1 and --tokens >= 2")
    if args.matrix:
        from decode_matrix import run_matrix

        return run_matrix(args)

    import torch

    from server.engine.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server subprocess is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc = start_server(args)
    try:
        print(f"starting server on port {proc.port} ...", file=sys.stderr)
        t0 = time.perf_counter()
        proc.wait_healthy(args.startup_timeout)
        print(f"server healthy after {time.perf_counter() - t0:.1f}s; loading the model here ...", file=sys.stderr)
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
        ids = chat_prompt_ids(loaded.tokenizer, args.prompt)
        with httpx.Client(base_url=proc.base, timeout=httpx.Timeout(600, connect=10)) as client:
            model_name = client.get("/v1/models").json()["data"][0]["id"]
            srv, gen = Side("server (HTTP stream)"), Side("HF model.generate")
            # Alternate the two so that load from other processes hits both alike.
            for i in range(args.warmup + args.runs):
                s_run, server_prompt_tokens = server_run(client, model_name, args)
                g_run = generate_run(loaded, ids, args.tokens)
                tag = "warm-up" if i < args.warmup else f"run {i - args.warmup + 1}/{args.runs}"
                print(f"{tag}: server {s_run.tokens} tok, {s_run.decode_tps:.2f} tok/s, TTFT "
                      f"{1000 * s_run.ttft_s:.0f} ms | generate {g_run.tokens} tok, {g_run.decode_tps:.2f} tok/s, "
                      f"TTFT {1000 * g_run.ttft_s:.0f} ms", file=sys.stderr)
                if i >= args.warmup:
                    srv.runs.append(s_run)
                    gen.runs.append(g_run)
    finally:
        proc.stop()

    problems = []
    short = [r.tokens for r in srv.runs if r.tokens != args.tokens]
    if short:
        problems.append(f"server produced {short} tokens instead of {args.tokens} (stopped at EOS?); "
                        "its tok/s is still (tokens - 1) / decode time")
    if server_prompt_tokens is not None and server_prompt_tokens != len(ids):
        problems.append(f"prompt length differs: server {server_prompt_tokens} tokens, here {len(ids)}: "
                        "the server applies the chat template differently")
    same_text = srv.runs[-1].text == gen.runs[-1].text
    if not same_text:
        problems.append("greedy texts differ between server and generate (numerics or template); "
                        f"server: {srv.runs[-1].text[:80]!r}... generate: {gen.runs[-1].text[:80]!r}...")
    info = {
        "model": model_name,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "prompt_tokens": len(ids),
        "torch_threads": torch.get_num_threads(),
        "host": f"{platform.machine()}, {os.cpu_count()} cpus"
        + (f", {torch.cuda.get_device_name(0)}" if loaded.device.type == "cuda" else ""),
        "torch": torch.__version__,
    }
    print_table(srv, gen, args, info)
    print(f"same greedy text: {'yes' if same_text else 'no'}")
    for problem in problems:
        print(f"WARNING: {problem}")
    if args.json_out:
        out = {
            "info": info,
            "args": vars(args),
            "server": {"median_ttft_ms": srv.median_ttft_ms(), "median_decode_tps": srv.median_tps(),
                       "runs": [asdict(r) | {"decode_tps": r.decode_tps} for r in srv.runs]},
            "generate": {"median_ttft_ms": gen.median_ttft_ms(), "median_decode_tps": gen.median_tps(),
                         "runs": [asdict(r) | {"decode_tps": r.decode_tps} for r in gen.runs]},
            "ratio_decode_tps": srv.median_tps() / gen.median_tps(),
            "ratio_decode_tps_paired": statistics.median(
                s.decode_tps / g.decode_tps for s, g in zip(srv.runs, gen.runs)
            ),
            "ratio_ttft": srv.median_ttft_ms() / gen.median_ttft_ms(),
            "same_text": same_text,
            "warnings": problems,
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
