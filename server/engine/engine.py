"""The engine: owns the model, its steering artifacts and the worker thread that decodes.

The HTTP layer talks to it through `submit()` (validates and enqueues synchronously, so errors
become 4xx before any byte is streamed) and the returned `GenerationStream` of engine events.
The pieces, as vLLM's engine splits them: request input processing (input_processor.py: tokenising,
checks, a request to a `Sequence`), the scheduling core (scheduler.py, batch.py, runners/), and
output processing (output_processor.py: events across threads, metrics of finished requests).
This class holds their lifecycle: loading, the worker thread, health, draining.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from server.config import Settings
from server.engine.batch import Batch
from server.engine.input_processor import InputProcessor
from server.engine.loader import LoadedModel, load_model
from server.engine.output_processor import GenerationStream, OutputProcessor
from server.engine.prefix_cache import PrefixCache
from server.engine.quantize import quantize_weights
from server.engine.runners import make_runner
from server.engine.scheduler import RequestQueue, Scheduler
from server.engine.types import BehaviorInfo, GenerationRequest, SteeringParams, ToolPrompt
from server.errors import EngineNotReadyError, EngineUnavailableError, ServerError, ShuttingDownError
from server.metrics import Metrics
from server.steering.artifact import SteeringArtifact, check_compatible, find_default_artifacts, load_artifact
from server.steering.bank import BehaviorBank
from server.steering.layers import attention_output_projections
from server.steering.policy import BehaviorDefaults
from server.steering.taps import HeadTaps

log = logging.getLogger(__name__)
DEFAULT_BEHAVIOR_NAME = "truthfulness"  # served when a request names none and --default-behavior is unset


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
        self._inputs: InputProcessor | None = None  # once the model is loaded
        self._outputs = OutputProcessor(self.metrics)
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
        eos_ids = _eos_token_ids(loaded)
        self._load_artifacts(loaded)
        self._inputs = InputProcessor(loaded, eos_ids, self._steering_defaults, self._behavior_defaults,
                                      s.default_max_tokens, s.request_timeout)
        runner = make_runner(s.runner, loaded.model, self._taps, s.max_batch_size, self.max_model_len, s.compile)
        prefix_cache = _prefix_cache(loaded.model, s.prefix_cache_mb)
        batch = Batch(runner, loaded.tokenizer, self._banks, eos_ids, prefix_cache)
        pad_id = loaded.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else min(eos_ids, default=0)
        self.ready = True
        log.info(
            "model %s ready on %s (%s, %s runner), context %d, behaviours: %s",
            self.model_name, loaded.device, str(loaded.dtype).removeprefix("torch."), s.runner, self.max_model_len,
            ", ".join(self._banks) or "none",
        )
        return Scheduler(
            batch, self._queue, s.max_batch_size, pad_id, s.prefill_chunk_tokens, on_step=self._report_step,
            on_retired=self._outputs.retired,
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
                artifact.alpha, artifact.threshold, artifact.backtrack_tokens, artifact.num_heads, artifact.iti_alpha
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
                iti_alpha=bank.artifact.iti_alpha,
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

    # -- tokenising (input_processor.py)
    def encode_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        tools: ToolPrompt | None = None,
    ) -> list[int]:
        return self._require_inputs().encode_chat(messages, add_generation_prompt, continue_final_message,
                                                  add_special_tokens, tools)

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        return self._require_inputs().encode_prompt(prompt, add_special_tokens)

    def decode_tokens(self, token_ids: list[int]) -> str:
        return self._require_inputs().decode_tokens(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return self._require_inputs().token_strings(token_ids)

    # -- generation
    def submit(self, request: GenerationRequest) -> GenerationStream:
        inputs = self._require_inputs()
        self._require_serving()
        events: asyncio.Queue = asyncio.Queue()
        seq = inputs.sequence(request, self._outputs.emitter(asyncio.get_running_loop(), events))
        self._queue.put(seq)  # may raise QueueFullError
        self._report_queue()
        return GenerationStream(seq, events, self._queue)

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

    def _require_inputs(self) -> InputProcessor:
        if not self.ready or self._inputs is None:
            raise EngineNotReadyError()
        return self._inputs

    def _require_serving(self) -> None:
        state = self.health()
        if state == "draining":
            raise ShuttingDownError()
        if state in ("dead", "stalled"):
            raise EngineUnavailableError(f"The decode worker is {state}; the server needs a restart.")


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
