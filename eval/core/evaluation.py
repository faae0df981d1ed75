"""Baseline, ITI and FASB rows over scored answers, sharing one unsteered monitor pass.

A task family supplies the sequences (one per candidate answer, `ScoredSequence`), a `metrics`
function that turns one score per sequence into the row's metric columns (TruthfulQA: MC1/MC2/MC3;
the multiple-choice tasks: acc/acc_norm), and the steering `Placement` (eval/core/steering.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from eval.core.scoring import MCScorer, ScoredSequence, SequenceScore
from eval.core.steering import Placement, rescore_fired


class Evaluation:
    """`unit` names what a sequence is ("answers", "options") in the `steered_<unit>` column;
    `progress` shows a progress bar per scoring pass."""

    def __init__(self, scorer: MCScorer, seqs: list[ScoredSequence],
                 metrics: Callable[[list[SequenceScore]], dict], placement: Placement,
                 unit: str, progress: bool = False):
        self.scorer = scorer
        self.seqs = seqs
        self.metrics = metrics
        self.placement = placement
        self.steered_key = f"steered_{unit}"
        self.progress = progress
        start = time.perf_counter()
        self.baseline_scores = scorer.score(seqs, monitor=True, desc=self._desc("baseline + monitor"))
        self.baseline_seconds = time.perf_counter() - start

    def baseline(self) -> dict:
        return {"row": "baseline", **self.metrics(self.baseline_scores), "seconds": round(self.baseline_seconds, 1)}

    def iti(self, alpha: float) -> dict:
        start = time.perf_counter()
        scores = self.scorer.score([self.placement.iti(seq, alpha) for seq in self.seqs],
                                   desc=self._desc(f"ITI alpha {alpha:g}"))
        return {"row": "ITI", "alpha": alpha, **self.metrics(scores), self.steered_key: 1.0,
                "seconds": round(time.perf_counter() - start, 1)}

    def fasb(self, alpha: float, threshold: float, backtrack_tokens: int) -> dict:
        """Only sequences whose monitor check fires are re-scored; the rest keep the unsteered score."""
        start = time.perf_counter()
        scores, steered = rescore_fired(
            self.scorer, self.baseline_scores, self.seqs,
            lambda seq, trigger: self.placement.fasb(seq, trigger, alpha, backtrack_tokens),
            threshold, backtrack_tokens, desc=self._desc(f"FASB alpha {alpha:g} thr {threshold:g}"))
        strengths = [s.strength for s in steered]
        return {"row": "FASB", "alpha": alpha, "threshold": threshold, "backtrack_tokens": backtrack_tokens,
                **self.metrics(scores), self.steered_key: len(steered) / len(self.seqs),
                "mean_strength": sum(strengths) / len(strengths) if strengths else 0.0,
                "seconds": round(time.perf_counter() - start, 1)}

    def last_token_probs(self) -> list[float]:
        """The monitor's mean P(desired) at each sequence's last token, unsteered."""
        return [score.answer_probs[-1] for score in self.baseline_scores]

    def _desc(self, label: str) -> str | None:
        return label if self.progress else None
