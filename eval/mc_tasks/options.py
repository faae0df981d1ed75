"""Multiple-choice options as scored sequences, and the accuracy rows (baseline, ITI, FASB) over them.

Each option is scored as the sum of its tokens' log-probs after "Q: {question} A:" (the builder's
`qa` text, so the probes see what they were trained on); an item is right when its correct option
scores highest (`acc`), or highest per option token (`acc_norm`). Scoring, caching and steering
go through eval/core (MCScorer: HeadTaps + BehaviorBank; one Evaluation), as for TruthfulQA.
"""

from __future__ import annotations

from dataclasses import dataclass

from eval.core.evaluation import Evaluation
from eval.core.scoring import MCScorer, ScoredSequence, SequenceScore
from eval.core.steering import DECODER
from eval.core.tokens import answer_start, common_prefix_length
from eval.mc_tasks.data import TaskItem


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
    # prompt token (DECODER in eval/core/steering.py), and the unsteered segment must not be empty.
    context = max(1, min(common_prefix_length(encoded), min(starts) - 2))
    return [OptionRow(index, k, ScoredSequence(ids, start, context))
            for k, (ids, start) in enumerate(zip(encoded, starts))]


def task_evaluation(scorer: MCScorer, items: list[TaskItem], rows: list[OptionRow]) -> Evaluation:
    """Rows steered as the server's decoder steers (from the last prompt / last kept token), scored
    as accuracy: summed option log-prob (`acc`) and per option token (`acc_norm`)."""
    def accuracy(scores: list[SequenceScore]) -> dict:
        summed = [s.logprob for s in scores]
        per_token = [s.logprob / (len(r.seq.ids) - r.seq.answer_start) for s, r in zip(scores, rows)]
        return {"acc": _pick_accuracy(items, rows, summed),
                "acc_norm": _pick_accuracy(items, rows, per_token), "items": len(items)}

    return Evaluation(scorer, [r.seq for r in rows], accuracy, DECODER, unit="options")


def monitor_summary(evaluation: Evaluation, items: list[TaskItem], rows: list[OptionRow]) -> dict:
    """What the probes say at each option's last token: mean P(correct) per class, and how often
    the option they score highest is the correct one (the probes used as the answerer)."""
    last = evaluation.last_token_probs()
    right = [p for p, r in zip(last, rows) if r.option == items[r.item].correct]
    wrong = [p for p, r in zip(last, rows) if r.option != items[r.item].correct]
    return {"mean_p_correct_options": sum(right) / len(right), "mean_p_incorrect_options": sum(wrong) / len(wrong),
            "probe_pick_accuracy": _pick_accuracy(items, rows, last)}


def _pick_accuracy(items: list[TaskItem], rows: list[OptionRow], values: list[float]) -> float:
    """Share of items whose highest-valued option is the correct one (ties: the first option wins)."""
    best: dict[int, tuple[float, int]] = {}
    for row, value in zip(rows, values):
        if row.item not in best or value > best[row.item][0]:
            best[row.item] = (value, row.option)
    return sum(best[i][1] == item.correct for i, item in enumerate(items)) / len(items)
