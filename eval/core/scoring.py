"""Batched answer log-prob scoring with optional steering from a per-row position onwards.

Every prompt of an evaluation starts with the same prefix (TruthfulQA MC: the instruction and QA
primer), and a question's answers also share the question, so keys and values are computed once
for the prefix and once per question (unsteered: steering starts inside the answer) and reused by
every row and every pass. Only each answer is fed, in up to two segments on top of that cache:

    [shared prefix] [question, "\nA"] (cached) [segment A: unsteered] [segment B: steered from `steer_from`]

Rows are right-padded within a segment; the 2-D attention mask hides the pads and explicit
position ids keep each row's RoPE positions contiguous, so a row scores exactly as it would alone.
Steering goes through the server's HeadTaps (a per-row vector added at every position of
segment B) with vectors from BehaviorBank; probe scores through BehaviorBank.head_probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import DynamicCache

from eval.core.capture import AllPositionCapture
from server.engine.hf_compat import cache_kwarg, output_cache
from server.steering.artifact import SteeringArtifact
from server.steering.bank import BehaviorBank, head_weights
from server.steering.layers import attention_output_projections
from server.steering.taps import HeadTaps


@dataclass(frozen=True)
class ScoredSequence:
    ids: list[int]  # the whole prompt: shared prefix + question + "\nA:" + answer
    answer_start: int  # index of the first answer token
    context_len: int  # tokens shared with the question's other answers (prefix + question), cached once
    steer_from: int | None = None  # first position steered; None: not steered
    strength: float = 0.0  # c in a_k += c * sigma_k * u_k


@dataclass(frozen=True)
class SequenceScore:
    logprob: float  # sum of the answer tokens' log-probs
    answer_probs: list[float] | None = None  # monitor: mean P(desired) at each answer position


class MCScorer:
    def __init__(self, model, artifact: SteeringArtifact, prefix_ids: list[int], batch_rows: int = 16):
        self.model = model
        self.batch_rows = batch_rows
        o_projs = attention_output_projections(model)
        self.layers = sorted({int(layer) for layer in artifact.layers.tolist()})
        self.taps = HeadTaps(o_projs, self.layers).install()
        self.bank = BehaviorBank(artifact, o_projs, self.layers)
        self._o_projs = o_projs
        self._unit = self.bank.unit_vectors(self.bank.num_heads)  # [len(layers), hidden] at c = 1
        self._head_weights = head_weights(self.bank.num_heads, self.bank.num_heads, model.device)
        self.prefix_len = len(prefix_ids)
        self._prefix_kv = self._prefill(prefix_ids)
        self._contexts: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def close(self) -> None:
        self.taps.remove()

    @torch.inference_mode()
    def score(self, seqs: list[ScoredSequence], monitor: bool = False, desc: str | None = None) -> list[SequenceScore]:
        """Scores in the order of `seqs`; `monitor` also returns probe scores (unsteered rows only)."""
        # similar answer lengths together: the fed segments are padded to the longest in the batch
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].ids) - seqs[i].context_len, i))
        results: list[SequenceScore | None] = [None] * len(seqs)
        batches = [order[i : i + self.batch_rows] for i in range(0, len(order), self.batch_rows)]
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            for i, result in zip(batch, self._score_batch([seqs[i] for i in batch], monitor)):
                results[i] = result
        return results  # type: ignore[return-value]

    def _prefill(self, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.inference_mode(), self.taps.paused():
            ids = torch.tensor([prefix_ids], device=self.model.device)
            cache = output_cache(self.model, self.model(input_ids=ids, use_cache=True, logits_to_keep=1))
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _context_kv(self, seq: ScoredSequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the row's question tokens (after the shared prefix), computed once per question."""
        key = tuple(seq.ids[self.prefix_len : seq.context_len])
        if key not in self._contexts:
            cache = DynamicCache()
            for i, (k, v) in enumerate(self._prefix_kv):
                cache.update(k, v, i)
            p = self.prefix_len
            if key:
                with self.taps.paused():
                    ids = torch.tensor([key], device=self.model.device)
                    positions = torch.arange(p, p + len(key), device=self.model.device)[None]
                    out = self.model(input_ids=ids, position_ids=positions, **cache_kwarg(self.model, cache),
                                     use_cache=True, logits_to_keep=1)
                    cache = output_cache(self.model, out)
            # clone: a view would keep the whole prefix alive once per question
            self._contexts[key] = [(c.keys[:, :, p:].clone(), c.values[:, :, p:].clone()) for c in cache.layers]
        return self._contexts[key]

    def _batch_cache(self, seqs: list[ScoredSequence]) -> tuple[DynamicCache, torch.Tensor]:
        """Prefix + each row's question, right-padded to the longest: a cache and its [B, T] mask.

        Keys carry their RoPE positions already, so where a row's pad columns sit does not matter.
        """
        contexts = [self._context_kv(s) for s in seqs]
        lengths = [c[0][0].shape[2] for c in contexts]
        width = max(lengths)
        cache = DynamicCache()
        for i, (k, v) in enumerate(self._prefix_kv):  # [1, kv_heads, P, D]
            keys = [_pad_columns(c[i][0], width) for c in contexts]
            values = [_pad_columns(c[i][1], width) for c in contexts]
            batch = len(seqs)
            cache.update(torch.cat([k.expand(batch, -1, -1, -1), torch.cat(keys)], dim=2),
                         torch.cat([v.expand(batch, -1, -1, -1), torch.cat(values)], dim=2), i)
        mask = torch.zeros(len(seqs), self.prefix_len + width, dtype=torch.long, device=self.model.device)
        for b, n in enumerate(lengths):
            mask[b, : self.prefix_len + n] = 1
        return cache, mask

    def _score_batch(self, seqs: list[ScoredSequence], monitor: bool) -> list[SequenceScore]:
        if monitor and any(s.steer_from is not None for s in seqs):
            raise ValueError("the monitor pass reads unsteered activations; score steered rows separately")
        starts = [s.context_len for s in seqs]
        cuts = [s.steer_from if s.steer_from is not None else len(s.ids) for s in seqs]
        seg_a = [s.ids[start:cut] for s, start, cut in zip(seqs, starts, cuts)]
        seg_b = [s.ids[cut:] for s, cut in zip(seqs, cuts)]
        cache, mask = self._batch_cache(seqs)
        capture = AllPositionCapture(self._o_projs, self.layers) if monitor else None
        if capture is not None:
            with capture:
                logits_a, keep_a, cache, mask = self._forward(seg_a, starts, seqs, cache, mask)
        else:
            logits_a, keep_a, cache, mask = self._forward(seg_a, starts, seqs, cache, mask)
        totals = self._answer_logprobs(logits_a, keep_a, starts, seg_a, seqs)
        if any(seg_b):
            self.taps.steer = self._steering(seqs)
            try:
                logits_b, keep_b, _, _ = self._forward(seg_b, cuts, seqs, cache, mask)
            finally:
                self.taps.steer = None
            totals = totals + self._answer_logprobs(logits_b, keep_b, cuts, seg_b, seqs)
        probs = self._answer_probs(capture, seqs) if capture is not None else [None] * len(seqs)
        return [SequenceScore(float(t), pr) for t, pr in zip(totals.tolist(), probs)]

    def _forward(self, segments, starts, seqs, cache, mask_before):
        """Feed one right-padded segment per row on top of `cache`; returns logits of the kept tail."""
        device = self.model.device
        width = max(len(s) for s in segments)
        input_ids = torch.zeros(len(segments), width, dtype=torch.long, device=device)
        seg_mask = torch.zeros(len(segments), width, dtype=torch.long, device=device)
        for b, segment in enumerate(segments):
            input_ids[b, : len(segment)] = torch.tensor(segment, device=device)
            seg_mask[b, : len(segment)] = 1
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)[None]
        # Only positions that predict an answer token need the vocabulary projection.
        first_needed = min(max(s.answer_start - 1 - start, 0) for s, start in zip(seqs, starts))
        keep = max(width - first_needed, 1)
        attention = torch.cat([mask_before, seg_mask], dim=1)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         **cache_kwarg(self.model, cache), use_cache=True, logits_to_keep=keep)
        return out.logits, width - keep, output_cache(self.model, out), attention

    def _answer_logprobs(self, logits, offset, starts, segments, seqs) -> torch.Tensor:
        """[B] sum of log P(next token) over the positions of this segment that predict answer tokens.

        logits: [B, S - offset, V] for segment positions offset..S-1.
        """
        batch, kept, _ = logits.shape
        targets = torch.zeros(batch, kept, dtype=torch.long, device=logits.device)
        counted = torch.zeros(batch, kept, dtype=torch.bool, device=logits.device)
        for b, (seq, start, segment) in enumerate(zip(seqs, starts, segments)):
            for j in range(offset, len(segment)):
                nxt = start + j + 1  # absolute index of the token this position predicts
                if seq.answer_start <= nxt < len(seq.ids):
                    targets[b, j - offset] = seq.ids[nxt]
                    counted[b, j - offset] = True
        logits = logits.float()
        picked = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return torch.where(counted, picked, torch.zeros_like(picked)).sum(-1).cpu()

    def _steering(self, seqs: list[ScoredSequence]) -> dict[int, torch.Tensor]:
        """{layer: [B, hidden]}: each row's strength times the bank's per-layer vector."""
        strengths = torch.tensor([s.strength if s.steer_from is not None else 0.0 for s in seqs],
                                 device=self.model.device, dtype=self._unit.dtype)
        return {layer: strengths[:, None] * self._unit[slot][None] for slot, layer in enumerate(self.layers)}

    def _answer_probs(self, capture: AllPositionCapture, seqs: list[ScoredSequence]) -> list[list[float]]:
        acts = capture.stacked()  # [n_layers, B, S, H*D]
        n_layers, batch, width, hidden = acts.shape
        per_head = self.bank.head_probabilities(acts.reshape(n_layers, batch * width, hidden))  # [B*S, K]
        probs = (per_head @ self._head_weights).view(batch, width).tolist()
        return [probs[b][s.answer_start - s.context_len : len(s.ids) - s.context_len] for b, s in enumerate(seqs)]


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    """[1, H, T, D] -> [1, H, width, D], zeros after (masked, never attended)."""
    if t.shape[2] == width:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], width - t.shape[2], t.shape[3])], dim=2)
