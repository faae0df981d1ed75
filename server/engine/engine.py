"""The engine: owns the model, its steering artifacts and the worker thread that decodes.

The HTTP layer talks to it through `submit()` (validates and enqueues synchronously, so errors
become 4xx before any byte is streamed) and the returned `GenerationStream` of engine events.
Decoding never runs on the event loop: the worker thread pushes events into each request's
asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from server.config import Settings
from server.engine.batch import Batch
from server.engine.grammar import GrammarCompiler
from server.engine.loader import LoadedModel, load_model
from server.engine.output import TextOutput
from server.engine.prefix_cache import PrefixCache
from server.engine.processors import DecodingState
from server.engine.quantize import quantize_weights
from server.engine.runners import make_runner
from server.engine.scheduler import RequestQueue, Scheduler
from server.engine.sequence import Sequence
from server.engine.types import BehaviorInfo, EngineEvent, Finished, GenerationRequest, SteeringParams, ToolPrompt
from server.errors import (
    EngineNotReadyError,
    EngineUnavailableError,
    InvalidRequestError,
    ServerError,
    ShuttingDownError,
)
from server.metrics import Metrics
from server.steering.artifact import SteeringArtifact, check_compatible, find_default_artifacts, load_artifact
from server.steering.bank import BehaviorBank
from server.steering.layers import attention_output_projections
from server.steering.policy import BehaviorDefaults, resolve_steering
from server.steering.taps import HeadTaps

log = logging.getLogger(__name__)
DEFAULT_BEHAVIOR_NAME = "truthfulness"  # served when a request names none and --default-behavior is unset


class GenerationStream:
    """Async iterator over one request's events; `cancel()` stops its generation."""

    def __init__(self, seq_holder: dict, queue: asyncio.Queue, requests: RequestQueue):
        self._holder = seq_holder
        self._queue = queue
        self._requests = requests
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, Exception):
            self._done = True
            raise event
        if isinstance(event, Finished):
            self._done = True
        return event

    def cancel(self) -> None:
        seq = self._holder.get("seq")
        if seq is not None and not self._done:
            seq.cancelled = True
            self._requests.discard(seq)  # a request still waiting frees its place at once
            self._requests.wake()
        self._done = True


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.ready = False
        self.model_name = settings.served_model_name or settings.model
        self.max_model_len = 0
        self._loaded: LoadedModel | None = None
        self._banks: dict[str, BehaviorBank] = {}
        self._behavior_defaults: dict[str, BehaviorDefaults] = {}
        self._taps: HeadTaps | None = None
        self._queue = RequestQueue(settings.max_queue)
        self.max_queue = settings.max_queue
        self._worker: threading.Thread | None = None
        self._scheduler: Scheduler | None = None
        self._draining = False
        self._max_token_chars = 0  # the longest token's text: a prompt longer than this many chars per token can't fit
        self._eos_ids: frozenset[int] = frozenset()
        self._grammars: GrammarCompiler | None = None  # None: this tokenizer cannot do structured output
        self._steering_defaults = SteeringParams(
            mode=settings.steering_mode,
            behavior=_behavior_names(settings.default_behavior),
            alpha=settings.alpha,
            threshold=settings.threshold,
            backtrack_tokens=settings.backtrack_tokens,
            num_heads=settings.num_heads,
            adaptive=settings.adaptive,
            max_backtracks=settings.max_backtracks,
        )

    # -- lifecycle
    async def start(self) -> None:
        """Load in the background (see `load`); returns when the engine is ready."""
        await asyncio.wrap_future(self._start_worker())

    def load(self) -> None:
        """Start the worker thread and block until it has loaded the model and artifacts.

        The worker loads the model itself and then runs the decode loop, so it is the only thread
        that ever runs torch compute in this process. That matters on CPU: libgomp gives every
        thread that enters a parallel region its own OpenMP team, and once two teams exist it
        counts more threads than cores and stops spin-waiting between regions; each of the
        thousand-odd regions of a decode step then pays a futex sleep and wake-up (the cost:
        docs/architecture.md "Why one thread runs torch").
        """
        self._start_worker().result()  # re-raises what made loading fail

    def _start_worker(self) -> Future:
        started: Future[None] = Future()
        self._worker = threading.Thread(target=self._work, args=(started,), name="fasb-decode", daemon=True)
        self._worker.start()
        return started

    def _work(self, started: Future) -> None:
        if not started.set_running_or_notify_cancel():  # start() was cancelled before we began
            return
        try:
            scheduler = self._prepare()
        except BaseException as exc:  # reported to load()'s caller, which fails the server's start
            started.set_exception(exc)
            return
        self._scheduler = scheduler
        started.set_result(None)
        try:
            scheduler.run()
        except BaseException:  # the worker dies: /health turns 503 (see health()); say why, fail what it held
            log.critical("the decode worker died", exc_info=True)
            scheduler.fail_outstanding(EngineUnavailableError())
            raise

    def _prepare(self) -> Scheduler:
        s = self.settings
        loaded = load_model(s.model, s.device, s.dtype, s.cache_dir, s.max_model_len)
        quantize_weights(loaded.model, s.quantization)  # keeps o_proj: artifacts check and steer with it
        self._loaded = loaded
        self.max_model_len = loaded.max_model_len
        if s.served_model_name is None:
            self.model_name = loaded.model_id
        self._eos_ids = _eos_token_ids(loaded)
        self._max_token_chars = _longest_token_chars(loaded.tokenizer)
        self._load_artifacts(loaded)
        self._grammars = _grammar_compiler(loaded, self._eos_ids)
        runner = make_runner(s.runner, loaded.model, self._taps, s.max_batch_size, self.max_model_len, s.compile)
        prefix_cache = _prefix_cache(loaded.model, s.prefix_cache_mb)
        batch = Batch(runner, loaded.tokenizer, self._banks, self._eos_ids, prefix_cache)
        pad_id = loaded.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else min(self._eos_ids, default=0)
        self.ready = True
        log.info(
            "model %s ready on %s (%s, %s runner), context %d, behaviours: %s",
            self.model_name, loaded.device, str(loaded.dtype).removeprefix("torch."), s.runner, self.max_model_len,
            ", ".join(self._banks) or "none",
        )
        return Scheduler(
            batch, self._queue, s.max_batch_size, pad_id, s.prefill_chunk_tokens, on_step=self._report_step,
            on_retired=self._observe_retired,
        )

    def health(self) -> str:
        """"loading", "ok", "draining", or why the worker cannot serve: "dead" (its thread ended)
        or "stalled" (work is waiting and it made no progress for --worker-stall-timeout s)."""
        if not self.ready or self._scheduler is None:
            return "loading"
        if self._worker is None or not self._worker.is_alive():
            return "dead"
        stats = self._queue.stats()
        stalled_for = self._scheduler.stalled_for(time.monotonic())
        if (stats["waiting"] or stats["running"]) and stalled_for > self.settings.worker_stall_timeout:
            return "stalled"
        return "draining" if self._draining else "ok"

    def begin_drain(self) -> None:
        """Refuse new requests (503 shutting_down); the ones in flight go on."""
        self._draining = True

    def idle(self) -> bool:
        stats = self._queue.stats()
        return not (stats["waiting"] or stats["running"])

    def abort_all(self, error: ServerError) -> None:
        """End every request in flight or waiting with `error` (their streams get it as an event)."""
        if self._scheduler is not None:
            self._scheduler.abort(error)

    async def stop(self) -> None:
        self._queue.close()
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._worker.join, 10)
        if self._taps is not None:
            self._taps.remove()
        self.ready = False

    def _load_artifacts(self, loaded: LoadedModel) -> None:
        s = self.settings
        folders = [] if s.no_default_artifacts else find_default_artifacts(loaded.model_id)
        folders += [Path(p) for p in s.artifacts]
        artifacts: list[SteeringArtifact] = []
        for folder in folders:
            artifact = load_artifact(folder)
            check_compatible(artifact, loaded.model)  # refuses a mismatch with what differs
            artifacts.append(artifact)
        if not artifacts:
            return
        # Without --default-behavior the first bank is the default: keep it the product's default
        # (truthfulness), though task artifacts (copa, mmlu, nli, ...) sort before it by name.
        artifacts.sort(key=lambda a: a.behavior != DEFAULT_BEHAVIOR_NAME)
        o_projs = attention_output_projections(loaded.model)
        layers = sorted({int(layer) for a in artifacts for layer in a.layers.tolist()})
        self._taps = HeadTaps(o_projs, layers).install()
        for artifact in artifacts:
            self._banks[artifact.behavior] = BehaviorBank(artifact, o_projs, layers)
            self._behavior_defaults[artifact.behavior] = BehaviorDefaults(
                artifact.alpha, artifact.threshold, artifact.backtrack_tokens, artifact.num_heads
            )
        unknown = [n for n in _behavior_names(s.default_behavior) or () if n not in self._banks]
        if unknown:
            raise ValueError(f"--default-behavior names {', '.join(unknown)}, which is not among {sorted(self._banks)}")

    # -- queries
    def behaviors(self) -> list[BehaviorInfo]:
        return [
            BehaviorInfo(
                name=name,
                num_heads=bank.num_heads,
                prompt_format=bank.artifact.prompt_format,
                alpha=bank.artifact.alpha,
                threshold=bank.artifact.threshold,
                backtrack_tokens=bank.artifact.backtrack_tokens,
                val_accuracy=float(bank.artifact.val_accuracy.mean()),
                description=bank.artifact.description,
                **bank.artifact.quality,
            )
            for name, bank in self._banks.items()
        ]

    def stats(self) -> dict[str, int]:
        return self._queue.stats()

    def encode_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        tools: ToolPrompt | None = None,
    ) -> list[int]:
        """The chat template's prompt for `messages`, tokenised. The keyword arguments are /tokenize's
        (vLLM's): the defaults are what generation uses. `tools`: the same chat for a template that
        renders tools itself, used when it writes calls as the tool grammar does (`<tool_call>`)."""
        tokenizer = self._require_ready().tokenizer
        template_tools = None
        if tools is not None and "<tool_call>" in str(getattr(tokenizer, "chat_template", None) or ""):
            messages, template_tools = tools.messages, tools.tools
        self._check_prompt_chars(sum(len(m.get("content") or "") for m in messages), "messages")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tools=template_tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
            )
        except Exception as exc:  # template errors (e.g. role order) are the request's fault
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        # What apply_chat_template(tokenize=True) does, with the special tokens made a choice.
        return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        loaded = self._require_ready()
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt), "prompt")
            return loaded.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        self._check_token_ids(prompt, "prompt")
        return list(prompt)

    def decode_tokens(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included (so /tokenize then /detokenize round-trips)."""
        loaded = self._require_ready()
        self._check_token_ids(token_ids, "tokens")
        return loaded.tokenizer.decode(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each token's vocabulary string (e.g. "Ġthe"), as /tokenize's `return_token_strs` gives them."""
        loaded = self._require_ready()
        self._check_token_ids(token_ids, "tokens")
        return list(loaded.tokenizer.convert_ids_to_tokens(token_ids))

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab = self._require_ready().model.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"{param} token ids must be in [0, {vocab})", param=param)

    def _check_prompt_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenising, text that needs more tokens than the context has: no token is
        longer than `_max_token_chars` characters, so `chars` characters take at least chars / that
        many tokens. (Twice the bound: a Unicode normaliser may first merge pairs of characters.)"""
        if self._max_token_chars and chars > 2 * self.max_model_len * self._max_token_chars:
            raise InvalidRequestError(
                f"the prompt has {chars} characters, more than fit in this model's {self.max_model_len}-token context",
                param=param,
                code="context_length_exceeded",
            )

    # -- generation
    def submit(self, request: GenerationRequest) -> GenerationStream:
        loaded = self._require_ready()
        self._require_serving()
        max_tokens = self._max_tokens(request)
        steering = resolve_steering(request.steering, self._steering_defaults, self._behavior_defaults)
        decoding = self._decoding_state(request, max_tokens, loaded.model.config.vocab_size)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        holder: dict = {}
        emit = self._emitter(loop, events, request)
        seq = Sequence(
            request=request,
            steering=steering,
            max_tokens=max_tokens,
            eos_ids=self._eos_ids,
            output=TextOutput(loaded.tokenizer, request.prompt_token_ids, request.sampling.stop, emit),
            emit=emit,
            generator=self._generator(request.sampling.seed),
            deadline=self._deadline(),
            decoding=decoding,
        )
        holder["seq"] = seq
        self._queue.put(seq)  # may raise QueueFullError
        self._report_queue()
        return GenerationStream(holder, events, self._queue)

    def _max_tokens(self, request: GenerationRequest) -> int:
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        asked = request.sampling.max_tokens
        if asked is not None and asked > room:
            raise InvalidRequestError(
                f"max_tokens is {asked}, but only {room} tokens fit after the {prompt_len}-token prompt "
                f"in this model's {self.max_model_len}-token context",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked if asked is not None else min(self.settings.default_max_tokens, room)

    def _decoding_state(self, request: GenerationRequest, max_tokens: int, vocab_size: int) -> DecodingState:
        """Check what needs the model (token ids, the context, the tokenizer) and compile the grammar."""
        s = request.sampling
        bad = sorted(t for t, _ in s.logit_bias if not 0 <= t < vocab_size)
        if bad:
            raise InvalidRequestError(
                f"logit_bias names token ids outside this model's vocabulary [0, {vocab_size}): {bad[:5]}",
                param="logit_bias",
            )
        if s.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({s.min_tokens}) is larger than max_tokens ({max_tokens})", param="min_tokens"
            )
        matcher = None
        if s.response_format is not None:
            if self._grammars is None:
                raise InvalidRequestError(
                    "structured output is not available for this model's tokenizer", param="response_format"
                )
            matcher = self._grammars.matcher(s.response_format)
        return DecodingState(s, matcher)

    def _deadline(self) -> float | None:
        timeout = self.settings.request_timeout
        return None if timeout is None else time.monotonic() + timeout

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = torch.Generator(device=self._loaded.device)
        gen.manual_seed(seed % 2**64)  # torch takes [0, 2**64); n choices use seed + i, which may pass 2**63
        return gen

    def _emitter(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, request: GenerationRequest):
        def emit(event) -> None:  # called on the worker thread
            if isinstance(event, Finished):
                self._observe_finished(event)
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        return emit

    def _observe_finished(self, event: Finished) -> None:
        m = self.metrics
        m.observe_tokens(event.prompt_tokens, event.completion_tokens + event.discarded_tokens, event.discarded_tokens,
                         event.cached_tokens)
        if event.steering is not None:
            m.observe_check(event.steering.checks)
            for backtrack in event.steering.backtracks:
                m.observe_backtrack(backtrack.tokens_retracted)

    def _observe_retired(self, seq: Sequence) -> None:
        """Count the work of a sequence that left without a Finished event (cancelled or failed)."""
        if not seq.reported:
            self.metrics.observe_tokens(len(seq.prompt), seq.decoded_tokens, seq.discarded)

    def _report_queue(self) -> None:
        stats = self._queue.stats()
        self.metrics.set_queue(stats["waiting"], stats["running"])

    def _report_step(self) -> None:
        """After each worker iteration (on the worker thread, the prefix cache's only user)."""
        self._report_queue()
        if self._scheduler is None:
            return
        self.metrics.set_kv_cache(self._scheduler.batch.runner.memory()["kv_cache_bytes"])
        prefix = self._scheduler.batch.prefix_cache
        if prefix is not None:
            self.metrics.set_prefix_cache(prefix.blocks_used, prefix.capacity, prefix.evicted)

    def _require_ready(self) -> LoadedModel:
        if not self.ready or self._loaded is None:
            raise EngineNotReadyError()
        return self._loaded

    def _require_serving(self) -> None:
        state = self.health()
        if state == "draining":
            raise ShuttingDownError()
        if state in ("dead", "stalled"):
            raise EngineUnavailableError(f"The decode worker is {state}; the server needs a restart.")


def _longest_token_chars(tokenizer) -> int:
    """Characters in the vocabulary's longest token (0 if the tokenizer cannot say)."""
    try:
        return max(len(tokenizer.convert_tokens_to_string([token])) for token in tokenizer.get_vocab())
    except Exception:  # an exotic tokenizer: skip the character pre-check, the token count still applies
        log.warning("could not measure the vocabulary's longest token; prompts are only checked after tokenising")
        return 0


def _grammar_compiler(loaded: LoadedModel, eos_ids: frozenset[int]) -> GrammarCompiler | None:
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_ids, default=0)
    try:
        return GrammarCompiler(tokenizer, loaded.model.config.vocab_size, eos)
    except Exception:  # an exotic tokenizer: serve everything else, refuse response_format with a 400
        log.warning("structured output is off: the grammar engine cannot use this tokenizer", exc_info=True)
        return None


def _eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(int(i) for i in ids if i is not None)


def _behavior_names(flag: str | None) -> tuple[str, ...] | None:
    """--default-behavior's comma-separated names (None: not set)."""
    names = tuple(n.strip() for n in (flag or "").split(",") if n.strip())
    return names or None


def _prefix_cache(model, megabytes: int) -> PrefixCache | None:
    if not megabytes:
        return None
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = PrefixCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, model.dtype, model.device,
                        megabytes * 2**20)
    log.info("prefix cache: %d blocks of %d tokens (%d MiB)", cache.capacity, cache.block_tokens, megabytes)
    return cache
