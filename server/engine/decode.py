"""The model-facing steps of the decode loop: chunked prefill and one batched decode step.

Kept free of scheduling and HTTP (gpt-fast style): each function is a forward pass plus the
cache bookkeeping it needs. The caller holds `torch.inference_mode()`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.kv_cache import BatchKVCache


def prefill_chunk(model: PreTrainedModel, cache: DynamicCache | None, token_ids: list[int], start: int) -> DynamicCache:
    """Feed prompt tokens at positions start.. into a single row's cache; returns the cache."""
    device = model.device
    input_ids = torch.tensor([token_ids], device=device)  # [1, S]
    positions = torch.arange(start, start + len(token_ids), device=device)[None]  # [1, S]
    out = model(
        input_ids=input_ids,
        position_ids=positions,
        past_key_values=cache if cache is not None else DynamicCache(),
        use_cache=True,
        logits_to_keep=1,  # prefill only fills the cache: skip the vocab projection of every position
    )
    return out.past_key_values


def decode_step(model: PreTrainedModel, cache: BatchKVCache, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token for every row. input_ids, positions: [B] -> next-token logits [B, V]."""
    mask = cache.next_column_mask()  # [B, 1, 1, T+1]
    out = model(
        input_ids=input_ids[:, None],
        position_ids=positions[:, None],
        attention_mask=mask,
        past_key_values=cache.cache if cache.cache is not None else DynamicCache(),
        use_cache=True,
    )
    cache.cache = out.past_key_values
    return out.logits[:, -1, :]
