"""What the processors (server/engine/processors.py) do to the logits, batched over the rows.

Applied to the runner's [B, V] logits before sampling, in vLLM's order: repetition_penalty, then
logit_bias with presence / frequency penalties, then min_tokens (EOS banned), then the grammar's
bitmask (tokens it forbids get -inf). Each is a tensor op or two over the whole batch:
- logit_bias and presence/frequency penalties: one dense [B, V] additive tensor, built when the
  batch changes or a row backtracks (`rebuild`, from the rows' kept token counts), otherwise
  updated in place with the step's accepted tokens (`accepted`: one `index_put_`);
- repetition_penalty: two [B, V] factor tensors (for positive and negative logits; 1 where the
  token is in neither the prompt nor the answer), maintained the same way;
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
        # logit_bias minus the presence/frequency penalties so far: one add per step.
        self._additive: Tensor | None = None  # [B, V]
        self._presence: list[float] = []
        self._frequency: list[float] = []
        # repetition_penalty as two factors per token: for a positive logit and for a negative one
        # (1 where the token was not seen in the prompt or the answer): one where and one multiply.
        self._rep_pos: Tensor | None = None  # [B, V]: 1/p where seen
        self._rep_neg: Tensor | None = None  # [B, V]: p where seen
        self._repetition: list[float] = []
        self._min_tokens = False
        self._bitmask: Tensor | None = None  # [B, W] int32 on the host

    def rebuild(self, states: list[DecodingState], prompts: list[list[int]]) -> None:
        """The batch changed (rows joined, left or backtracked): rebuild every per-row tensor."""
        self._states = states
        params = [s.sampling for s in states]
        B, V, dev = len(states), self.vocab_size, self.device
        self._presence = [p.presence_penalty for p in params]
        self._frequency = [p.frequency_penalty for p in params]
        self._repetition = [p.repetition_penalty for p in params]
        self._additive = None
        if any(p.logit_bias for p in params) or any(self._presence) or any(self._frequency):
            self._additive = torch.zeros(B, V, device=dev)
            self._scatter_add(self._additive, [[(t, v) for t, v in p.logit_bias] for p in params])
            self._scatter_add(self._additive, [self._penalties(b, s) for b, s in enumerate(states)])
        self._rep_pos = self._rep_neg = None
        if any(r != 1.0 for r in self._repetition):
            self._rep_pos = torch.ones(B, V, device=dev)
            self._rep_neg = torch.ones(B, V, device=dev)
            for b, (state, prompt, r) in enumerate(zip(states, prompts, self._repetition)):
                if r != 1.0:
                    seen = sorted(set(prompt) | set(state.counts.counts))
                    self._rep_pos[b, seen] = 1.0 / r
                    self._rep_neg[b, seen] = r
        self._min_tokens = any(s.min_tokens is not None for s in states)
        self._bitmask = None
        if any(s.grammar is not None for s in states):
            self._bitmask = torch.full((B, bitmask_width(V)), -1, dtype=torch.int32)

    def _penalties(self, b: int, state: DecodingState) -> list[tuple[int, float]]:
        """Row b's presence/frequency penalties as (token, negative logit change) pairs."""
        if state.counts is None:
            return []
        pres, freq = self._presence[b], self._frequency[b]
        return [(t, -(freq * n + pres)) for t, n in state.counts.counts.items()]

    def _scatter_add(self, target: Tensor, per_row: list[list[tuple[int, float]]]) -> None:
        rows = [b for b, pairs in enumerate(per_row) for _ in pairs]
        if rows:
            ids = [t for pairs in per_row for t, _ in pairs]
            values = torch.tensor([v for pairs in per_row for _, v in pairs], device=self.device)
            target.index_put_((torch.tensor(rows, device=self.device), torch.tensor(ids, device=self.device)),
                              values, accumulate=True)

    def accepted(self, rows: list[int], tokens: list[int]) -> None:
        """Rows `rows` accepted `tokens` this step (no backtrack; their states already count them)."""
        if self._additive is not None:
            changes = [[] for _ in self._states]
            for b, t in zip(rows, tokens):
                if self._states[b].counts is not None:
                    first = self._states[b].counts.counts[t] == 1  # presence counts once per token
                    changes[b].append((t, -(self._frequency[b] + (self._presence[b] if first else 0.0))))
            self._scatter_add(self._additive, changes)
        if self._rep_pos is not None:
            seen = [(b, t) for b, t in zip(rows, tokens) if self._repetition[b] != 1.0]
            if seen:
                index = (torch.tensor([b for b, _ in seen], device=self.device),
                         torch.tensor([t for _, t in seen], device=self.device))
                self._rep_pos[index] = torch.tensor([1.0 / self._repetition[b] for b, _ in seen], device=self.device)
                self._rep_neg[index] = torch.tensor([self._repetition[b] for b, _ in seen], device=self.device)

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, V] -> adjusted float logits [B, V] (the input itself when nothing applies)."""
        banned = [s.suppress_eos for s in self._states] if self._min_tokens else []
        if self._additive is None and self._rep_pos is None and self._bitmask is None and not any(banned):
            return logits
        logits = logits.float()
        V = min(logits.shape[-1], self.vocab_size)
        if logits.shape[-1] != self.vocab_size:  # a runner that pads the vocabulary: adjust the real part
            logits = logits.clone()
        part = logits[:, :V]
        if self._rep_pos is not None:  # HF / vLLM: shrink the logits of tokens seen in prompt or answer
            part = part * torch.where(part > 0, self._rep_pos[:, :V], self._rep_neg[:, :V])
        if self._additive is not None:  # logit_bias, then OpenAI's mu[j] -= c[j] * freq + (c[j] > 0) * presence
            part = part + self._additive[:, :V]
        if any(banned):
            rows = torch.tensor(banned, device=logits.device)
            part = part.masked_fill(rows.unsqueeze(1) & self.eos_mask[:V], float("-inf"))
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
