"""`StaticRunner`: a preallocated slot cache and one (optionally compiled) decode step.

Each running request owns a slot of `StaticKVCache` (cache.py); the step (decode.py)
runs on slots 0..S-1, where S is the smallest *bucket* (1, 2, 4, ... max rows) holding every
occupied slot, so a compiled step sees a handful of batch shapes; free slots inside the bucket run
on dummy inputs. Attention reads the first T columns, T rounded up to `_KEY_BLOCK`; T is a dynamic
dimension of the compiled graph, so growing sequences do not recompile.

Backtracking needs nothing here: a row's length is its next position, which the sequence already
moved back (server/engine/sequence.py), and the next step overwrites the stale columns.
"""

from __future__ import annotations

import gc
import logging
import time

import torch
from transformers import PreTrainedModel

from server.engine.prefix_cache import LayerKV
from server.engine.quantize import QuantizedLinear
from server.engine.runners.prefill import PrefillGroup
from server.engine.runners.static.cache import StaticKVCache
from server.engine.runners.static.decode import StaticDecoder, check_static_supported
from server.steering.taps import HeadTaps

log = logging.getLogger(__name__)

_KEY_BLOCK = 64  # attention length granularity: fewer distinct shapes (CUDA graphs record one each)


def batch_buckets(max_rows: int) -> list[int]:
    """Powers of two below max_rows, then max_rows: [1, 2, 4, 8] for 8, [1, 2, 4, 6] for 6."""
    buckets = [1]
    while buckets[-1] * 2 < max_rows:
        buckets.append(buckets[-1] * 2)
    return buckets + [max_rows] if buckets[-1] < max_rows else buckets


