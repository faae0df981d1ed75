"""Model runners: the batch decides *what* runs (server/engine/batch.py); a runner executes it.

A runner owns the forward pass and the KV cache, and its layout: nothing else knows where a row's
keys and values live. Sequences keep token ids and how many of their positions are in the cache;
the batch talks to the runner in its own row order (row b is `batch.rows[b]`). The contract:

* `prefill(group, max_tokens)`: run the next chunk (about `max_tokens` prompt tokens in all) of a
  group of newcomers (prefill.py), into the group's cache or straight into the runner's own (the
  static runner does that for a lone newcomer); probes neither read nor steer prompt positions;
* `add_group(group)`: the prefilled newcomers join the batch as its last rows, in the same scheduler
  iteration as the chunk that finished them; from then on their prompts are read with `row_kv`;
* `remove_rows(keep)`: keep only those rows, in that order (the others finished or went away);
* `set_rows(steer, capture)`: per-row steering `[B, taps, hidden]` (or None) and whether the probes
  need head activations; called only when the batch's composition or a strength changes;
* `decode(inputs, positions)`: one token for every row -> logits `[B, V]` and, when capturing, the
  tap layers' head activations `[taps, B, H*D]`; no host sync;
* `rollback(row, length)`: a backtrack; the row keeps its first `length` positions;
* `row_kv(row, n)`: the keys and values of a row's first n positions (for the prefix cache);
* `memory()`: bytes its KV cache holds now, and its capacity in rows and positions.

A new runner is one package here implementing this (tests/test_runner_contract.py runs the same
tests against each). `hf` (hf/): transformers' forward over a growing `DynamicCache`, steering by
hooks; any model transformers runs. `static` (static/): preallocated slots and one compiled step.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedModel

from server.engine.prefix_cache import LayerKV
from server.engine.runners.prefill import PrefillGroup
from server.steering.taps import HeadTaps


class Runner(Protocol):
    device: torch.device
    vocab_size: int
    captures: bool  # whether decode can return head activations (the model has taps)

    def prefill(self, group: PrefillGroup, max_tokens: int) -> None: ...
    def add_group(self, group: PrefillGroup) -> None: ...
    def remove_rows(self, keep: list[int]) -> None: ...
    def set_rows(self, steer: torch.Tensor | None, capture: bool) -> None: ...
    def decode(self, inputs: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def rollback(self, row: int, length: int) -> None: ...
    def row_kv(self, row: int, n: int) -> LayerKV: ...
    def memory(self) -> dict[str, int]: ...


RUNNERS = ("hf", "static")


def make_runner(kind: str, model: PreTrainedModel, taps: HeadTaps | None, max_rows: int, max_len: int,
                compile: bool) -> Runner:
    if kind == "hf":
        from server.engine.runners.hf import HFRunner

        return HFRunner(model, taps)
    if kind == "static":
        from server.engine.runners.static import StaticRunner

        return StaticRunner(model, taps, max_rows, max_len, compile)
    raise ValueError(f"unknown runner {kind!r} ({' or '.join(RUNNERS)})")
