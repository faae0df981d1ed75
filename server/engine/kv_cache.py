"""A batched KV cache whose rows can join, leave and roll back independently.

Layout: one transformers `DynamicCache` holding keys/values `[B, kv_heads, T, D]` per layer, and a
boolean `valid [B, T]` saying which columns each row may attend to. Every decode step appends one
column for all rows. A row that joins late is left-padded with invalid columns; a row that rolls
back marks its dropped columns invalid, and re-feeds from the kept prefix into fresh columns. Each
row's token positions are explicit (`position_ids`), so holes in the column axis never shift RoPE.
Rollback is therefore O(1) tensor work for the row and touches no other row; `compact()` squeezes
the holes out when they make up much of the cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _layers_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    # t: [B, H, T, D] -> [B, H, T + width, D] with zeros in front (masked, never attended)
    if width == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], width, t.shape[3])
    return torch.cat([pad, t], dim=2)


class BatchKVCache:
    def __init__(self, device: torch.device):
        self.device = device
        self.cache: DynamicCache | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [B, T]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def add_row(self, row_cache: DynamicCache | None, length: int) -> tuple[list[int], int]:
        """Append a prefilled row (its own B=1 cache of `length` columns) as the last row.

        Returns the columns of the new row's positions 0..length-1, and how far the existing
        rows' columns moved right (the batch is left-padded when the new row is longer).
        """
        row_kv = _layers_kv(row_cache) if row_cache is not None and length > 0 else None
        width = max(self.width, length)
        shift = width - self.width
        if self.batch_size == 0:
            self.cache = _cache_from(row_kv) if row_kv else None
            self.valid = torch.ones(1, length, dtype=torch.bool, device=self.device)
            return list(range(length)), 0
        batch_kv = _layers_kv(self.cache) if self.cache is not None else None
        merged = []
        for i in range(len(batch_kv or row_kv or [])):
            old = batch_kv[i] if batch_kv else None
            new = row_kv[i] if row_kv else None
            merged.append(tuple(self._merge(old, new, j, width) for j in range(2)))
        self.cache = _cache_from(merged) if merged else None
        pad_old = torch.zeros(self.batch_size, width - self.width, dtype=torch.bool, device=self.device)
        row_valid = torch.zeros(1, width, dtype=torch.bool, device=self.device)
        row_valid[0, width - length :] = True
        self.valid = torch.cat([torch.cat([pad_old, self.valid], dim=1), row_valid], dim=0)
        return list(range(width - length, width)), shift

    def _merge(self, old, new, j: int, width: int) -> torch.Tensor:
        # old/new: (keys, values) pairs or None; j picks keys (0) or values (1)
        if old is None:  # batch has no columns yet: build zero rows in the new row's shape
            ref = new[j]
            old_t = ref.new_zeros(self.batch_size, ref.shape[1], 0, ref.shape[3])
        else:
            old_t = old[j]
        if new is None:
            new_t = old_t.new_zeros(1, old_t.shape[1], 0, old_t.shape[3])
        else:
            new_t = new[j]
        return torch.cat([_left_pad(old_t, width - old_t.shape[2]), _left_pad(new_t, width - new_t.shape[2])], dim=0)

    def remove_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices into the current batch), in that order."""
        if not keep:
            self.cache = None
            self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
            return
        index = torch.tensor(keep, device=self.device)
        if self.cache is not None:
            self.cache.batch_select_indices(index)
        self.valid = self.valid.index_select(0, index)

    def next_column_mask(self) -> torch.Tensor:
        """Grow `valid` by the column the coming step writes; return the 4D attention mask."""
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.batch_size, 1)], dim=1)
        return self.valid[:, None, None, :]  # [B, 1, 1, T+1]: row b attends where True

    def invalidate(self, row: int, columns: list[int]) -> None:
        if columns:
            self.valid[row, torch.tensor(columns, device=self.device)] = False

    def holes(self) -> int:
        return self.width * self.batch_size - int(self.valid.sum())

    def compact(self, row_columns: list[list[int]]) -> list[list[int]]:
        """Squeeze out invalid columns: each row's valid columns (in order) end right-aligned.

        row_columns[b] lists row b's valid columns in position order. Returns the new columns.
        """
        width = max((len(c) for c in row_columns), default=0)
        index = torch.zeros(self.batch_size, width, dtype=torch.long)
        valid = torch.zeros(self.batch_size, width, dtype=torch.bool)
        new_columns = []
        for b, cols in enumerate(row_columns):
            start = width - len(cols)
            index[b, start:] = torch.tensor(cols, dtype=torch.long)
            valid[b, start:] = True
            new_columns.append(list(range(start, width)))
        index, self.valid = index.to(self.device), valid.to(self.device)
        if self.cache is not None:
            kv = []
            for k, v in _layers_kv(self.cache):
                gather = index[:, None, :, None].expand(k.shape[0], k.shape[1], width, k.shape[3])
                kv.append((k.gather(2, gather), v.gather(2, gather)))
            self.cache = _cache_from(kv)
        return new_columns
