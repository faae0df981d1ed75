"""`python -m eval false-alarm --artifact DIR`: how often the monitor fires on plainly correct answers.

Scoring is `steering_artifacts.builder.false_alarm` (the decoder's own check positions); this prints the
firing rate at the threshold (default: the manifest's recommended) and the lowest-scoring answers.
With `--gen-answers` the two sets are the model's own answers of a `truthfulqa gen` run instead
(judged true & informative vs not): can the monitor tell the model's true answers from its false ones?
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from eval.core.report import print_table, write_json
from eval.core.runtime import load_model_and_artifact
from steering_artifacts.builder.false_alarm import (
    DEFAULT_SET,
    false_alarm_report,
    load_pairs,
    score_answers,
    separation_report,
)


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("false-alarm", help="monitor firing rate on plainly correct short answers")
    p.set_defaults(run=run)
    p.add_argument("--artifact", required=True, help="artifact folder (chat format: the server's monitor)")
    p.add_argument("--set", default=str(DEFAULT_SET), help="JSONL of {question, answer} correct answers")
    p.add_argument("--false-set", help="JSONL of false answers (e.g. eval/data/everyday_false.jsonl): also report "
                   "the share the monitor catches and how well it separates them from the correct ones (AUROC)")
    p.add_argument("--gen-answers", help="a `truthfulqa gen` JSON: use its --gen-row answers, those the judge calls "
                   "true & informative as the correct set and the others as the false set (replaces --set/--false-set)")
    p.add_argument("--gen-row", default="baseline", help="which row's answers --gen-answers reads (default baseline)")
    p.add_argument("--threshold", type=float, help="default: the manifest's recommended threshold")
    p.add_argument("--backtrack-tokens", type=int, help="s: checks start at the s-th token (default: recommended)")
    p.add_argument("--num-heads", type=int, help="top n heads (default: all)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="JSON path (default eval/results/false_alarm.json)")


def judged_pairs(path: str | Path, row: str = "baseline") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(question, answer) pairs of one row of a `truthfulqa gen` JSON: (judged true & informative, the rest);
    empty answers are left out (no token to score)."""
    records = [r for r in json.loads(Path(path).read_text())["answers"][row] if r["answer"].strip()]  # scoreable
    good = [r["truthful"] and not r["uninformative"] for r in records]
    pairs = [(r["question"], r["answer"]) for r in records]
    return [p for p, g in zip(pairs, good) if g], [p for p, g in zip(pairs, good) if not g]


def _sets(args) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None, str, str | None]:
    """The correct and the false answers to score, with their names."""
    if args.gen_answers:
        correct, false = judged_pairs(args.gen_answers, args.gen_row)
        name = f"{args.gen_answers} ({args.gen_row} answers"
        return correct, false, f"{name}, judged true & informative)", f"{name}, judged otherwise)"
    return load_pairs(args.set), load_pairs(args.false_set) if args.false_set else None, args.set, args.false_set


def run(args) -> dict:
    loaded, artifact = load_model_and_artifact(args.model, args.artifact, args.device, args.threads)
    rec = artifact.manifest.get("recommended", {})
    threshold = args.threshold if args.threshold is not None else float(rec["threshold"])
    s = args.backtrack_tokens if args.backtrack_tokens is not None else int(rec["backtrack_tokens"])
    correct_pairs, false_pairs, correct_name, false_name = _sets(args)
    scored = score_answers(loaded.model, loaded.tokenizer, artifact, correct_pairs, s, args.num_heads)
    report = false_alarm_report(scored, threshold, s, correct_name)
    rows = [{"threshold": float(t), "firing_rate": rate} for t, rate in report["firing_rate_by_threshold"].items()]
    print_table(f"false alarms on {report['answers']} correct answers ({args.artifact}, s = {s})", rows,
                ["threshold", "firing_rate"])
    lowest = sorted(scored, key=lambda a: a.min_check_score)[:10]
    print_table("lowest-scoring correct answers (min over check positions)",
                [{"answer": a.answer, "min_score": a.min_check_score, "last_score": a.scores[-1]} for a in lowest],
                ["answer", "min_score", "last_score"])
    print(f"threshold {threshold}: fires on {report['fired']} of {report['answers']} "
          f"({100 * report['firing_rate']:.1f}%); largest threshold with <= 5%: "
          f"{report['max_threshold_at_5pct']:.3f}")
    if false_pairs is not None:
        caught = score_answers(loaded.model, loaded.tokenizer, artifact, false_pairs, s, args.num_heads)
        report["false_set"] = separation_report(scored, caught, threshold, false_name)
        fs = report["false_set"]
        print(f"false answers ({false_name}): caught {fs['caught']} of {fs['answers']} at threshold {threshold} "
              f"({100 * fs['detection_rate']:.1f}%); AUROC correct vs false {fs['auroc']:.3f}"
              + (f"; paired: correct scores higher on {fs['paired_correct_higher']} of {fs['answers']}"
                 if fs.get("paired_correct_higher") is not None else ""))
    payload = {**report, "artifact": str(args.artifact), "command": "python -m eval " + shlex.join(sys.argv[1:]),
               "answers_scored": [{"question": a.question, "answer": a.answer, "scores": a.scores,
                                   "checks": a.checks, "min_check_score": a.min_check_score} for a in scored]}
    write_json(payload, args.out, "false_alarm")
    return payload
