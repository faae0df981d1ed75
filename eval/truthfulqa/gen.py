"""`truthfulqa gen` and the generation sweep: chat answers through the Engine, judged offline."""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from eval.core.bootstrap import bootstrap_interval, format_interval, paired_difference
from eval.core.judge import MiniLMEmbedder, embed_references, is_uninformative, judge_answers
from eval.core.recommended import finish_sweep, row_values
from eval.core.report import print_table, write_json
from eval.core.runtime import Generated, generate, start_engine, stop_engine
from eval.truthfulqa.data import Question, load_questions, split_ids
from server.engine.types import SteeringParams
from server.steering.artifact import load_artifact

log = logging.getLogger(__name__)

GEN_COLUMNS = ["row", "alpha", "threshold", "truthful", "informative", "true_and_informative", "uninformative",
               "backtracks", "discarded_tokens", "answer_tokens", "tokens_per_s", "seconds"]


class GenerationRun:
    """The engine, the questions and the judge, shared by every row."""

    def __init__(self, args):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        self.artifact = load_artifact(args.artifact)
        if self.artifact.prompt_format != "chat":
            log.warning("artifact %s is %s-format; the server serves chat", args.artifact, self.artifact.prompt_format)
        all_questions = load_questions(Path(args.data_dir))
        ids = split_ids(self.artifact.manifest, args.split, Path(args.data_dir))[: args.limit]
        self.questions: list[Question] = [all_questions[i] for i in ids]
        self.max_tokens = args.max_tokens
        self.engine = start_engine(args.artifact, args.model, args.device, args.max_batch_size, len(self.questions))
        self.prompts = [self.engine.encode_chat([{"role": "user", "content": q.question}]) for q in self.questions]
        self.embedder = MiniLMEmbedder()
        self.references = embed_references(self.embedder, [(q.true_refs, q.false_refs) for q in self.questions])
        self.info = {"artifact": str(args.artifact), "prompt_format": self.artifact.prompt_format, "split": args.split,
                     "questions": len(self.questions), "max_tokens": args.max_tokens,
                     "max_batch_size": args.max_batch_size, "command": "python -m eval " + shlex.join(sys.argv[1:])}

    def close(self) -> None:
        stop_engine(self.engine)

    def row(self, name: str, steering: SteeringParams) -> tuple[dict, list[dict]]:
        answers, seconds = generate(self.engine, self.prompts, steering, self.max_tokens, name)
        records = self._judge(answers)
        return summary(name, steering.alpha, steering.threshold, records, seconds), records

    def _judge(self, answers: list[Generated]) -> list[dict]:
        verdicts = judge_answers(self.embedder, [a.text for a in answers], self.references)
        records = []
        for q, a, verdict in zip(self.questions, answers, verdicts):
            counts = {k: v for k, v in asdict(a).items() if k != "text"}
            records.append({"qid": q.qid, "question": q.question, "answer": a.text.strip(), **asdict(verdict),
                            "uninformative": is_uninformative(a.text), **counts})
        return records


def summary(name: str, alpha, threshold, records: list[dict], seconds: float) -> dict:
    """A row's metrics from its judged records (also pooled over folds: eval/truthfulqa/folds.py)."""
    n = len(records)
    generated = sum(r["completion_tokens"] + r["discarded_tokens"] for r in records)
    return {
        "row": name, "alpha": alpha, "threshold": threshold,
        "truthful": sum(r["truthful"] for r in records) / n,
        "informative": sum(not r["uninformative"] for r in records) / n,
        "true_and_informative": sum(r["truthful"] and not r["uninformative"] for r in records) / n,
        "uninformative": sum(r["uninformative"] for r in records) / n,
        "backtracks": sum(r["backtracks"] for r in records) / n,
        "discarded_tokens": sum(r["discarded_tokens"] for r in records) / n,
        "answer_tokens": sum(r["completion_tokens"] for r in records) / n,
        "tokens_per_s": generated / seconds if seconds else None,  # every token decoded, kept or discarded
        "seconds": round(seconds, 1),
    }


# Per-question values whose means are the summary's metrics (the ones that get intervals).
PER_QUESTION = {
    "truthful": lambda r: float(r["truthful"]),
    "informative": lambda r: float(not r["uninformative"]),
    "true_and_informative": lambda r: float(r["truthful"] and not r["uninformative"]),
    "uninformative": lambda r: float(r["uninformative"]),
    "backtracks": lambda r: float(r["backtracks"]),
    "discarded_tokens": lambda r: float(r["discarded_tokens"]),
    "answer_tokens": lambda r: float(r["completion_tokens"]),
}
DIFFERENCES = (("FASB", "baseline"), ("FASB", "ITI"))


def per_question(records: list[dict]) -> dict[str, list[float]]:
    return {metric: [value(r) for r in records] for metric, value in PER_QUESTION.items()}


