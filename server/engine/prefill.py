"""Prefill newcomers together: one left-padded batch, processed in column chunks.

Requests that arrive together (a burst of clients) are prefilled in one forward pass per chunk
instead of one pass each, so the running streams stall once per burst, not once per request. The
padded layout is exactly the batch cache's (rows right-aligned, `valid` marks real columns), so
the finished group joins the running batch in one merge.

Each row prefills its prompt minus the last token: the first decode step feeds that token, so
every sampled token comes from the same batched step (and steering can start at it).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.hf_compat import cache_kwarg, output_cache
from server.engine.sequence import Sequence


class PrefillGroup:
    def __init__(self, seqs: list[Sequence], device: torch.device, pad_id: int):
        self.seqs = seqs
        contexts = [s.prompt[:-1] for s in seqs]
        self.width = max(len(c) for c in contexts)
        self.input_ids = torch.full((len(seqs), self.width), pad_id, dtype=torch.long)
        self.valid = torch.zeros(len(seqs), self.width, dtype=torch.bool)
        for row, context in enumerate(contexts):
            if context:
                self.input_ids[row, self.width - len(context) :] = torch.tensor(context)
                self.valid[row, self.width - len(context) :] = True
        self.positions = (self.valid.long().cumsum(1) - 1).clamp(min=0)  # [n, W]: 0 at each first real token
        self.input_ids, self.valid, self.positions = (
            t.to(device) for t in (self.input_ids, self.valid, self.positions)
        )
        self.cache: DynamicCache | None = None
        self.done = 0  # columns prefilled so far

    @property
    def finished(self) -> bool:
        return self.done >= self.width

    def run_chunk(self, model: PreTrainedModel, max_tokens: int) -> None:
        """Prefill the next columns, about `max_tokens` tokens in all rows together."""
        start = self.done
        end = min(self.width, start + max(1, max_tokens // len(self.seqs)))
        out = model(
            input_ids=self.input_ids[:, start:end],
            position_ids=self.positions[:, start:end],
            attention_mask=self._mask(start, end),
            **cache_kwarg(model, self.cache if self.cache is not None else DynamicCache()),
            use_cache=True,
            logits_to_keep=1,  # prefill only fills the cache: skip the vocab projection
        )
        self.cache = output_cache(model, out)
        self.done = end

    def _mask(self, start: int, end: int) -> torch.Tensor:
        """[n, 1, end-start, end]: causal over real columns; a padding column sees only itself, so
        no query row is fully masked (that would put NaNs into its cached keys and values)."""
        device = self.valid.device
        query = torch.arange(start, end, device=device)[:, None]
        key = torch.arange(end, device=device)[None, :]
        allowed = (key <= query)[None] & self.valid[:, None, :end]
        allowed |= (key == query)[None]
        return allowed[:, None]
