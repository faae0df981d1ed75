"""The model-facing decode step: one token for every row of the running batch.

Kept free of scheduling and HTTP (gpt-fast style): a forward pass plus the cache bookkeeping it
needs. (Prefill: server/engine/runners/prefill.py.) The caller holds `torch.inference_mode()`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.hf_compat import cache_kwarg, output_cache
from server.engine.runners.hf.kv_cache import BatchKVCache


def decode_step(
    model: PreTrainedModel, cache: BatchKVCache, input_ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One token for every row. input_ids, positions: [B] -> next-token logits [B, V]."""
    mask = cache.next_column_mask()  # [B, 1, 1, T+1], or None when every row sees every column
    out = model(
        input_ids=input_ids[:, None],
        position_ids=positions[:, None],
        attention_mask=mask,
        **cache_kwarg(model, cache.cache if cache.cache is not None else DynamicCache()),
        use_cache=True,
    )
    cache.cache = output_cache(model, out)
    return out.logits[:, -1, :]
