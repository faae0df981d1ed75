"""A preallocated KV cache, gpt-fast style: one slot per running request, no holes, no compaction.

Per layer, keys and values live in `[slots, kv_heads, max_len, head_dim]` buffers allocated once.
A request owns a slot; position i of its prompt+generated tokens is column i of that slot. A decode
step writes each row's new key/value at its own position, and attention reads columns
`0..position` (masked by position, see decode.py). So a row's *length* is simply its next
position: a backtrack sets it back and the next step overwrites the stale columns, and a freed slot
needs no clearing. The buffers are module buffers so a compiled step (and a CUDA graph) sees fixed
addresses.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticKVCache(nn.Module):
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.slots, self.max_len = slots, max_len
        shape = (slots, kv_heads, max_len, head_dim)
        # Allocated empty and zeroed lazily, column block by column block, as sequences grow into
        # it (`ensure_zeroed`): the memory a long context could need is committed only when used.
        # Columns that attention reads must be zeroed before it reads them even when masked: they
        # still enter the product (times 0), and stale memory could hold NaN, which 0 * NaN spreads.
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.empty(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.num_layers = num_layers
        # Each slot's per-layer keys then values ([kv_heads, max_len, D] views), made once: loading a
        # prompt is then one batched copy, not 2 x layers indexings of module attributes.
        self._slot_views = [[t[slot] for i in range(num_layers) for t in self.layer(i)] for slot in range(slots)]
        self.zeroed = 0  # columns 0..zeroed-1 of every slot hold zeros or written keys/values

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def ensure_zeroed(self, width: int) -> None:
        """Zero columns zeroed..width-1 of every slot (per request or per column block, never per token)."""
        if width > self.zeroed:
            for buffer in self.buffers():
                buffer[:, :, self.zeroed : width].zero_()
            self.zeroed = width

    def load_row(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a prefilled prompt into `slot` at columns 0..n-1. kv[i]: layer i's ([kv_heads, n, D], same)."""
        if not kv:
            return
        n = kv[0][0].shape[1]
        self.ensure_zeroed(n)  # before writing: zeroing later would erase these columns
        torch._foreach_copy_([view[:, :n] for view in self._slot_views[slot]], [t for pair in kv for t in pair])

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
