"""Batched next-token sampling where every row carries its own parameters.

Continuous batching mixes requests with different temperature / top-k / top-p / seed in one
batch, so everything here works on [B, V] logits with [B] parameter tensors. Sampling uses the
exponential race (argmax of probs / Exp(1) noise), which draws the same amount of noise per row
whatever the distribution is: a seeded row then yields the same tokens no matter which other
rows share the batch or in which order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.engine.types import SamplingParams


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device; rebuild only when the batch composition changes."""

    temperature: Tensor  # [B] float; 0 = greedy
    top_k: Tensor  # [B] long; 0 = off
    top_p: Tensor  # [B] float; 1 = off
    # Host-side flags, read once here so the per-token path never syncs with the device.
    all_greedy: bool = field(init=False)
    any_top_k: bool = field(init=False)
    any_top_p: bool = field(init=False)

    def __post_init__(self) -> None:
        self.all_greedy = bool((self.temperature == 0).all())
        self.any_top_k = bool((self.top_k > 0).any())
        self.any_top_p = bool((self.top_p < 1).any())

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device | str) -> SamplingTensors:
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        )


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    # logits: [B, V] float32, temperature: [B]. Greedy rows are divided by 1 (their result is
    # replaced by argmax later) so they never produce inf/nan.
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / safe.unsqueeze(1)


def top_k_top_p_mask(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Boolean [B, V] mask of the tokens that top-k and then top-p remove."""
    # logits: [B, V]; stable sort so that ties keep the lower token id first.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [B, V] each
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[-1]))  # [B]
    removed = rank >= k.unsqueeze(1)  # [B, V] in sorted order
    # Nucleus over what top-k kept: drop a token once the tokens ranked above it already reach
    # top_p. The first token is always kept, so a row can never end up empty; rows with
    # top_p >= 1 skip this so float rounding in the cumsum cannot drop their tail.
    probs = sorted_logits.masked_fill(removed, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    nucleus_on = (top_p < 1).unsqueeze(1)  # [B, 1]
    removed |= (mass_before >= top_p.unsqueeze(1)) & (rank > 0) & nucleus_on
    return removed.scatter(1, sorted_ids, removed)  # back to vocabulary order


def logits_to_probs(logits: Tensor, st: SamplingTensors) -> Tensor:
    """Temperature, then top-k, then top-p; returns float32 probabilities [B, V]."""
    logits = apply_temperature(logits.float(), st.temperature)
    if st.any_top_k or st.any_top_p:
        logits = logits.masked_fill(top_k_top_p_mask(logits, st.top_k, st.top_p), float("-inf"))
    return logits.softmax(dim=-1)


def exponential_noise(generators: Sequence[torch.Generator | None], vocab_size: int, device: torch.device) -> Tensor:
    """Exp(1) noise [B, V], each row drawn from that row's own generator (None: the default one)."""
    if all(g is None for g in generators):
        return torch.empty(len(generators), vocab_size, device=device).exponential_()
    rows = [torch.empty(vocab_size, device=device).exponential_(generator=g) for g in generators]
    return torch.stack(rows)


def sample(logits: Tensor, st: SamplingTensors, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Next token ids [B] (long, on logits.device) for logits [B, V]."""
    if len(generators) != logits.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {logits.shape[0]} rows")
    greedy_ids = logits.argmax(dim=-1)  # [B]
    if st.all_greedy:
        return greedy_ids
    probs = logits_to_probs(logits, st)  # [B, V]
    noise = exponential_noise(generators, logits.shape[-1], logits.device)  # [B, V]
    sampled_ids = (probs / noise).argmax(dim=-1)  # [B]: the exponential race picks i with prob probs[i]
    return torch.where(st.temperature == 0, greedy_ids, sampled_ids)


def compute_logprobs(logits: Tensor, tokens: Tensor, top_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities under the model's raw distribution (OpenAI semantics: no temperature/top-p).

    logits: [B, V], tokens: [B] -> (chosen [B], top_logprobs [B, top_n], top_ids [B, top_n]).
    """
    logprobs = logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logprobs.gather(1, tokens.long().unsqueeze(1)).squeeze(1)  # [B]
    top_logprobs, top_ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)  # [B, top_n] each
    return chosen, top_logprobs, top_ids
