"""Server settings: command-line flags and FASB_* environment variables, one object passed around."""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.steering.types import STEERING_MODES, SteeringMode


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FASB_", extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    # model
    model: str = Field(
        "default", description="'default' (the embedded SmolLM2-135M-Instruct), a local Hugging Face folder, "
        "a .gguf file (converted once to the cache; chat template from the file; a model without one serves "
        "/v1/completions only) or a hub id (where a hub is reachable)"
    )
    served_model_name: str | None = Field(
        None, description="the `model` name clients send and /v1/models lists; default: the model's own name"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when torch sees a GPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 (or float16) on GPU"
    )
    cache_dir: str | None = Field(
        None, description="where converted weights are cached; default $XDG_CACHE_HOME/fasb-server, else "
        "~/.cache/fasb-server"
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context limit, longer prompts are a 400; default: the model's"
    )
    runner: Literal["hf", "static"] = Field(
        "hf", description="decode loop: hf (transformers forward over a growing cache, hooks for steering) or "
        "static (a preallocated slot cache of max-batch-size x max-model-len positions and one compilable decode "
        "step with steering inline; Llama-family models only: Llama, Mistral, Qwen2, SmolLM). "
        "See docs/architecture.md"
    )
    compile: bool = Field(
        True, description="static runner: compile its decode step with torch.compile at start, one batch-size "
        "bucket after the other (CUDA graphs on CUDA; on CPU inductor with the weights frozen into the graph: "
        "minutes at a cold start, a packed copy of the weights per graph, needs a C++ compiler)"
    )
    quantization: Literal["none", "int8", "int4"] = Field(
        "none", description="int8 | int4: weight-only quantized linear layers (CPU and CUDA; the model's o_proj, "
        "which steering reads, stays as loaded; the LM head is int8 under both). int4 is Q4_1 (groups of 32, "
        "fp16 scale and min), the default model's own format, exact on it; on other models plain round-to-nearest "
        "(check with bench/bench_quant_quality.py). On CPU int4 runs our kernel where the CPU has AVX-512 VNNI "
        "or AVX2 (built on first use; FASB_CPU_KERNELS=torch turns it off, =avx2 picks that build). "
        "int8: one scale per output channel. See docs/architecture.md"
    )

    # http
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(
        None, description="require `Authorization: Bearer KEY` on every route but /health, /health/live, "
        "/metrics and the API docs; prefer FASB_API_KEY (flags show in ps)"
    )
    cors_origins: list[str] = Field(default_factory=list, description="an allowed CORS origin; repeatable")

    # scheduling
    max_batch_size: int = Field(8, ge=1, description="sequences decoded together")
    max_queue: int = Field(64, ge=1, description="requests waiting or running before new ones get 429")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none")
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="prompt tokens prefilled per step (newcomers together): the longest pause of "
        "running streams when requests arrive; smaller pauses less, but first tokens come later"
    )

    prefix_cache_mb: int = Field(
        256, ge=0, description="memory for automatic prefix caching (keys/values of prompt prefixes and finished "
        "answers, reused by later requests that start with them; least recently used dropped first); 0 turns it off"
    )

    # admission, budgets, lifecycle (docs/operations.md)
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest request body; larger ones get 413 before they are read"
    )
    request_timeout: float | None = Field(
        None, gt=0, description="seconds a request may take from arrival; then it ends with finish_reason 'length'"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds in-flight requests get to finish before they are ended"
    )
    worker_stall_timeout: float = Field(
        60.0, gt=0, description="/health answers 503 when work waits and the decode worker made no progress this long"
    )

    # steering (None: the artifact's manifest decides)
    artifacts: list[str] = Field(default_factory=list, description="extra artifact folders to load")
    no_default_artifacts: bool = Field(False, description="do not load the prebuilt artifacts for the model")
    default_behavior: str | None = Field(
        None, description="behaviour monitored when a request names none (default: truthfulness, else the first "
        "loaded); a comma-separated list monitors several at once, e.g. truthfulness,tone"
    )
    # monitor, not fasb: on the default model no threshold keeps false alarms on correct answers <= 5%
    # and still intervenes (docs/steering.md). Requests ask for fasb with "mode": "fasb".
    steering_mode: SteeringMode = Field(
        "monitor", description=f"steering mode of requests that name none: {' | '.join(STEERING_MODES)}"
    )
    alpha: float | None = Field(None, ge=0, le=1000, description="default steering strength; default: the artifact's")
    threshold: float | None = Field(
        None, ge=0, le=1, description="default backtrack threshold on the probes' mean P(desired); default: the "
        "artifact's"
    )
    backtrack_tokens: int | None = Field(
        None, ge=1, le=256, description="tokens dropped per backtrack, also the check interval; default: the artifact's"
    )
    num_heads: int | None = Field(None, ge=1, description="use the artifact's top n heads; default: all of them")
    adaptive: bool | None = Field(
        None, description="true: strength alpha * (1 - p), false: alpha; default: the artifact's"
    )
    max_backtracks: int | None = Field(
        None, ge=0, le=32, description="interventions allowed per answer; default: the artifact's"
    )

    log_level: str = Field("info", description="debug | info | warning | error")


def parse_args(argv: list[str] | None = None) -> Settings:
    """Flags override FASB_* environment variables, which override the defaults."""
    parser = build_parser()
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:  # a usage error, not a traceback: name each bad flag (or FASB_ variable)
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field; defaults stay None so that unset flags leave FASB_* variables in charge."""
    parser = argparse.ArgumentParser(prog="fasb-server", description="OpenAI-compatible server with FASB steering")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool and field.default is True:  # --compile / --no-compile
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        elif field.annotation is bool:
            parser.add_argument(flag, action="store_true", default=None, help=field.description)
        elif name == "artifacts":
            parser.add_argument("--artifact", dest=name, action="append", default=None, help=field.description)
        elif name == "cors_origins":
            parser.add_argument("--cors-origin", dest=name, action="append", default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=field.description)
    return parser