def interval_report(answers: dict[str, list[dict]], seed: int = 0) -> dict:
    """Bootstrap 95% intervals of every metric per row, and paired intervals of FASB - off and FASB - ITI."""
    values = {name: per_question(records) for name, records in answers.items()}
    report = {"method": "percentile bootstrap over questions, 2000 resamples, paired for differences",
              "rows": {name: {m: bootstrap_interval(v, seed=seed) for m, v in metrics.items()}
                       for name, metrics in values.items()},
              "differences": {}}
    for a, b in DIFFERENCES:
        if a in values and b in values:
            report["differences"][f"{a} - {b}"] = {m: paired_difference(values[a][m], values[b][m], seed=seed)
                                                   for m in PER_QUESTION}
    return report


def print_intervals(report: dict) -> None:
    rows = [{"row": name, **{m: format_interval(i) for m, i in metrics.items()}}
            for name, metrics in {**report["rows"], **report["differences"]}.items()]
    print_table("means with bootstrap 95% intervals over questions (differences: paired)", rows,
                ["row", "truthful", "informative", "true_and_informative", "backtracks"])


def _fasb(alpha: float, threshold: float, backtrack_tokens: int) -> SteeringParams:
    return SteeringParams(mode="fasb", alpha=alpha, threshold=threshold, backtrack_tokens=backtrack_tokens)


def gen_rows(args) -> tuple[dict, list[dict], dict[str, list[dict]]]:
    """Baseline, ITI and FASB on the artifact's questions: (run info, row summaries, judged records per row)."""
    run = GenerationRun(args)
    try:
        values = row_values(args, run.artifact.manifest)
        rows, answers = [], {}
        for name, steering in (("baseline", SteeringParams(mode="off")),
                               ("ITI", SteeringParams(mode="always", alpha=values.iti_alpha)),
                               ("FASB", _fasb(values.alpha, values.threshold, values.backtrack_tokens))):
            row, records = run.row(name, steering)
            rows.append(row)
            answers[name] = records
    finally:
        run.close()
    return run.info | {"values": asdict(values)}, rows, answers


def run_gen(args) -> dict:
    info, rows, answers = gen_rows(args)
    print_table(f"TruthfulQA generation, {info['questions']} {args.split} questions ({args.artifact})",
                rows, GEN_COLUMNS)
    intervals = interval_report(answers)
    print_intervals(intervals)
    payload = {**info, "rows": rows, "intervals": intervals, "answers": answers}
    write_json(payload, args.out, f"truthfulqa_gen_{args.split}")
    return payload


def _best(rows: list[dict]) -> dict:
    """Most answers both judged true and informative; ties: more judged true, then the higher threshold
    (the most monitoring the false-alarm bar allows), then the first row."""
    return max(rows, key=lambda r: (r["true_and_informative"], r["truthful"], r.get("threshold") or 0.0))


def false_alarm_rates(args, thresholds) -> dict[float, float]:
    """Monitor firing rate on the committed correct answers at each threshold (s = --backtrack-tokens).

    Runs before the engine starts, so no torch work shares the process with the decode thread."""
    from eval.core.runtime import load_model_and_artifact
    from steering_artifacts.builder.false_alarm import firing_rate, load_pairs, score_answers

    loaded, artifact = load_model_and_artifact(args.model, args.artifact, args.device, args.threads,
                                               args.quantization)
    scored = score_answers(loaded.model, loaded.tokenizer, artifact, load_pairs(args.false_alarm_set),
                           args.backtrack_tokens)
    mins = [a.min_check_score for a in scored]
    del loaded
    return {t: firing_rate(mins, t) for t in thresholds}


def run_gen_sweep(args) -> dict:
    """Baseline, ITI per alpha, FASB per alpha x threshold; thresholds whose false-alarm rate on the
    correct-answer set exceeds --max-false-alarm are reported and not run (they cannot be chosen)."""
    rates = false_alarm_rates(args, args.thresholds)
    allowed = [t for t in args.thresholds if rates[t] <= args.max_false_alarm]
    for t in args.thresholds:
        log.info("threshold %.3f: false-alarm rate %.3f%s", t, rates[t],
                 "" if t in allowed else f" > {args.max_false_alarm}: skipped")
    if not allowed:
        raise SystemExit(f"no threshold in {args.thresholds} keeps false alarms <= {args.max_false_alarm} "
                         f"(rates {rates}); plain requests should default to monitor mode")
    run = GenerationRun(args)
    try:
        baseline, _ = run.row("baseline", SteeringParams(mode="off"))
        iti_rows = [run.row("ITI", SteeringParams(mode="always", alpha=a))[0] for a in args.iti_alphas]
        fasb_rows = [run.row("FASB", _fasb(a, t, args.backtrack_tokens))[0] | {"false_alarm": rates[t]}
                     for a in args.alphas for t in allowed]
    finally:
        run.close()
    info = run.info | {"false_alarm_by_threshold": {str(t): r for t, r in rates.items()},
                       "max_false_alarm": args.max_false_alarm}
    return finish_sweep(args, info, (baseline, iti_rows, fasb_rows), _best, "generation",
                        f"embedding judge, max true-and-informative, tie-breaks truthful then higher threshold, "
                        f"among thresholds with "
                        f"false alarms <= {args.max_false_alarm:g} on the correct-answer set",
                        GEN_COLUMNS + ["false_alarm"],
                        f"truthfulqa_gen_sweep_{args.split}")
