"""Prefill newcomers together: one left-padded batch, processed in column chunks.

Both runners prefill this way, with transformers' own forward (a prompt's rows are many, so the
forward's overhead is small against its matmuls); each then takes the group's keys and values
into its own cache layout (`Runner.add_group`).

Requests that arrive together (a burst of clients) are prefilled in one forward pass per chunk
instead of one pass each, so the running streams stall once per burst, not once per request. The
padded layout is exactly the batch cache's (rows right-aligned, `valid` marks real columns), so
the finished group joins the running batch in one merge.

Each row prefills its prompt minus the last token: the first decode step feeds that token, so
every sampled token comes from the same batched step (and steering can start at it).

With a prefix cache (prefix_cache.py), the group's first `cached_width` columns hold each row's
cached prefix (right-aligned, already computed) and prefill starts after them; the rest of each
row's prompt is right-aligned after that. A row may thus have a hole between the two parts:
`valid` masks it, and positions count only valid columns.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.hf_compat import cache_from, cache_kwarg, cache_layers, output_cache
from server.engine.prefix_cache import LayerKV, PrefixCache
from server.engine.sequence import Sequence
from server.steering.taps import HeadTaps


class PrefillGroup:
    def __init__(self, seqs: list[Sequence], device: torch.device, pad_id: int, prefix: PrefixCache | None = None):
        self.seqs = seqs
        contexts = [s.prompt[:-1] for s in seqs]
        hits = [prefix.lookup(c) if prefix is not None else [] for c in contexts]
        for seq, blocks in zip(seqs, hits):
            seq.cached_tokens = len(blocks) * prefix.block_tokens if prefix is not None else 0
        cached = [s.cached_tokens for s in seqs]
        self.cached_width = max(cached)
        self.width = self.cached_width + max(len(c) - n for c, n in zip(contexts, cached))
        self.input_ids = torch.full((len(seqs), self.width), pad_id, dtype=torch.long)
        self.valid = torch.zeros(len(seqs), self.width, dtype=torch.bool)
        for row, (context, n) in enumerate(zip(contexts, cached)):
            self.valid[row, self.cached_width - n : self.cached_width] = True
            rest = context[n:]
            if rest:
                self.input_ids[row, self.width - len(rest) :] = torch.tensor(rest)
                self.valid[row, self.width - len(rest) :] = True
        self.positions = (self.valid.long().cumsum(1) - 1).clamp(min=0)  # [n, W]: 0 at each first real token
        self.input_ids, self.valid, self.positions = (
            t.to(device) for t in (self.input_ids, self.valid, self.positions)
        )
        # The cached prefix may be views of the prefix cache's pool (PrefixCache.read). They are
        # consumed in the scheduler iteration that made this group, before anything is inserted:
        # by the first chunk (the forward's cache concatenates them into new tensors), or, with
        # nothing left to prefill, by joining the batch (the runner copies them into its cache).
        # A transformers cache is made only for a forward: a whole prompt found in the prefix
        # cache goes from the pool to the runner with no cache object in between.
        self._prefix: LayerKV = []  # [n, kv_heads, cached_width, D] per layer, made when first asked for
        self._row_prefix: LayerKV = []  # one row's hit as read: that row's own columns, no batch dimension
        if self.cached_width and len(seqs) == 1:
            self._row_prefix = prefix.read(hits[0])
        elif self.cached_width:
            self._prefix = _cached_columns(prefix, hits, self.cached_width)
        self.cache: DynamicCache | None = None  # the forward's, from the first chunk on
        self.done = self.cached_width  # columns prefilled (or read from the prefix cache) so far

    @property
    def finished(self) -> bool:
        return self.done >= self.width

    def run_chunk(self, model: PreTrainedModel, taps: HeadTaps | None, max_tokens: int) -> None:
        """Prefill the next columns, about `max_tokens` tokens in all rows together (`Runner.prefill`).
        The probes' hooks are paused: prompt positions are neither read nor steered."""
        with taps.paused() if taps is not None else nullcontext():
            self._forward(model, max_tokens)

    def _forward(self, model: PreTrainedModel, max_tokens: int) -> None:
        start = self.done
        end = min(self.width, start + max(1, max_tokens // len(self.seqs)))
        out = model(
            input_ids=self.input_ids[:, start:end],
            position_ids=self.positions[:, start:end],
            attention_mask=self._mask(start, end),
            **cache_kwarg(model, self._forward_cache()),
            use_cache=True,
            logits_to_keep=1,  # prefill only fills the cache: skip the vocab projection
        )
        self.cache, self._prefix, self._row_prefix = output_cache(model, out), [], []
        self.done = end

    def _forward_cache(self) -> DynamicCache:
        if self.cache is not None:
            return self.cache
        return cache_from(self.layers()) if self.cached_width else DynamicCache()

    def layers(self) -> LayerKV:
        """Per layer, the keys/values of the columns done so far ([n, kv_heads, done, D] each)."""
        if self.cache is not None:
            return cache_layers(self.cache)
        if self._row_prefix and not self._prefix:
            self._prefix = [(k[None], v[None]) for k, v in self._row_prefix]
        return self._prefix

    def row_kv(self, row: int) -> LayerKV:
        """Row `row`'s keys/values at its valid columns, in position order."""
        if self._row_prefix and self.finished:  # a lone prompt found whole: its columns as read, no holes
            return self._row_prefix
        return select_columns(self.layers(), row, self.valid[row].nonzero().squeeze(1).tolist())

    def prefix_kv(self) -> LayerKV:
        """A lone row's cached prefix, columns 0..done-1 ([kv_heads, done, D] per layer)."""
        return self._row_prefix or select_columns(self.layers(), 0, list(range(self.done)))

    def release(self) -> None:
        """The runner holds the whole prompt now (prefilled in its own cache): drop the group's copy."""
        self.cache, self._prefix, self._row_prefix, self.done = None, [], [], self.width

    def _mask(self, start: int, end: int) -> torch.Tensor:
        """[n, 1, end-start, end]: causal over real columns; a padding column sees only itself, so
        no query row is fully masked (that would put NaNs into its cached keys and values)."""
        device = self.valid.device
        query = torch.arange(start, end, device=device)[:, None]
        key = torch.arange(end, device=device)[None, :]
        allowed = (key <= query)[None] & self.valid[:, None, :end]
        allowed |= (key == query)[None]
        return allowed[:, None]


def select_columns(layers: list[tuple[torch.Tensor, torch.Tensor]], row: int, columns: list[int]) -> LayerKV:
    """Per layer, row `row`'s keys/values ([B, kv_heads, T, D] each) at `columns`: ([kv_heads, n, D], same).
    Views when the columns are one run, copies otherwise."""
    if columns and columns[-1] - columns[0] + 1 == len(columns):
        first, n = columns[0], len(columns)
        return [(k[row, :, first : first + n], v[row, :, first : first + n]) for k, v in layers]
    index = torch.tensor(columns, dtype=torch.long, device=layers[0][0].device if layers else None)
    return [(k[row].index_select(1, index), v[row].index_select(1, index)) for k, v in layers]


def _cached_columns(prefix: PrefixCache, hits: list[list[int]], width: int) -> LayerKV:
    """Per layer, [n, kv_heads, width, D] holding each row's cached prefix right-aligned (zeros before it)."""
    out: LayerKV = []
    for r, blocks in enumerate(hits):
        if not blocks:
            continue
        kv = prefix.read(blocks)  # views, valid until the next read: copied right away
        if not out:
            k0 = kv[0][0]
            out = [(k0.new_zeros(len(hits), k0.shape[0], width, k0.shape[2]),
                    k0.new_zeros(len(hits), k0.shape[0], width, k0.shape[2])) for _ in kv]
        for (keys, values), (k, v) in zip(out, kv):
            keys[r, :, width - k.shape[1] :] = k
            values[r, :, width - v.shape[1] :] = v
    return out
