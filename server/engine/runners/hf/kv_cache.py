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

from server.engine.hf_compat import cache_from, cache_layers
from server.engine.prefix_cache import LayerKV


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    # t: [B, H, T, D] -> [B, H, T + width, D] with zeros in front (masked, never attended)
    if width == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], width, t.shape[3])
    return torch.cat([pad, t], dim=2)


def _left_pad_mask(valid: torch.Tensor, width: int) -> torch.Tensor:
    pad = valid.new_zeros(valid.shape[0], width - valid.shape[1])
    return torch.cat([pad, valid], dim=1)


class BatchKVCache:
    def __init__(self, device: torch.device):
        self.device = device
        self.cache: DynamicCache | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [B, T]
        # Whether any row has an invalid column; tracked on the host so that no step needs a
        # device sync to find out. Conservative: it may stay True after the holes are gone.
        self._holes = False

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def add_rows(self, rows_kv: LayerKV, rows_valid: torch.Tensor) -> tuple[list[list[int]], int]:
        """Append prefilled rows: their keys/values `[n, H, W, D]` per layer, with `rows_valid [n, W]`
        marking real columns (right-aligned; a row's cached prefix and the rest may leave a hole).

        Returns each new row's columns (position order) and how far the existing rows' columns
        moved right (the batch is left-padded when the newcomers are wider).
        """
        width = max(self.width, rows_valid.shape[1])
        shift = width - self.width if self.batch_size else 0
        old_kv = cache_layers(self.cache) if self.cache is not None else None
        new_kv = rows_kv if rows_valid.shape[1] else None
        if old_kv or new_kv:
            n_layers = len(old_kv or new_kv)
            self.cache = cache_from([
                tuple(self._merge(old_kv[i] if old_kv else None, new_kv[i] if new_kv else None, j,
                                  rows_valid.shape[0], width) for j in range(2))
                for i in range(n_layers)
            ])
        self.valid = torch.cat([_left_pad_mask(self.valid, width), _left_pad_mask(rows_valid.to(self.device), width)])
        offset = width - rows_valid.shape[1]
        columns = [[offset + c for c in row.nonzero().squeeze(1).tolist()] for row in rows_valid.cpu()]
        was_empty = self.batch_size == rows_valid.shape[0]
        self._holes = (self._holes and not was_empty) or shift > 0 or any(len(c) < width for c in columns)
        return columns, shift

    def _merge(self, old, new, j: int, n_new: int, width: int) -> torch.Tensor:
        # old/new: (keys, values) pairs or None; j picks keys (0) or values (1). A side without
        # columns yet becomes zero-width rows shaped like the other side.
        ref = (old or new)[j]
        old_t = old[j] if old else ref.new_zeros(self.batch_size, ref.shape[1], 0, ref.shape[3])
        new_t = new[j] if new else ref.new_zeros(n_new, ref.shape[1], 0, ref.shape[3])
        return torch.cat([_left_pad(old_t, width - old_t.shape[2]), _left_pad(new_t, width - new_t.shape[2])], dim=0)

    def remove_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices into the current batch), in that order."""
        if not keep:
            self.cache = None
            self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
            self._holes = False
            return
        index = torch.tensor(keep, device=self.device)
        if self.cache is not None:
            self.cache.batch_select_indices(index)
        self.valid = self.valid.index_select(0, index)

    def next_column_mask(self) -> torch.Tensor | None:
        """Grow `valid` by the column the coming step writes; return the 4D attention mask, or
        None when there are no holes (sdpa then takes its unmasked, faster kernel)."""
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.batch_size, 1)], dim=1)
        if not self._holes:
            return None
        return self.valid[:, None, None, :]  # [B, 1, 1, T+1]: row b attends where True

    def invalidate(self, row: int, columns: list[int]) -> None:
        if columns:
            self.valid[row, torch.tensor(columns, device=self.device)] = False
            self._holes = True

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
        self._holes = any(len(cols) < width for cols in row_columns)
        if self.cache is not None:
            kv = []
            for k, v in cache_layers(self.cache):
                gather = index[:, None, :, None].expand(k.shape[0], k.shape[1], width, k.shape[3])
                kv.append((k.gather(2, gather), v.gather(2, gather)))
            self.cache = cache_from(kv)
        return new_columns
