"""The running batch: rows, the runner that decodes them, and the per-row tensors a step needs.

Per-row tensors (sampling parameters, steering vectors, probe head weights) change only when a
row joins, leaves or backtracks, so they are rebuilt then (`_dirty`), never per token. The runner
(server/engine/runners/) owns the KV cache and the forward pass; the batch hands it token ids and
positions, never tensors of the model.

One row's failure is its own: a row whose logits are not finite, whose sampling raises or whose
bookkeeping raises fails alone, and every other row gets exactly the token it would have got.
"""

from __future__ import annotations

import logging

import torch

from server.engine.detokenizer import token_bytes, token_text
from server.engine.logits import LogitsProcessors
from server.engine.prefix_cache import PrefixCache
from server.engine.runners import Runner
from server.engine.runners.prefill import PrefillGroup
from server.engine.sampling import SamplingTensors, compute_logprobs, sample
from server.engine.sequence import Phase, Sequence
from server.engine.types import TokenLogprob
from server.errors import ServerError
from server.steering.bank import BehaviorBank, head_weights

log = logging.getLogger(__name__)


class Batch:
    def __init__(
        self, runner: Runner, tokenizer, banks: dict[str, BehaviorBank], eos_ids: frozenset[int] = frozenset(),
        prefix_cache: PrefixCache | None = None,
    ):
        self.runner = runner
        self.prefix_cache = prefix_cache  # prompts offered when prefilled, answers when finished
        self.tokenizer = tokenizer
        self.banks = banks
        self.rows: list[Sequence] = []
        self._dirty = True
        self._sampling: SamplingTensors | None = None
        self._probe_weights: dict[str, torch.Tensor] = {}  # {behaviour: [B, K]}, in score-column order
        self._score_columns: list[tuple[int, ...]] = []  # per row: its behaviours' columns of the scores
        # penalties, logit_bias, min_tokens, grammar masks (server/engine/logits.py)
        self._processors = LogitsProcessors(runner.vocab_size, eos_ids, runner.device)

    def __len__(self) -> int:
        return len(self.rows)

    def add_group(self, group: PrefillGroup) -> None:
        """Join prefilled newcomers; they decode from the next step on."""
        self.runner.add_group(group)  # first: the group may hold views of the prefix cache
        if self.prefix_cache is not None:
            for r, seq in enumerate(group.seqs, len(self.rows)):  # now, so requests arriving while these run share it
                context = len(seq.prompt) - 1
                # a new block at least: none for one token, none for a prompt found whole (its lookup
                # already made it the most recently used)
                if context - seq.cached_tokens >= self.prefix_cache.block_tokens:
                    self.prefix_cache.insert(seq.prompt[:-1], self.runner.row_kv(r, context))
        for seq in group.seqs:
            seq.length = len(seq.prompt) - 1  # the last prompt token is the first decode step's input
            seq.phase = Phase.DECODE
        self.rows.extend(group.seqs)
        self._dirty = True

    def remove_finished(self) -> list[Sequence]:
        # Decided once per row: `cancelled` is set by the event loop's thread at any moment, and a
        # row read as running here but as cancelled a moment later would leave the batch unreturned
        # (never retired: its place in the queue would stay taken).
        gone = [r.phase is Phase.DONE or r.cancelled for r in self.rows]
        done = [r for r, g in zip(self.rows, gone) if g]
        if done:
            self._offer_answers([b for b, g in enumerate(gone) if g])
            keep = [i for i, g in enumerate(gone) if not g]
            self.runner.remove_rows(keep)
            self.rows = [self.rows[i] for i in keep]
            self._dirty = True
        return done

    def _offer_answers(self, leaving: list[int]) -> None:
        """Offer each leaving row's unsteered prompt+answer, if it was answered, to the prefix cache
        (a next chat turn starts with it) before its cache row goes."""
        if self.prefix_cache is None:
            return
        for b in leaving:
            row = self.rows[b]
            if row.reported and not row.cancelled:
                tokens = row.unsteered_tokens
                if len(tokens) >= len(row.prompt) - 1 + self.prefix_cache.block_tokens:  # a new block at least
                    self.prefix_cache.insert(tokens, self.runner.row_kv(b, len(tokens)))

    def step(self) -> None:
        """Decode one token for every row, then let each row apply it (accept, check, backtrack)."""
        if self._dirty:
            self._rebuild()
        logits, captured = self.runner.decode([r.next_input for r in self.rows], [r.next_pos for r in self.rows])
        scores = self._probe_scores(captured)
        finite = finite_rows(logits)
        tokens, failed = self._sample(self._processors.apply(logits))
        logprobs = self._logprobs(logits, tokens)
        tokens_cpu, scores_cpu, finite_cpu = _to_host(tokens, scores, finite)
        counted_rows, counted_tokens = [], []  # answer tokens accepted this step, for the penalty counts
        for b, row in enumerate(self.rows):
            if b in failed or not finite_cpu[b]:
                _fail_row(row, "the model produced non-finite numbers" if b not in failed else failed[b])
                continue
            strengths = row.strengths
            answer_tokens = len(row.generated)
            try:
                row.advance(self._row_scores(b, scores_cpu[b]), tokens_cpu[b], logprobs[b])
            except Exception as exc:  # a bug in one row's bookkeeping: that row fails, not the batch
                log.exception("request %s failed while applying its token", row.request.request_id)
                _fail_row(row, type(exc).__name__)
                continue
            if row.rolled_back:
                self.runner.rollback(b, row.next_pos)
                row.rolled_back = False
                self._dirty = True  # the rolled-back penalty counts are rebuilt from the kept tokens
            elif len(row.generated) == answer_tokens + 1:
                counted_rows.append(b)
                counted_tokens.append(row.generated[-1])
            if row.strengths != strengths:
                self._dirty = True
        if not self._dirty:
            self._processors.accepted(counted_rows, counted_tokens)

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
        self._sampling = SamplingTensors.from_params([r.request.sampling for r in self.rows], self.runner.device)
        self._processors.rebuild([r.decoding for r in self.rows], [r.prompt for r in self.rows])
        if self.runner.captures:
            self._probe_weights = self._monitor_weights()
            self.runner.set_rows(self._steering_vectors(), any(r.scoring for r in self.rows))
        else:
            self.runner.set_rows(None, False)
        self._dirty = False

    def _steering_vectors(self) -> torch.Tensor | None:
        """[B, taps, hidden]: the sum over row b's behaviours of strength times vector (zero if unsteered)."""
        if not any(any(r.strengths) for r in self.rows):
            return None
        per_row = [self._row_vector(row) for row in self.rows]
        template = next(v for v in per_row if v is not None)
        return torch.stack([v if v is not None else torch.zeros_like(template) for v in per_row])

    def _row_vector(self, row: Sequence) -> torch.Tensor | None:
        total = None
        for setting, strength in zip(row.steering.behaviors if row.steering else (), row.strengths):
            if strength:
                part = self.banks[setting.name].unit_vectors(setting.num_heads) * strength
                total = part if total is None else total + part
        return total

    def _monitor_weights(self) -> dict[str, torch.Tensor]:
        """{behaviour: [B, K]} averaging each scoring row's top-n heads of it; zero rows elsewhere.
        Also maps each row to its behaviours' columns of `_probe_scores`."""
        weights: dict[str, torch.Tensor] = {}
        for name, bank in self.banks.items():
            rows = [_heads_of(r, name) if r.scoring else 0 for r in self.rows]
            if any(rows):
                zero = torch.zeros(bank.num_heads, device=self.runner.device)
                weights[name] = torch.stack([head_weights(n, bank.num_heads, zero.device) if n else zero for n in rows])
        column = {name: j for j, name in enumerate(weights)}
        self._score_columns = [tuple(column[n] for n in r.steering.names) if r.scoring else () for r in self.rows]
        return weights

    def _probe_scores(self, captured: torch.Tensor | None) -> torch.Tensor | None:
        """[B, behaviours]: each monitored behaviour's mean P(desired) over a row's heads, at the position
        just fed (zero where a row does not monitor it). captured: the tap layers' head activations
        [taps, B, H*D]."""
        if not self._probe_weights or captured is None:
            return None
        parts = [(self.banks[name].head_probabilities(captured) * weights).sum(-1)
                 for name, weights in self._probe_weights.items()]
        return torch.stack(parts, dim=-1)

    def _row_scores(self, b: int, scores: list[float] | None) -> tuple[float, ...] | None:
        """Row b's own behaviours' scores, in the order its request listed them."""
        columns = self._score_columns[b] if b < len(self._score_columns) else ()
        return tuple(scores[j] for j in columns) if columns and scores is not None else None

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


