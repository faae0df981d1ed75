"""Automatic prefix caching: keys and values of prompt prefixes already computed, reused by later
requests (the chat template, a shared system prompt, the earlier turns of a conversation).

Tokens are cut into blocks of `block_tokens`; a block is keyed by its parent block and its own token
ids, so one key names the whole prefix up to it (as vLLM's automatic prefix caching does), and a hit
is exact: dictionary keys compare the token ids themselves. Only full blocks are kept. The server
uses blocks of one token, as SGLang's radix cache does: a prompt seen before then needs no prefill
at all, where 16-token blocks leave up to 15 tokens to a whole prefill forward; the price is a
dictionary entry per token (a millisecond per thousand tokens looked up or offered).

What a block holds is computed without steering: prefill never steers, and a finished answer offers
only its positions before the first steered one. So token ids are the whole key for one model.

Bounded: blocks live in one pool tensor sized by `--prefix-cache-mb`; when it is full, the least
recently used block goes. Nothing is pinned: a hit is copied out at once, on the worker thread that
is the cache's only user. A parent is always used more recently than its children (chains are
touched tail first), so eviction takes a prefix's tail before its head.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [kv_heads, n, head_dim]
_MAX_RUN_COPIES = 64  # a prefix in more pieces than this is gathered with one index_select


@dataclass
class _Block:
    serial: int  # never reused, so a stale child can never hang under a new parent
    slot: int  # its row of the pool


class PrefixCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 budget_bytes: int, block_tokens: int = 1):
        self.block_tokens = block_tokens
        self.bytes_per_block = num_layers * 2 * kv_heads * block_tokens * head_dim * torch.finfo(dtype).bits // 8
        self.capacity = budget_bytes // self.bytes_per_block
        # [layers, keys|values, kv_heads, positions, D]: block s holds positions s*B..(s+1)*B-1, so
        # reading a prefix is one index_select along the positions of every layer at once. torch.empty:
        # on CPU the pages are committed as blocks are written, not up front.
        self.pool = torch.empty(num_layers, 2, kv_heads, self.capacity * block_tokens, head_dim, dtype=dtype,
                                device=device)
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # least recent first
        self._free = list(range(self.capacity))[::-1]  # pop() gives 0, 1, 2...: a prefix lands in one run
        self._serials = itertools.count(1)  # 0: the root, parent of every first block
        self.evicted = 0  # blocks dropped to make room, since start
        self._stage: torch.Tensor | None = None

    @property
    def blocks_used(self) -> int:
        return len(self._blocks)

    def lookup(self, tokens: list[int]) -> list[int]:
        """Pool slots of the longest cached prefix of `tokens`, in order (block_tokens tokens each)."""
        keys, parent = [], 0
        for start in range(0, len(tokens) - self.block_tokens + 1, self.block_tokens):
            key = (parent, tuple(tokens[start : start + self.block_tokens]))
            block = self._blocks.get(key)
            if block is None:
                break
            keys.append(key)
            parent = block.serial
        self._touch(keys)
        return [self._blocks[k].slot for k in keys]

    def read(self, slots: list[int]) -> LayerKV:
        """The keys and values of blocks `slots`, concatenated: per layer ([kv_heads, n, D], same).

        These are *views*, of the pool when the blocks are consecutive in it (a prefix inserted at
        once is), else of a staging buffer kept between reads: copying tens of megabytes into fresh
        memory costs more in page faults than the copy itself. The caller must copy them out before
        the next `insert` or `read` (see PrefillGroup)."""
        b = self.block_tokens
        runs = _runs(slots)
        if len(runs) == 1:
            first, n = runs[0]
            flat = self.pool[:, :, :, first * b : (first + n) * b]
        else:  # copied into a reused staging buffer: memory already paged in
            flat = self._staging(len(slots) * b)
            if len(runs) <= _MAX_RUN_COPIES:
                at = 0
                for first, n in runs:
                    flat[:, :, :, at : at + n * b].copy_(self.pool[:, :, :, first * b : (first + n) * b])
                    at += n * b
            else:
                flat.copy_(self.pool.index_select(3, self._positions(slots)))
        return [tuple(layer.unbind(0)) for layer in flat.unbind(0)]  # unbind: one call per layer, not two indexings

    def _staging(self, n: int) -> torch.Tensor:
        """[layers, 2, kvh, n, D] of a buffer kept between reads (it grows to the longest prefix read
        from more than one run of blocks; views of it, like views of the pool, live until the next read)."""
        if self._stage is None or self._stage.shape[3] < n:
            layers, two, kvh, _, dim = self.pool.shape
            self._stage = self.pool.new_empty(layers, two, kvh, n, dim)
        return self._stage[:, :, :, :n]

    def _positions(self, slots: list[int]) -> torch.Tensor:
        index = torch.tensor(slots, dtype=torch.long, device=self.pool.device)
        if self.block_tokens == 1:
            return index
        offsets = torch.arange(self.block_tokens, device=index.device)
        return (index[:, None] * self.block_tokens + offsets).flatten()

    def insert(self, tokens: list[int], kv: LayerKV) -> None:
        """Offer `tokens` with their keys/values (kv[i]: layer i's ([kv_heads, >= len(tokens), D], same));
        the full blocks not cached yet are copied in."""
        keys, parent, new = [], 0, []  # new: (key, block index in tokens)
        chain: set[int] = set()
        for i in range(len(tokens) // self.block_tokens):
            key = (parent, tuple(tokens[i * self.block_tokens : (i + 1) * self.block_tokens]))
            block = self._blocks.get(key)
            if block is None:
                slot = self._allocate(chain)
                if slot is None:
                    break
                block = self._blocks[key] = _Block(next(self._serials), slot)
                new.append((key, i))
            self._blocks.move_to_end(key)  # so this chain's blocks are not the ones evicted for it
            keys.append(key)
            chain.add(block.serial)
            parent = block.serial
        if new:
            self._write([self._blocks[k].slot for k, _ in new], new[0][1], kv)
        self._touch(keys)

    def _allocate(self, chain: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._blocks:
            return None  # a zero budget
        key, victim = next(iter(self._blocks.items()))
        if victim.serial in chain:  # the budget holds less than this one prefix
            return None
        del self._blocks[key]
        self.evicted += 1
        return victim.slot

    def _write(self, slots: list[int], first_block: int, kv: LayerKV) -> None:
        start = first_block * self.block_tokens
        end = start + len(slots) * self.block_tokens
        index = self._positions(slots)
        for layer, (k, v) in enumerate(kv):
            for j, t in enumerate((k, v)):
                self.pool[layer, j].index_copy_(1, index, t[:, start:end].to(self.pool.dtype))

    def _touch(self, keys: list) -> None:
        for key in reversed(keys):  # tail first: the head ends up the most recently used
            self._blocks.move_to_end(key)


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """[(first, length)] of the runs of consecutive numbers in `slots`."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs
