"""TruthfulQA MC rows (baseline, ITI, FASB) on a set of questions, sharing one monitor pass."""

from __future__ import annotations

import time
from dataclasses import dataclass

from eval.mc_metrics import mean_metrics, question_metrics
from eval.mc_scoring import MCScorer, ScoredSequence, SequenceScore
from eval.mc_steering import fasb_sequence, iti_sequence, rescore_fired
from eval.prompts import ANSWER_MARK, answer_prompt, answer_start, common_prefix_length, question_prompt
from eval.truthfulqa_data import Question


@dataclass(frozen=True)
class MCItem:
    qid: str
    answer: str
    seq: ScoredSequence


def build_items(questions: list[Question], tokenizer, primer: str) -> tuple[list[MCItem], list[int]]:
    """One item per mc2 answer (mc1's choices are among them); returns the items and the shared prefix."""
    items = [item for q in questions for item in _question_items(q, tokenizer, primer)]
    shared = min(common_prefix_length([i.seq.ids for i in items]), min(i.seq.context_len for i in items))
    return items, items[0].seq.ids[:shared]


def _question_items(q: Question, tokenizer, primer: str) -> list[MCItem]:
    before = tokenizer(question_prompt(q.question, primer) + ANSWER_MARK).input_ids
    encoded = {answer: tokenizer(answer_prompt(q.question, answer, primer)).input_ids for answer in q.mc2_targets}
    starts = {answer: answer_start(ids, before) for answer, ids in encoded.items()}
    for answer, ids in encoded.items():
        if starts[answer] >= len(ids):
            raise ValueError(f"question {q.qid}: answer {answer!r} has no tokens")
    # The cached context stops before the position that predicts the first answer token (":").
    context = min(common_prefix_length(list(encoded.values())), min(starts.values()) - 1)
    return [MCItem(q.qid, a, ScoredSequence(ids, starts[a], context)) for a, ids in encoded.items()]


class MCEvaluation:
    def __init__(self, scorer: MCScorer, items: list[MCItem], questions: list[Question]):
        self.scorer = scorer
        self.items = items
        self.questions = questions
        start = time.perf_counter()
        self.baseline_scores = scorer.score([i.seq for i in items], monitor=True, desc="baseline + monitor")
        self.baseline_seconds = time.perf_counter() - start

    def baseline(self) -> dict:
        return {"row": "baseline", **self._metrics(self.baseline_scores), "seconds": round(self.baseline_seconds, 1)}

    def iti(self, alpha: float) -> dict:
        start = time.perf_counter()
        scores = self.scorer.score([iti_sequence(i.seq, alpha) for i in self.items], desc=f"ITI alpha {alpha:g}")
        return {"row": "ITI", "alpha": alpha, **self._metrics(scores), "steered_answers": 1.0,
                "seconds": round(time.perf_counter() - start, 1)}

    def fasb(self, alpha: float, threshold: float, backtrack_tokens: int) -> dict:
        """Only answers whose monitor check fires are re-scored; the rest keep the unsteered score."""
        start = time.perf_counter()
        scores, steered = rescore_fired(
            self.scorer, self.baseline_scores, [i.seq for i in self.items],
            lambda seq, trigger: fasb_sequence(seq, trigger, alpha, backtrack_tokens),
            threshold, backtrack_tokens, desc=f"FASB alpha {alpha:g} thr {threshold:g}")
        strengths = [s.strength for s in steered]
        return {"row": "FASB", "alpha": alpha, "threshold": threshold, "backtrack_tokens": backtrack_tokens,
                **self._metrics(scores), "steered_answers": len(steered) / len(self.items),
                "mean_strength": sum(strengths) / len(strengths) if strengths else 0.0,
                "seconds": round(time.perf_counter() - start, 1)}

    def monitor_summary(self) -> dict:
        """How the probes score true vs false answers at the answer's last token (a sanity check)."""
        labels = {(q.qid, a): label for q in self.questions for a, label in q.mc2_targets.items()}
        last = {True: [], False: []}
        for item, score in zip(self.items, self.baseline_scores):
            last[labels[(item.qid, item.answer)] == 1].append(score.answer_probs[-1])
        mean = {k: sum(v) / len(v) if v else float("nan") for k, v in last.items()}
        return {"mean_p_true_answers": mean[True], "mean_p_false_answers": mean[False]}

    def _metrics(self, scores: list[SequenceScore]) -> dict:
        by_question: dict[str, dict[str, float]] = {}
        for item, score in zip(self.items, scores):
            by_question.setdefault(item.qid, {})[item.answer] = score.logprob
        per_q = [question_metrics(by_question[q.qid], q.mc1_targets, q.mc2_targets) for q in self.questions]
        return {**mean_metrics(per_q), "questions": len(per_q)}
