"""`truthfulqa mc` and the MC sweep: rows on held-out (or validation) questions."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from eval.mc_eval import MCEvaluation, build_items
from eval.mc_scoring import MCScorer
from eval.recommended import finish_sweep, row_values
from eval.report import print_table, write_json
from eval.runtime import load_model_and_artifact
from eval.truthfulqa_data import load_primer, load_questions, split_ids

log = logging.getLogger(__name__)

MC_COLUMNS = ["row", "alpha", "threshold", "mc1", "mc2", "mc3", "steered_answers", "mean_strength", "seconds"]


def _evaluation(args) -> tuple[MCEvaluation, dict]:
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
    return MCEvaluation(scorer, items, questions), info


def run_mc(args) -> dict:
    evaluation, info = _evaluation(args)
    values = row_values(args, evaluation.scorer.bank.artifact.manifest)
    unknown = set(args.rows) - {"baseline", "iti", "fasb"}
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)} (baseline, iti, fasb)")
    make = {"baseline": evaluation.baseline, "iti": lambda: evaluation.iti(values.iti_alpha),
            "fasb": lambda: evaluation.fasb(values.alpha, values.threshold, values.backtrack_tokens)}
    rows = [make[name]() for name in ("baseline", "iti", "fasb") if name in args.rows]
    print_table(f"TruthfulQA MC, {info['questions']} {args.split} questions ({args.artifact})", rows, MC_COLUMNS)
    payload = {**info, "rows": rows, "monitor": evaluation.monitor_summary()}
    write_json(payload, args.out, f"truthfulqa_mc_{args.split}")
    return payload


def best_row(rows: list[dict]) -> dict:
    """Highest MC2, ties broken by MC1."""
    return max(rows, key=lambda r: (round(r["mc2"], 6), round(r["mc1"], 6)))


def run_mc_sweep(args) -> dict:
    if args.split != "val":
        log.warning("sweeping on the %s split: choose values on validation questions only", args.split)
    evaluation, info = _evaluation(args)
    baseline = evaluation.baseline()
    iti_rows = [evaluation.iti(a) for a in args.iti_alphas]
    fasb_rows = [evaluation.fasb(a, t, args.backtrack_tokens) for a in args.alphas for t in args.thresholds]
    return finish_sweep(args, info, (baseline, iti_rows, fasb_rows), best_row, "MC", "max MC2, tie-break MC1",
                        MC_COLUMNS, f"truthfulqa_mc_sweep_{args.split}")
