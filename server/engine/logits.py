"""What the processors (server/engine/processors.py) do to the logits, batched over the rows.

Applied to the runner's [B, V] logits before sampling, in OpenAI's / vLLM's order:
logit_bias, then repetition / frequency / presence penalties, then min_tokens (EOS banned), then
the grammar's bitmask (tokens it forbids get -inf). Everything is one tensor op over the batch:
- logit_bias: a dense [B, V] bias built when the batch changes (`rebuild`);
- penalties: a [B, V] count tensor of each row's answer tokens, rebuilt when the batch changes or
  a row backtracks and otherwise updated in place with the step's accepted tokens (`accepted`);
  repetition_penalty also counts the prompt ([B, V] bool, built with the counts);
- min_tokens: a [B] flag from host state, times the [V] EOS mask;
- grammar: each grammar row's matcher fills its row of a [B, V/32] int32 host bitmask, which is
  copied to the device and unpacked there once.
Nothing is read back from the device, so the step keeps its single host sync (server/engine/batch.py).
A batch with none of these features pays nothing: `apply` returns the logits untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.engine.grammar import bitmask_width, unpack_bitmask
from server.engine.processors import DecodingState


class LogitsProcessors:
    def __init__(self, vocab_size: int, eos_ids: frozenset[int], device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = [i for i in eos_ids if 0 <= i < vocab_size]
        if ids:
            self.eos_mask[ids] = True
        self._states: list[DecodingState] = []
        self._bias: Tensor | None = None  # [B, V]
        self._counts: Tensor | None = None  # [B, V] float
        self._in_prompt: Tensor | None = None  # [B, V] bool, rows with repetition_penalty only
        self._presence = self._frequency = self._repetition = None  # [B, 1] each
        self._bitmask: Tensor | None = None  # [B, W] int32 on the host
        self._min_tokens = False

    def rebuild(self, states: list[DecodingState], prompts: list[list[int]]) -> None:
        """The batch changed (rows joined, left or backtracked): rebuild every per-row tensor."""
        self._states = states
        params = [s.sampling for s in states]
        B, V, dev = len(states), self.vocab_size, self.device
        self._bias = None
        if any(p.logit_bias for p in params):
            self._bias = torch.zeros(B, V, device=dev)
            rows = [b for b, p in enumerate(params) for _ in p.logit_bias]
            ids = [t for p in params for t, _ in p.logit_bias]
            values = [v for p in params for _, v in p.logit_bias]
            self._bias[rows, ids] = torch.tensor(values, device=dev)
        self._counts = self._in_prompt = None
        if any(s.counts is not None for s in states):
            self._counts = torch.zeros(B, V, device=dev)
            rows, ids = _pairs([s.counts.tokens if s.counts is not None else [] for s in states])
            self._counts.index_put_((rows.to(dev), ids.to(dev)), torch.ones(len(ids), device=dev), accumulate=True)
            self._presence = _column([p.presence_penalty for p in params], dev)
            self._frequency = _column([p.frequency_penalty for p in params], dev)
            self._repetition = None
            if any(p.repetition_penalty != 1.0 for p in params):
                self._repetition = _column([p.repetition_penalty for p in params], dev)
                self._in_prompt = torch.zeros(B, V, dtype=torch.bool, device=dev)
                prompt_ids = [prompt if p.repetition_penalty != 1.0 else [] for prompt, p in zip(prompts, params)]
                rows, ids = _pairs(prompt_ids)
                self._in_prompt[rows.to(dev), ids.to(dev)] = True
        self._min_tokens = any(s.min_tokens is not None for s in states)
        self._bitmask = None
        if any(s.grammar is not None for s in states):
            self._bitmask = torch.full((B, bitmask_width(V)), -1, dtype=torch.int32)

    def accepted(self, rows: list[int], tokens: list[int]) -> None:
        """Rows `rows` accepted `tokens` this step (no backtrack): count them."""
        if self._counts is not None and rows:
            index = (torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device))
            self._counts.index_put_(index, torch.ones(len(rows), device=self.device), accumulate=True)

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, V] -> adjusted float logits [B, V] (the input itself when nothing applies)."""
        if self._bias is None and self._counts is None and self._bitmask is None and not self._min_tokens:
            return logits
        logits = logits.float()
        V = min(logits.shape[-1], self.vocab_size)
        if logits.shape[-1] != self.vocab_size:  # a runner that pads the vocabulary: adjust the real part
            logits = logits.clone()
        part = logits[:, :V]
        if self._bias is not None:
            part = part + self._bias[:, :V]
        if self._counts is not None:
            part = self._penalise(part, V)
        if self._min_tokens:
            banned = torch.tensor([s.suppress_eos for s in self._states], device=logits.device)
            part = part.masked_fill(banned.unsqueeze(1) & self.eos_mask[:V], float("-inf"))
        if self._bitmask is not None:
            for b, state in enumerate(self._states):
                if state.grammar is not None:
                    state.grammar.matcher.fill_bitmask(self._bitmask, b)
            allowed = unpack_bitmask(self._bitmask.to(logits.device, non_blocking=True), V)
            part = part.masked_fill(~allowed, float("-inf"))
        if part.shape[-1] == logits.shape[-1]:
            return part
        logits[:, :V] = part
        logits[:, V:] = float("-inf")
        return logits

    def _penalise(self, logits: Tensor, V: int) -> Tensor:
        counts = self._counts[:, :V]
        if self._repetition is not None:
            # HF / vLLM repetition_penalty over prompt and answer: shrink the logits of seen tokens.
            seen = (counts > 0) | self._in_prompt[:, :V]
            scaled = torch.where(logits > 0, logits / self._repetition, logits * self._repetition)
            logits = torch.where(seen, scaled, logits)
        # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
        return logits - counts * self._frequency - (counts > 0).float() * self._presence


def _column(values: list[float], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _pairs(per_row: list[list[int]]) -> tuple[Tensor, Tensor]:
    rows = [b for b, ids in enumerate(per_row) for _ in ids]
    ids = [t for ids in per_row for t in ids]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long)