def _heads_of(row: Sequence, name: str) -> int:
    """How many of behaviour `name`'s heads the row averages (0: it does not monitor it)."""
    return next((b.num_heads for b in row.steering.behaviors if b.name == name), 0)


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] bool: False where a row's numbers broke down. A NaN or inf anywhere makes the
    row's sum non-finite: one pass over the logits, 15x cheaper than isfinite().all() at a batch of 8
    (finite logits overflow the sum only past 1e33, numbers already broken)."""
    return torch.isfinite(logits.sum(dim=-1))


def _to_host(
    tokens: torch.Tensor, scores: torch.Tensor | None, finite: torch.Tensor
) -> tuple[list[int], list, list[bool]]:
    """One device->host transfer (one sync) for everything the per-row decisions need.
    scores: [B, behaviours] -> per row a list of floats."""
    n = tokens.shape[0]
    parts = [tokens.double(), finite.double()] + ([] if scores is None else [scores.double().flatten()])
    packed = torch.cat(parts).tolist()  # ids < 2**53 survive float64
    if scores is None:
        scores_cpu = [None] * n
    else:
        width = scores.shape[1]
        scores_cpu = [packed[2 * n + b * width : 2 * n + (b + 1) * width] for b in range(n)]
    return [int(t) for t in packed[:n]], scores_cpu, [bool(f) for f in packed[n : 2 * n]]
