"""`truthfulqa mc` and the MC sweep: MC1/MC2/MC3 rows (baseline, ITI, FASB) on held-out (or
validation) questions, one scored sequence per mc2 answer."""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from eval.core.evaluation import Evaluation
from eval.core.recommended import finish_sweep, row_values
from eval.core.report import print_table, write_json
from eval.core.runtime import load_model_and_artifact
from eval.core.scoring import MCScorer, ScoredSequence, SequenceScore
from eval.core.steering import REFERENCE
from eval.core.tokens import answer_start, common_prefix_length
from eval.truthfulqa.data import Question, load_primer, load_questions, split_ids
from eval.truthfulqa.metrics import mean_metrics, question_metrics
from eval.truthfulqa.prompts import ANSWER_MARK, answer_prompt, question_prompt

log = logging.getLogger(__name__)

MC_COLUMNS = ["row", "alpha", "threshold", "mc1", "mc2", "mc3", "steered_answers", "mean_strength", "seconds"]


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


def mc_evaluation(scorer: MCScorer, items: list[MCItem], questions: list[Question]) -> Evaluation:
    """Rows scored as the reference does (steering from the first answer token), MC1/MC2/MC3 per question."""
    def metrics(scores: list[SequenceScore]) -> dict:
        by_question: dict[str, dict[str, float]] = {}
        for item, score in zip(items, scores):
            by_question.setdefault(item.qid, {})[item.answer] = score.logprob
        per_q = [question_metrics(by_question[q.qid], q.mc1_targets, q.mc2_targets) for q in questions]
        return {**mean_metrics(per_q), "questions": len(per_q)}

    return Evaluation(scorer, [i.seq for i in items], metrics, REFERENCE, unit="answers", progress=True)


def monitor_summary(evaluation: Evaluation, items: list[MCItem], questions: list[Question]) -> dict:
    """How the probes score true vs false answers at the answer's last token (a sanity check)."""
    labels = {(q.qid, a): label for q in questions for a, label in q.mc2_targets.items()}
    last = {True: [], False: []}
    for item, p in zip(items, evaluation.last_token_probs()):
        last[labels[(item.qid, item.answer)] == 1].append(p)
    mean = {k: sum(v) / len(v) if v else float("nan") for k, v in last.items()}
    return {"mean_p_true_answers": mean[True], "mean_p_false_answers": mean[False]}


def _evaluation(args) -> tuple[Evaluation, dict, dict]:
    """The evaluation (its baseline pass done), the run's info and the monitor's sanity summary."""
    loaded, artifact = load_model_and_artifact(args.model, args.artifact, args.device, args.threads,
                                               args.quantization)
    if artifact.prompt_format != "qa":
        log.warning("artifact %s is %s-format; the MC prompts are qa text", args.artifact, artifact.prompt_format)
    data_dir = Path(args.data_dir)
    all_questions = load_questions(data_dir)
    ids = split_ids(artifact.manifest, args.split, data_dir)[: args.limit]
    questions = [all_questions[i] for i in ids]
    items, prefix = build_items(questions, loaded.tokenizer, load_primer(data_dir))
    log.info("%d %s questions, %d answers, shared prefix %d tokens",
             len(questions), args.split, len(items), len(prefix))
    scorer = MCScorer(loaded.model, artifact, prefix, batch_rows=args.batch_rows)
    info = {"artifact": str(args.artifact), "prompt_format": artifact.prompt_format, "split": args.split,
            "quantization": args.quantization,
            "questions": len(questions), "answers": len(items), "num_heads": artifact.num_heads,
            "command": "python -m eval " + shlex.join(sys.argv[1:])}
    evaluation = mc_evaluation(scorer, items, questions)
    return evaluation, info, monitor_summary(evaluation, items, questions)


def run_mc(args) -> dict:
    evaluation, info, monitor = _evaluation(args)
    values = row_values(args, evaluation.scorer.bank.artifact.manifest)
    unknown = set(args.rows) - {"baseline", "iti", "fasb"}
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)} (baseline, iti, fasb)")
    make = {"baseline": evaluation.baseline, "iti": lambda: evaluation.iti(values.iti_alpha),
            "fasb": lambda: evaluation.fasb(values.alpha, values.threshold, values.backtrack_tokens)}
    rows = [make[name]() for name in ("baseline", "iti", "fasb") if name in args.rows]
    print_table(f"TruthfulQA MC, {info['questions']} {args.split} questions ({args.artifact})", rows, MC_COLUMNS)
    payload = {**info, "rows": rows, "monitor": monitor}
    write_json(payload, args.out, f"truthfulqa_mc_{args.split}")
    return payload


def best_row(rows: list[dict]) -> dict:
    """Highest MC2, ties broken by MC1."""
    return max(rows, key=lambda r: (round(r["mc2"], 6), round(r["mc1"], 6)))


def run_mc_sweep(args) -> dict:
    if args.split != "val":
        log.warning("sweeping on the %s split: choose values on validation questions only", args.split)
    evaluation, info, _ = _evaluation(args)
    baseline = evaluation.baseline()
    iti_rows = [evaluation.iti(a) for a in args.iti_alphas]
    fasb_rows = [evaluation.fasb(a, t, args.backtrack_tokens) for a in args.alphas for t in args.thresholds]
    return finish_sweep(args, info, (baseline, iti_rows, fasb_rows), best_row, "MC", "max MC2, tie-break MC1",
                        MC_COLUMNS, f"truthfulqa_mc_sweep_{args.split}")
