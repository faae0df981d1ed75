"""`HFRunner`: transformers' forward over a batched DynamicCache with a validity mask (kv_cache.py).

Its layout is its own: `row_columns[b]` lists the cache column of each of row b's positions. Rows
that join late are left-padded, a backtrack masks the row's dropped columns out and the row goes
on in fresh columns, and once such holes make the cache much wider than its longest row they are
squeezed out (`BatchKVCache.compact`). Steering and head capture run through hooks
(server/steering/taps.py).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from server.engine.hf_compat import cache_layers
from server.engine.prefix_cache import LayerKV
from server.engine.runners.hf.decode import decode_step
from server.engine.runners.hf.kv_cache import BatchKVCache
from server.engine.runners.prefill import PrefillGroup, select_columns
from server.steering.taps import HeadTaps

# Squeeze holes (left padding, backtracked columns) out of the cache once it is this much wider
# than the longest row needs.
_COMPACT_SLACK = 64


class HFRunner:
    def __init__(self, model: PreTrainedModel, taps: HeadTaps | None):
        self.model = model
        self.taps = taps
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.captures = taps is not None
        self.cache = BatchKVCache(model.device)
        self.row_columns: list[list[int]] = []  # row b: the cache column of each of its positions
        self._capture = False
        self._may_compact = False  # rows left or rolled back since the last look

    def prefill(self, group: PrefillGroup, max_tokens: int) -> None:
        group.run_chunk(self.model, self.taps, max_tokens)

    def add_group(self, group: PrefillGroup) -> None:
        columns, shift = self.cache.add_rows(group.layers(), group.valid)
        if shift:  # the batch was left-padded to the newcomers' width
            self.row_columns = [[c + shift for c in cols] for cols in self.row_columns]
        self.row_columns.extend(columns)

    def remove_rows(self, keep: list[int]) -> None:
        self.cache.remove_rows(keep)
        self.row_columns = [self.row_columns[i] for i in keep]
        self._may_compact = True

    def set_rows(self, steer: torch.Tensor | None, capture: bool) -> None:
        if self.taps is None:
            return
        # steer: [B, taps, hidden] -> the hooks' {layer: [B, hidden]}
        layers = self.taps.layers
        self.taps.steer = None if steer is None else {layer: steer[:, slot] for slot, layer in enumerate(layers)}
        self.taps.capture = self._capture = capture

    def decode(self, inputs: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._may_compact:
            self._compact_if_sparse()
        column = self.cache.width  # every row appends the same new column
        for cols in self.row_columns:
            cols.append(column)
        logits = decode_step(self.model, self.cache, torch.tensor(inputs, device=self.device),
                             torch.tensor(positions, device=self.device))
        return logits, self.taps.captured() if self._capture else None

    def rollback(self, row: int, length: int) -> None:
        self.cache.invalidate(row, self.row_columns[row][length:])
        del self.row_columns[row][length:]
        self._may_compact = True

    def row_kv(self, row: int, n: int) -> LayerKV:
        return select_columns(cache_layers(self.cache.cache), row, self.row_columns[row][:n])

    def memory(self) -> dict[str, int]:
        layers = cache_layers(self.cache.cache) if self.cache.cache is not None else []
        per_layer = layers[0][0].nbytes + layers[0][1].nbytes if layers else 0  # every layer alike
        positions = self.cache.batch_size * self.cache.width
        return {"kv_cache_bytes": per_layer * len(layers), "kv_cache_positions": positions}

    def _compact_if_sparse(self) -> None:
        self._may_compact = False
        longest = max((len(cols) for cols in self.row_columns), default=0)
        if self.row_columns and self.cache.width > longest + _COMPACT_SLACK:
            self.row_columns = self.cache.compact(self.row_columns)
