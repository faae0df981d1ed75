"""The running batch: rows, the runner that decodes them, and the per-row tensors a step needs.

Per-row tensors (sampling parameters, steering vectors, probe head weights) change only when a
row joins, leaves or backtracks, so they are rebuilt then (`_dirty`), never per token. The runner
(server/engine/runner.py) owns the KV cache and the forward pass.

One row's failure is its own: a row whose logits are not finite, whose sampling raises or whose
bookkeeping raises fails alone, and every other row gets exactly the token it would have got.
"""

from __future__ import annotations

import logging

import torch

from server.engine.detokenizer import token_bytes, token_text
from server.engine.logits import LogitsProcessors
from server.engine.prefill import PrefillGroup
from server.engine.runner import Runner
from server.engine.sampling import SamplingTensors, compute_logprobs, sample
from server.engine.sequence import Phase, Sequence
from server.engine.types import TokenLogprob
from server.errors import ServerError
from server.steering.bank import BehaviorBank, head_weights

log = logging.getLogger(__name__)


class Batch:
    def __init__(
        self, runner: Runner, tokenizer, banks: dict[str, BehaviorBank], eos_ids: frozenset[int] = frozenset()
    ):
        self.runner = runner
        self.model = runner.model  # the scheduler prefills with it
        self.taps = runner.taps
        self.tokenizer = tokenizer
        self.banks = banks
        self.rows: list[Sequence] = []
        self._dirty = True
        self._sampling: SamplingTensors | None = None
        self._probe_weights: dict[str, torch.Tensor] = {}
        # penalties, logit_bias, min_tokens, grammar masks (server/engine/logits.py)
        self._processors = LogitsProcessors(runner.model.config.vocab_size, eos_ids, self.model.device)

    def __len__(self) -> int:
        return len(self.rows)

    def add_group(self, group: PrefillGroup) -> None:
        """Join prefilled newcomers; they decode from the next step on."""
        columns, shift = self.runner.add_group(group)
        if shift:
            for row in self.rows:
                row.cols = [c + shift for c in row.cols]
        for seq, cols in zip(group.seqs, columns):
            seq.cols = cols
            seq.phase = Phase.DECODE
        self.rows.extend(group.seqs)
        self._dirty = True

    def remove_finished(self) -> list[Sequence]:
        done = [r for r in self.rows if r.phase is Phase.DONE or r.cancelled]
        if done:
            keep = [i for i, r in enumerate(self.rows) if not (r.phase is Phase.DONE or r.cancelled)]
            self.runner.remove_rows(keep)
            self.rows = [self.rows[i] for i in keep]
            self._dirty = True
            self.runner.tidy(self.rows)
        return done

    def step(self) -> None:
        """Decode one token for every row, then let each row apply it (accept, check, backtrack)."""
        if self._dirty:
            self._rebuild()
        positions = [r.next_pos for r in self.rows]
        columns = self.runner.columns(positions)  # the cache column each row's step writes
        logits, captured = self.runner.decode([r.next_input for r in self.rows], positions)
        scores = self._probe_scores(captured)
        finite = torch.isfinite(logits).all(dim=-1)  # [B]: False where this row's numbers broke down
        tokens, failed = self._sample(self._processors.apply(logits))
        logprobs = self._logprobs(logits, tokens)
        tokens_cpu, scores_cpu, finite_cpu = _to_host(tokens, scores, finite)
        backtracked = False
        counted_rows, counted_tokens = [], []  # answer tokens accepted this step, for the penalty counts
        for b, row in enumerate(self.rows):
            if b in failed or not finite_cpu[b]:
                _fail_row(row, "the model produced non-finite numbers" if b not in failed else failed[b])
                continue
            strength = row.strength
            answer_tokens = len(row.generated)
            try:
                row.advance(columns[b], scores_cpu[b] if row.scoring else None, tokens_cpu[b], logprobs[b])
            except Exception as exc:  # a bug in one row's bookkeeping: that row fails, not the batch
                log.exception("request %s failed while applying its token", row.request.request_id)
                _fail_row(row, type(exc).__name__)
                continue
            if row.dropped_cols:
                self.runner.truncate(b, row.dropped_cols, row.next_pos)
                row.dropped_cols = []
                backtracked = True
                self._dirty = True  # the rolled-back penalty counts are rebuilt from the kept tokens
            elif len(row.generated) == answer_tokens + 1:
                counted_rows.append(b)
                counted_tokens.append(row.generated[-1])
            if row.strength != strength:
                self._dirty = True
        if not self._dirty:
            self._processors.accepted(counted_rows, counted_tokens)
        if backtracked:
            self.runner.tidy(self.rows)

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """Next tokens [B], and the rows whose sampling failed (with why). Batched; only if the
        batch raises is it redone row by row to find the rows at fault."""
        generators = [r.generator for r in self.rows]
        try:
            return sample(logits, self._sampling, generators), {}
        except Exception:
            log.exception("batched sampling failed; sampling row by row to isolate the failure")
        tokens, failed = torch.zeros(len(self.rows), dtype=torch.long, device=logits.device), {}
        for b, row in enumerate(self.rows):
            try:
                alone = SamplingTensors.from_params([row.request.sampling], logits.device)
                tokens[b] = sample(logits[b : b + 1], alone, [row.generator])[0]
            except Exception as exc:
                failed[b] = f"sampling failed ({type(exc).__name__})"
        return tokens, failed

    def _rebuild(self) -> None:
        self._sampling = SamplingTensors.from_params([r.request.sampling for r in self.rows], self.model.device)
        self._processors.rebuild([r.decoding for r in self.rows], [r.prompt for r in self.rows])
        if self.taps is not None:
            self._probe_weights = self._monitor_weights()
            self.runner.set_rows(self._steering_vectors(), any(r.scoring for r in self.rows))
        else:
            self.runner.set_rows(None, False)
        self._dirty = False

    def _steering_vectors(self) -> torch.Tensor | None:
        """[B, taps, hidden]: row b's strength times its behaviour's vector (zero if unsteered)."""
        if not any(r.strength for r in self.rows):
            return None
        per_row = []
        for row in self.rows:
            if row.strength:
                bank = self.banks[row.steering.behavior]
                per_row.append(bank.unit_vectors(row.steering.num_heads) * row.strength)
            else:
                per_row.append(None)
        template = next(v for v in per_row if v is not None)
        return torch.stack([v if v is not None else torch.zeros_like(template) for v in per_row])

    def _monitor_weights(self) -> dict[str, torch.Tensor]:
        """{behaviour: [B, K]} averaging each scoring row's top-n heads; zero rows elsewhere."""
        weights: dict[str, torch.Tensor] = {}
        for name, bank in self.banks.items():
            rows = [r.steering.num_heads if r.scoring and r.steering.behavior == name else 0 for r in self.rows]
            if any(rows):
                zero = torch.zeros(bank.num_heads, device=self.model.device)
                weights[name] = torch.stack([head_weights(n, bank.num_heads, zero.device) if n else zero for n in rows])
        return weights

    def _probe_scores(self, captured: torch.Tensor | None) -> torch.Tensor | None:
        """[B] mean P(desired) over each scoring row's heads, at the position just fed.
        captured: the tap layers' head activations [taps, B, H*D]."""
        if not self._probe_weights or captured is None:
            return None
        total = None
        for name, weights in self._probe_weights.items():
            part = (self.banks[name].head_probabilities(captured) * weights).sum(-1)
            total = part if total is None else total + part
        return total

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        wanted = [r.request.sampling.top_logprobs if r.wants_logprobs else -1 for r in self.rows]
        if max(wanted) < 0:
            return [None] * len(self.rows)
        chosen, top_values, top_ids = compute_logprobs(logits, tokens, max(max(wanted), 0))
        chosen, top_values, top_ids, ids = chosen.tolist(), top_values.tolist(), top_ids.tolist(), tokens.tolist()
        out: list[TokenLogprob | None] = []
        for b, n in enumerate(wanted):
            if n < 0:
                out.append(None)
                continue
            top = [self._entry(t, v) for t, v in zip(top_ids[b][:n], top_values[b][:n])]
            text, logprob, raw = self._entry(ids[b], chosen[b])
            out.append(TokenLogprob(text, logprob, raw, top))
        return out

    def _entry(self, token_id: int, logprob: float) -> tuple[str, float, list[int] | None]:
        return token_text(self.tokenizer, token_id), logprob, token_bytes(self.tokenizer, token_id)


def _fail_row(row: Sequence, why: str) -> None:
    log.error("request %s failed alone in the decode step: %s", row.request.request_id, why)
    row.fail(ServerError(f"generation failed for this request: {why}; other requests were not affected"))


def _to_host(
    tokens: torch.Tensor, scores: torch.Tensor | None, finite: torch.Tensor
) -> tuple[list[int], list, list[bool]]:
    """One device->host transfer (one sync) for everything the per-row decisions need."""
    n = tokens.shape[0]
    parts = [tokens.double(), finite.double()] + ([] if scores is None else [scores.double()])
    packed = torch.cat(parts).tolist()  # ids < 2**53 survive float64
    scores_cpu = packed[2 * n :] if scores is not None else [None] * n
    return [int(t) for t in packed[:n]], scores_cpu, [bool(f) for f in packed[n : 2 * n]]
