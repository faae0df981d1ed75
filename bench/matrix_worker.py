"""One decode configuration in its own process, driven line by line by bench_decode.py --matrix.

Started as `python bench/matrix_worker.py --runner hf|static|generate --compile 0|1 ...` with
OMP_NUM_THREADS set. It loads an in-process `Engine` (the decode loop and its worker thread, no
HTTP) — or, for `generate`, only the model, run by HF `model.generate` on the main thread (the
only thread with torch work in that process, as the engine's worker is in the others) —, prints
one JSON line `{"ready": ..., "startup_s": ...}`, then answers each JSON command read from stdin
with one JSON line:

    {"kind": "engine", "batch": 8, "monitor": true}  -> {"ttft_ms", "tps", "tokens", "rss_mb"}
    {"kind": "generate", "batch": 1}                   -> the same, for HF model.generate
    {"kind": "llama.cpp", "batch": 1}                  -> the same, for llama.cpp on the GGUF file

`--runner llama.cpp` runs llama-cpp-python (the `bench` extra) on the default model's own GGUF file
(the one the server converts its weights from), greedy, with `OMP_NUM_THREADS` threads; one
stream only (its Python API decodes one sequence).

`batch` requests with the same prompt are submitted together, greedy, `ignore_eos`, `--tokens`
new tokens each. TTFT: submit -> a request's first text (median over the batch). tok/s: all
streams' tokens after their first / (last token - first token), i.e. the aggregate decode rate.
`monitor`: steering mode `monitor` (probes score every token) instead of `off`. rss_mb: the
process's peak resident memory so far (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LONG_STORY_PROMPT, TimingStreamer, chat_prompt_ids  # noqa: E402


def reply(out, message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def engine_round(engine, ids: list[int], batch: int, monitor: bool, tokens: int) -> dict:
    from server.engine.types import GenerationRequest, SamplingParams, SteeringParams, TextDelta

    async def consume(stream):
        first = last = None
        got: list[int] = []
        async for event in stream:
            if isinstance(event, TextDelta) and event.token_ids:
                last = time.perf_counter()
                first = first or last
                got += event.token_ids
        return first, last, got

    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    steering = SteeringParams(mode="monitor" if monitor else "off")
    start = time.perf_counter()
    streams = [engine.submit(GenerationRequest(f"r{i}", ids, sampling, steering)) for i in range(batch)]
    results = await asyncio.gather(*(consume(s) for s in streams))
    firsts, lasts = [r[0] for r in results], [r[1] for r in results]
    decoded = sum(len(r[2]) - 1 for r in results)
    return {"ttft_ms": 1000 * statistics.median(f - start for f in firsts),
            "tps": decoded / (max(lasts) - min(firsts)), "tokens": results[0][2]}


def generate_round(loaded, ids: list[int], batch: int, tokens: int) -> dict:
    import torch

    input_ids = torch.tensor([ids] * batch, device=loaded.device)
    streamer = TimingStreamer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                                    pad_token_id=loaded.tokenizer.eos_token_id, streamer=streamer)
    times = streamer.times
    return {"ttft_ms": 1000 * (times[0] - start), "tps": batch * (len(times) - 1) / (times[-1] - times[0]),
            "tokens": out[0, len(ids):].tolist()}


def llama_cpp_round(llm, ids: list[int], tokens: int) -> dict:
    times, got = [], []
    llm.reset()  # else generate() reuses the previous round's prompt from its cache (TTFT of ~0)
    start = time.perf_counter()
    # generate() yields greedy tokens (top_k=1) without stopping at EOS: the caller stops it
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        got.append(token)
        if len(got) == tokens:
            break
    return {"ttft_ms": 1000 * (times[0] - start), "tps": (len(times) - 1) / (times[-1] - times[0]), "tokens": got}


def load_llama_cpp(model: str):
    """llama.cpp on the default model's shipped GGUF file."""
    from llama_cpp import Llama

    from server.engine.loader import DEFAULT_GGUF_FILE, embedded_gguf_folder

    if model != "default":
        raise SystemExit("--runner llama.cpp measures the default model's GGUF file only")
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    # n_batch=1: the prompt goes in one token at a time, so llama.cpp's TTFT here is not its best. Its
    # batched path SIGILLs on this project's CPU, which reports AMX that the VM does not let it use;
    # single-token steps (all of decoding, which is what the matrix compares) never take that path.
    return Llama(model_path=str(embedded_gguf_folder() / DEFAULT_GGUF_FILE), n_ctx=2048, n_threads=threads,
                 n_threads_batch=threads, n_batch=1, n_ubatch=1, verbose=False)


def default_tokenizer():
    from transformers import AutoTokenizer

    from server.engine.loader import converted_default_model

    return AutoTokenizer.from_pretrained(converted_default_model())


def main() -> None:
    # stdout carries the protocol only: anything else printed (libraries, compilers) goes to stderr.
    protocol, sys.stdout = sys.stdout, sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("--runner", required=True)
    p.add_argument("--compile", type=int, default=0)
    p.add_argument("--model", default="default")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--quantization", default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()

    from server.config import Settings
    from server.engine.engine import Engine
    from server.engine.loader import load_model

    start = time.perf_counter()
    if args.runner == "llama.cpp":
        llm = load_llama_cpp(args.model)
        ids = chat_prompt_ids(default_tokenizer(), LONG_STORY_PROMPT)  # the same ids as the other configurations
        reply(protocol, {"ready": True, "startup_s": time.perf_counter() - start, "rss_mb": peak_rss_mb()})
        for line in sys.stdin:
            command = json.loads(line)
            if command["kind"] == "quit":
                break
            reply(protocol, llama_cpp_round(llm, ids, args.tokens) | {"rss_mb": peak_rss_mb()})
        return
    if args.runner == "generate":
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
        ids = chat_prompt_ids(loaded.tokenizer, LONG_STORY_PROMPT)
        reply(protocol, {"ready": True, "startup_s": time.perf_counter() - start, "rss_mb": peak_rss_mb()})
        for line in sys.stdin:
            command = json.loads(line)
            if command["kind"] == "quit":
                break
            result = generate_round(loaded, ids, command["batch"], args.tokens)
            reply(protocol, result | {"rss_mb": peak_rss_mb()})
        return
    engine = Engine(Settings(model=args.model, runner=args.runner, compile=bool(args.compile),
                             quantization=args.quantization, device=args.device, dtype=args.dtype,
                             max_batch_size=args.max_batch_size, max_model_len=args.max_model_len))
    engine.load()
    ids = engine.encode_chat([{"role": "user", "content": LONG_STORY_PROMPT}])
    reply(protocol, {"ready": True, "startup_s": time.perf_counter() - start, "rss_mb": peak_rss_mb()})
    for line in sys.stdin:
        command = json.loads(line)
        if command["kind"] == "quit":
            break
        result = asyncio.run(engine_round(engine, ids, command["batch"], command["monitor"], args.tokens))
        reply(protocol, result | {"rss_mb": peak_rss_mb()})
    asyncio.run(engine.stop())


if __name__ == "__main__":
    main()