class StaticRunner:
    def __init__(self, model: PreTrainedModel, taps: HeadTaps | None, max_rows: int, max_len: int, compile: bool):
        check_static_supported(model.config)
        self.model, self.taps = model, taps
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.captures = taps is not None
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = StaticKVCache(config.num_hidden_layers, max_rows, config.num_key_value_heads, max_len,
                                   head_dim, model.dtype, model.device)
        self._memory = {"kv_cache_bytes": self.cache.nbytes(), "kv_cache_positions": max_rows * max_len}
        log.info("static KV cache: %d slots x %d positions, %.0f MiB", max_rows, max_len, self.cache.nbytes() / 2**20)
        tap_layers = taps.layers if taps is not None else []
        self.decoder = StaticDecoder(model, self.cache, tap_layers)
        self.buckets = batch_buckets(max_rows)
        self.slots: list[int] = []  # row b's slot
        self._free = list(range(max_rows))
        self._reserved: tuple[PrefillGroup, int] | None = None  # a lone newcomer's slot, prefilled in place
        self._steer_shape = (len(tap_layers), config.hidden_size)
        self._steer = torch.zeros(0, *self._steer_shape, dtype=model.dtype, device=model.device)  # [S, taps, hidden]
        self._rows_index = torch.zeros(0, dtype=torch.long, device=model.device)  # [B]: row b's slot
        self._rows_gathered = False  # whether rows must be gathered from the step's (not slots 0..B-1)
        self._capture = False
        self._step = self.decoder
        self._skip_guards = False  # set once the warm-up has compiled every graph the step needs
        self._inductor_options: dict = {}  # what the step's graphs are compiled with (CPU: _cpu_inductor_options)
        if compile:
            self._compile()

    # -- composition
    def prefill(self, group: PrefillGroup, max_tokens: int) -> None:
        self._release_reserved()  # a group that failed between prefill and joining leaves none
        if len(group.seqs) == 1 and group.width - group.done <= max_tokens:
            self._prefill_in_slot(group)
        else:  # several newcomers, or a long prompt's first chunks: one batched forward
            group.run_chunk(self.model, self.taps, max_tokens)

    def _prefill_in_slot(self, group: PrefillGroup) -> None:
        """A lone newcomer whose rest fits one chunk goes straight into the slot it will decode in:
        its cached prefix is copied there and its new tokens are written there by the step's own
        attention (StaticDecoder.prefill), with none of a batch cache's copies. It joins in the same
        scheduler iteration (`add_group`), so no decode step runs over the reserved slot meanwhile."""
        slot = self._free.pop(0)
        self._reserved = (group, slot)
        self.cache.ensure_zeroed(group.width)  # before writing: zeroing later would erase these columns
        if group.done:
            self.cache.load_row(slot, group.prefix_kv())
        if group.done < group.width:  # one row: its columns are its positions, no holes
            self.decoder.prefill(slot, group.input_ids[0, group.done :], group.done)
        group.release()  # the prompt lives in the slot now

    def _release_reserved(self) -> None:
        if self._reserved is not None:
            self._free = sorted(self._free + [self._reserved[1]])
            self._reserved = None

    def add_group(self, group: PrefillGroup) -> None:
        if self._reserved is not None and self._reserved[0] is group:
            self.slots.append(self._reserved[1])
            self._reserved = None
            return
        for r, n in enumerate(group.valid.sum(dim=1).tolist()):
            slot = self._free.pop(0)  # lowest free slot keeps the bucket small
            self.slots.append(slot)
            if n:
                self.cache.load_row(slot, group.row_kv(r))

    def remove_rows(self, keep: list[int]) -> None:
        kept = [self.slots[i] for i in keep]
        self._free = sorted(set(self._free) | (set(self.slots) - set(kept)))
        self.slots = kept

    def set_rows(self, steer: torch.Tensor | None, capture: bool) -> None:
        device = self.device
        size = self._bucket()
        self._rows_index = torch.tensor(self.slots, dtype=torch.long, device=device)
        self._rows_gathered = self.slots != list(range(len(self.slots)))
        self._steer = torch.zeros(size, *self._steer_shape, dtype=self.model.dtype, device=device)
        if steer is not None:
            self._steer[self._rows_index] = steer.to(self._steer.dtype)
        self._capture = capture

    def _bucket(self) -> int:
        needed = max(self.slots, default=0) + 1
        return next(b for b in self.buckets if b >= needed)

    # -- stepping (position i of a request lives in column i of its slot)
    def decode(self, inputs: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self._steer.shape[0]
        ids, pos = [0] * size, [0] * size  # free slots in the bucket: token 0 at position 0, ignored
        for slot, token, p in zip(self.slots, inputs, positions):
            ids[slot], pos[slot] = token, p
        logits, taps = self._run(ids, pos, max(positions) + 1)
        rows = self._rows_index if self._rows_gathered else slice(len(self.slots))  # a view when in order
        return logits[rows], taps[:, rows] if self._capture else None

    def _run(self, ids: list[int], pos: list[int], needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device  # kept at start: the model's `.device` looks through its parameters each call
        width = min(self.cache.max_len, -(-needed // _KEY_BLOCK) * _KEY_BLOCK)
        self.cache.ensure_zeroed(width)
        key_pos = torch.arange(width, device=device)
        torch._dynamo.maybe_mark_dynamic(key_pos, 0)  # T grows with the sequences: no recompiles
        return self._call_step(torch.tensor(ids, device=device), torch.tensor(pos, device=device), self._steer, key_pos)

    def _call_step(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._skip_guards:
            return self._step(*inputs)
        # No cyclic garbage collection inside the step: a weakref callback it runs is a Python frame
        # that dynamo intercepts, and under skip_guard_eval_unsafe that can leave the step's own
        # frame uncompiled ("found no compiled frames", seen under load with the prefix cache's
        # many small objects). Collection resumes right after the step.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._step(*inputs)
        except RuntimeError as exc:
            # Either dynamo refused before the graph ran, or the step ran uncompiled; a step only
            # writes each row's key/value at its own position, so running it again is safe.
            if "Recompilation triggered" in str(exc):
                log.warning("the decode step met inputs its warm-up did not compile for; compiling them now")
            elif "found no compiled frames" in str(exc):
                log.warning("the decode step ran uncompiled once; running it again with every guard")
            else:
                raise
            with torch._inductor.config.patch(self._inductor_options):
                return self._step(*inputs)
        finally:
            if collecting:
                gc.enable()

    def rollback(self, row: int, length: int) -> None:
        pass  # the row's length is its next position; the next step overwrites what was dropped

    def row_kv(self, row: int, n: int) -> LayerKV:
        slot = self.slots[row]
        return [(k[slot, :, :n], v[slot, :, :n]) for k, v in map(self.cache.layer, range(self.cache.num_layers))]

    def memory(self) -> dict[str, int]:
        return self._memory  # allocated once, at start

    # -- compilation
    def _compile(self) -> None:
        """Compile the whole step, then run every batch bucket once now, not on the first requests.

        CPU: inductor with `freezing`, so each linear layer's weight is packed once into oneDNN's
        blocked layout (plain sgemm is slow at a decode step's few rows), at the price of a packed
        copy of the weights per compiled graph; options in `_cpu_inductor_options`. CUDA:
        `mode="reduce-overhead"` (CUDA graphs), so a step is one graph launch; the cache buffers are
        module buffers, which CUDA graphs treat as fixed addresses. Why and the numbers:
        docs/architecture.md "`static` runner".
        """
        if self.model.device.type == "cuda":
            self._step = torch.compile(self.decoder, mode="reduce-overhead", fullgraph=True)
            self._warm_up()
        else:
            self._step = torch.compile(self.decoder, fullgraph=True)
            # The warm-up compiles every graph the step needs. Inductor's options are read from its
            # global config when dynamo hands it a graph (torch.compile(options={"freezing": True})
            # does not freeze), hence the patch around the warm-up.
            self._inductor_options = _cpu_inductor_options(self.model)
            with torch._inductor.config.patch(self._inductor_options):
                self._warm_up()
        # From now on dynamo checks only the guards that told the warmed-up graphs apart (the batch
        # bucket), not all of them (every weight, buffer and input of the step) on each call, which
        # costs ~1 ms per step (docs/architecture.md). This rests on torch's condition for it: no
        # call may need a graph the warm-up did not build. It holds because this runner makes every
        # input of the step itself, in the dtypes and bucket shapes the warm-up ran, and the model's
        # weights do not change after load. Inputs the kept guards reject make dynamo raise before
        # anything runs, and `_call_step` then compiles for them with every guard.
        self._skip_guards = True

    @torch.inference_mode()  # as the scheduler runs it: grad mode is part of the compiled graph's guards
    def _warm_up(self) -> None:
        # After the second batch shape dynamo makes the batch dimension dynamic, so later buckets
        # mostly reuse that graph (on CUDA, each shape still records its own graph).
        for n, size in enumerate(self.buckets, 1):
            start = time.perf_counter()
            self._steer = torch.zeros(size, *self._steer_shape, dtype=self.model.dtype, device=self.model.device)
            for needed in (1, _KEY_BLOCK + 1):  # two widths: the second must not recompile
                self._run([0] * size, [0] * size, needed)
            log.info("compiled the decode step for batch %d (%d/%d) in %.1fs", size, n, len(self.buckets),
                     time.perf_counter() - start)
        self._steer = self._steer[:0]


def _cpu_inductor_options(model: torch.nn.Module) -> dict:
    """Inductor's options for the CPU step: freezing and a C++ wrapper always (kernels called from
    generated C++, not Python: ~1 ms less per step); with weights on torch's quantized kernels, also
    max-autotune over inductor's C++ GEMM templates and ATen's, keeping the faster per layer shape
    (ATen stays a candidate because templates do not take every shape). Not for fp32 or our own
    kernels (int4, and the Q8_0 head). The measurements behind each choice: docs/architecture.md
    "Numbers behind the CPU step".
    """
    options = {"freezing": True, "cpp_wrapper": True}
    if any(isinstance(module, QuantizedLinear) and not module.own_kernel for module in model.modules()):
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                       # autotuning writes each layer's timings to stderr: hundreds of lines in the log
                       autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
    return options
