"""Accuracy rows (baseline, ITI, FASB) for one multiple-choice task, sharing one monitor pass.

Each option is scored as the sum of its tokens' log-probs after "Q: {question} A:" (the builder's
`qa` text, so the probes see what they were trained on); an item is right when its correct option
scores highest (`acc`), or highest per option token (`acc_norm`). Scoring, caching and steering
go through eval/mc_scoring.MCScorer (HeadTaps + BehaviorBank), as for TruthfulQA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from eval.mc_scoring import MCScorer, ScoredSequence, SequenceScore
from eval.mc_steering import rescore_fired
from eval.mc_tasks_data import TaskItem
from eval.mc_tasks_steering import fasb_from_last_kept, iti_from_prompt_end
from eval.prompts import answer_start, common_prefix_length


@dataclass(frozen=True)
class OptionRow:
    item: int  # index into the items
    option: int
    seq: ScoredSequence


def encode_items(items: list[TaskItem], tokenizer) -> tuple[list[OptionRow], list[int]]:
    """One row per option; returns the rows and the token prefix every row shares."""
    rows = [row for index, item in enumerate(items) for row in _item_rows(index, item, tokenizer)]
    shared = min(common_prefix_length([r.seq.ids for r in rows]), min(r.seq.context_len for r in rows))
    return rows, rows[0].seq.ids[:shared]


def _item_rows(index: int, item: TaskItem, tokenizer) -> list[OptionRow]:
    before = tokenizer(f"Q: {item.question} A:").input_ids
    encoded = [tokenizer(f"Q: {item.question} A: {option}").input_ids for option in item.options]
    starts = [answer_start(ids, before) for ids in encoded]
    if any(start >= len(ids) for start, ids in zip(starts, encoded)):
        raise ValueError(f"item {item.item_id}: an option has no tokens")
    # Cached context ends two tokens before the first option token: steering may start at the last
    # prompt token (eval/mc_tasks_steering.py), and the unsteered segment must not be empty.
    context = max(1, min(common_prefix_length(encoded), min(starts) - 2))
    return [OptionRow(index, k, ScoredSequence(ids, start, context))
            for k, (ids, start) in enumerate(zip(encoded, starts))]


class TaskEvaluation:
    def __init__(self, scorer: MCScorer, items: list[TaskItem], rows: list[OptionRow]):
        self.scorer = scorer
        self.items = items
        self.rows = rows
        start = time.perf_counter()
        self.baseline_scores = scorer.score([r.seq for r in rows], monitor=True)
        self.baseline_seconds = time.perf_counter() - start

    def baseline(self) -> dict:
        return {"row": "baseline", **self._accuracy(self.baseline_scores), "seconds": round(self.baseline_seconds, 1)}

    def iti(self, alpha: float) -> dict:
        start = time.perf_counter()
        scores = self.scorer.score([iti_from_prompt_end(r.seq, alpha) for r in self.rows])
        return {"row": "ITI", "alpha": alpha, **self._accuracy(scores), "steered_options": 1.0,
                "seconds": round(time.perf_counter() - start, 1)}

    def fasb(self, alpha: float, threshold: float, backtrack_tokens: int) -> dict:
        """Options whose monitor check fires are re-scored with steering; the rest keep their score."""
        start = time.perf_counter()
        scores, steered = rescore_fired(
            self.scorer, self.baseline_scores, [r.seq for r in self.rows],
            lambda seq, trigger: fasb_from_last_kept(seq, trigger, alpha, backtrack_tokens),
            threshold, backtrack_tokens)
        strengths = [s.strength for s in steered]
        return {"row": "FASB", "alpha": alpha, "threshold": threshold, "backtrack_tokens": backtrack_tokens,
                **self._accuracy(scores), "steered_options": len(steered) / len(self.rows),
                "mean_strength": sum(strengths) / len(strengths) if strengths else 0.0,
                "seconds": round(time.perf_counter() - start, 1)}

    def monitor_summary(self) -> dict:
        """What the probes say at each option's last token: mean P(correct) per class, and how often
        the option they score highest is the correct one (the probes used as the answerer)."""
        last = [s.answer_probs[-1] for s in self.baseline_scores]
        right = [p for p, r in zip(last, self.rows) if r.option == self.items[r.item].correct]
        wrong = [p for p, r in zip(last, self.rows) if r.option != self.items[r.item].correct]
        return {"mean_p_correct_options": sum(right) / len(right), "mean_p_incorrect_options": sum(wrong) / len(wrong),
                "probe_pick_accuracy": _pick_accuracy(self.items, self.rows, last)}

    def _accuracy(self, scores: list[SequenceScore]) -> dict:
        summed = [s.logprob for s in scores]
        per_token = [s.logprob / (len(r.seq.ids) - r.seq.answer_start) for s, r in zip(scores, self.rows)]
        return {"acc": _pick_accuracy(self.items, self.rows, summed),
                "acc_norm": _pick_accuracy(self.items, self.rows, per_token), "items": len(self.items)}


def _pick_accuracy(items: list[TaskItem], rows: list[OptionRow], values: list[float]) -> float:
    """Share of items whose highest-valued option is the correct one (ties: the first option wins)."""
    best: dict[int, tuple[float, int]] = {}
    for row, value in zip(rows, values):
        if row.item not in best or value > best[row.item][0]:
            best[row.item] = (value, row.option)
    return sum(best[i][1] == item.correct for i, item in enumerate(items)) / len(items)
