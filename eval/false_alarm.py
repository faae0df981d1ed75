"""`python -m eval false-alarm --artifact DIR`: how often the monitor fires on plainly correct answers.

Scoring is `steering_artifacts.false_alarm` (the decoder's own check positions); this prints the
firing rate at the threshold (default: the manifest's recommended) and the lowest-scoring answers.
"""

from __future__ import annotations

import shlex
import sys

from eval.report import print_table, write_json
from eval.runtime import load_model_and_artifact
from steering_artifacts.false_alarm import (
    DEFAULT_SET,
    false_alarm_report,
    load_pairs,
    score_answers,
    separation_report,
)


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("false-alarm", help="monitor firing rate on plainly correct short answers")
    p.add_argument("--artifact", required=True, help="artifact folder (chat format: the server's monitor)")
    p.add_argument("--set", default=str(DEFAULT_SET), help="JSONL of {question, answer} correct answers")
    p.add_argument("--false-set", help="JSONL of false answers (e.g. eval/data/everyday_false.jsonl): also report "
                   "the share the monitor catches and how well it separates them from the correct ones (AUROC)")
    p.add_argument("--threshold", type=float, help="default: the manifest's recommended threshold")
    p.add_argument("--backtrack-tokens", type=int, help="s: checks start at the s-th token (default: recommended)")
    p.add_argument("--num-heads", type=int, help="top n heads (default: all)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="JSON path (default eval/results/false_alarm.json)")


def run(args) -> dict:
    loaded, artifact = load_model_and_artifact(args.model, args.artifact, args.device, args.threads)
    rec = artifact.manifest.get("recommended", {})
    threshold = args.threshold if args.threshold is not None else float(rec["threshold"])
    s = args.backtrack_tokens if args.backtrack_tokens is not None else int(rec["backtrack_tokens"])
    scored = score_answers(loaded.model, loaded.tokenizer, artifact, load_pairs(args.set), s, args.num_heads)
    report = false_alarm_report(scored, threshold, s, args.set)
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
    if args.false_set:
        caught = score_answers(loaded.model, loaded.tokenizer, artifact, load_pairs(args.false_set), s, args.num_heads)
        report["false_set"] = separation_report(scored, caught, threshold, args.false_set)
        fs = report["false_set"]
        print(f"false answers ({args.false_set}): caught {fs['caught']} of {fs['answers']} at threshold {threshold} "
              f"({100 * fs['detection_rate']:.1f}%); AUROC correct vs false {fs['auroc']:.3f}"
              + (f"; paired: correct scores higher on {fs['paired_correct_higher']} of {fs['answers']}"
                 if fs.get("paired_correct_higher") is not None else ""))
    payload = {**report, "artifact": str(args.artifact), "command": "python -m eval " + shlex.join(sys.argv[1:]),
               "answers_scored": [{"question": a.question, "answer": a.answer, "scores": a.scores,
                                   "checks": a.checks, "min_check_score": a.min_check_score} for a in scored]}
    write_json(payload, args.out, "false_alarm")
    return payload
