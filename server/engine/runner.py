"""Model runners: the batch decides *what* runs (server/engine/batch.py); a runner executes it.

A runner owns the KV cache and the forward pass. The batch talks to it in the batch's own row
order (row b is `batch.rows[b]`):

* `add_group(group)`: take prefilled newcomers (server/engine/prefill.py) into the cache; returns
  each new row's cache columns, and how far the existing rows' columns moved;
* `remove_rows(keep)`: keep only those rows (the others finished or were cancelled);
* `set_rows(steer, capture)`: per-row steering `[B, taps, hidden]` (or None) and whether the probes
  need head activations; called only when the batch's composition or a strength changes;
* `columns(positions)`: the cache column each row's next step writes;
* `decode(inputs, positions)`: one token for every row -> logits `[B, V]` and, when capturing, the
  tap layers' head activations `[taps, B, H*D]`; no host sync;
* `truncate(row, dropped_cols, length)`: a backtrack; the row keeps `length` positions;
* `tidy(rows)`: housekeeping between steps (compaction for the hf runner);
* `row_kv(row, n)`: the keys/values of a row's first n positions (for the prefix cache).

Two runners: `hf` (this file: transformers' forward with a `DynamicCache`, steering by hooks) and
`static` (server/engine/static_runner.py: preallocated slots, one compiled step).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from transformers import PreTrainedModel

from server.engine.decode import decode_step
from server.engine.kv_cache import BatchKVCache, _layers_kv
from server.engine.prefill import PrefillGroup
from server.engine.prefix_cache import LayerKV
from server.engine.sequence import Sequence
from server.steering.taps import HeadTaps

log = logging.getLogger(__name__)

# hf runner: squeeze holes (left padding, backtracked columns) out of the cache once it is this
# much wider than the longest row needs.
_COMPACT_SLACK = 64


class Runner(Protocol):
    model: PreTrainedModel
    taps: HeadTaps | None

    def add_group(self, group: PrefillGroup) -> tuple[list[list[int]], int]: ...
    def remove_rows(self, keep: list[int]) -> None: ...
    def set_rows(self, steer: torch.Tensor | None, capture: bool) -> None: ...
    def columns(self, positions: list[int]) -> list[int]: ...
    def decode(self, inputs: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def truncate(self, row: int, dropped_cols: list[int], length: int) -> None: ...
    def tidy(self, rows: list[Sequence]) -> None: ...
    def row_kv(self, row: int, n: int) -> LayerKV: ...


class HFRunner:
    """transformers' own forward over a batched DynamicCache with a validity mask (kv_cache.py)."""

    def __init__(self, model: PreTrainedModel, taps: HeadTaps | None):
        self.model = model
        self.taps = taps
        self.cache = BatchKVCache(model.device)
        self._capture = False

    def add_group(self, group: PrefillGroup) -> tuple[list[list[int]], int]:
        return self.cache.add_rows(group.cache, group.valid)

    def remove_rows(self, keep: list[int]) -> None:
        self.cache.remove_rows(keep)

    def set_rows(self, steer: torch.Tensor | None, capture: bool) -> None:
        if self.taps is None:
            return
        # steer: [B, taps, hidden] -> the hooks' {layer: [B, hidden]}
        layers = self.taps.layers
        self.taps.steer = None if steer is None else {layer: steer[:, slot] for slot, layer in enumerate(layers)}
        self.taps.capture = self._capture = capture

    def columns(self, positions: list[int]) -> list[int]:
        return [self.cache.width] * len(positions)  # every row appends the same new column

    def decode(self, inputs: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.model.device
        logits = decode_step(self.model, self.cache, torch.tensor(inputs, device=device),
                             torch.tensor(positions, device=device))
        return logits, self.taps.captured() if self._capture else None

    def truncate(self, row: int, dropped_cols: list[int], length: int) -> None:
        self.cache.invalidate(row, dropped_cols)

    def row_kv(self, row: int, n: int) -> LayerKV:
        columns = self.cache.valid[row].nonzero().squeeze(1)[:n]  # a row's valid columns are in position order
        layers = _layers_kv(self.cache.cache)
        return [(k[row].index_select(1, columns), v[row].index_select(1, columns)) for k, v in layers]

    def tidy(self, rows: list[Sequence]) -> None:
        longest = max((len(r.cols) for r in rows), default=0)
        if rows and self.cache.width > longest + _COMPACT_SLACK:
            for row, cols in zip(rows, self.cache.compact([r.cols for r in rows])):
                row.cols = cols


def make_runner(kind: str, model: PreTrainedModel, taps: HeadTaps | None, max_rows: int, max_len: int,
                compile: bool) -> Runner:
    if kind == "hf":
        return HFRunner(model, taps)
    if kind == "static":
        from server.engine.static_runner import StaticRunner

        return StaticRunner(model, taps, max_rows, max_len, compile)
    raise ValueError(f"unknown runner {kind!r} (hf or static)")
