"""`python -m eval mc`: per task, choose ITI/FASB values on validation items, then score held-out items.

For each task: load its artifact (`<artifact-root>/<behaviour>`), rebuild its dataset and split
(eval/mc_tasks/data.py), sweep ITI alphas and FASB alpha x threshold on the validation groups
(max acc, ties: acc_norm, then the smaller alpha / lower threshold — the lighter intervention;
the first `--val-limit` validation items, default 100, to keep the sweep affordable on a CPU),
then report baseline / ITI / FASB with those values on the held-out test groups. One table for
all tasks, plus an "average" row per method; JSON to eval/results/mc_<task>.json, and per task to
eval/results/mc_task_<task>.json, which `--resume` reuses (same settings, same artifact) so a long
run can be done task by task and still end in one table.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path

from eval.core.evaluation import Evaluation
from eval.core.recommended import write_recommended
from eval.core.report import RESULTS_DIR, print_table, write_json
from eval.core.scoring import MCScorer
from eval.mc_tasks.data import load_artifact_dataset, split_groups, task_items
from eval.mc_tasks.options import encode_items, monitor_summary, task_evaluation
from server.engine.loader import load_model
from server.steering.artifact import artifacts_root, check_compatible, load_artifact, model_slug

log = logging.getLogger(__name__)

TASK_BEHAVIORS = {"copa": "copa", "snli": "nli", "mmlu": "mmlu", "winogrande": "winogrande"}
TABLE_COLUMNS = ["task", "row", "alpha", "threshold", "acc", "acc_norm", "items", "steered_options", "seconds"]


def _evaluation(loaded, artifact, manifest: dict, args, split: str) -> tuple[Evaluation, dict]:
    """The split's evaluation (its baseline pass done) and the monitor's summary on it."""
    dataset = load_artifact_dataset(manifest, Path(args.data_root))
    limits = [n for n in (args.limit, args.val_limit if split == "val" else None) if n]
    items = task_items(dataset, split_groups(manifest, split))[: min(limits) if limits else None]
    rows, prefix = encode_items(items, loaded.tokenizer)
    log.info("%s: %d %s items, %d options", artifact.behavior, len(items), split, len(rows))
    evaluation = task_evaluation(MCScorer(loaded.model, artifact, prefix, batch_rows=args.batch_rows), items, rows)
    return evaluation, monitor_summary(evaluation, items, rows)


def _lightest_best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (round(r["acc"], 6), round(r["acc_norm"], 6), -r["alpha"], -r.get("threshold", 0)))


def sweep(evaluation: Evaluation, args) -> dict:
    """Validation rows and the chosen ITI / FASB values."""
    iti = [evaluation.iti(a) for a in args.alphas]
    fasb = [evaluation.fasb(a, t, args.backtrack_tokens) for a in args.alphas for t in args.thresholds]
    return {"baseline": evaluation.baseline(), "iti": iti, "fasb": fasb,
            "chosen": {"iti": _lightest_best(iti), "fasb": _lightest_best(fasb)}}


def run_task(loaded, task: str, args) -> dict:
    behavior = args.behavior or TASK_BEHAVIORS[task]
    artifact_dir = Path(args.artifact_root) / behavior
    artifact = load_artifact(artifact_dir)
    check_compatible(artifact, loaded.model)
    started = time.perf_counter()
    val, _ = _evaluation(loaded, artifact, artifact.manifest, args, "val")
    tuned = sweep(val, args)
    val.scorer.close()
    chosen_iti, chosen_fasb = tuned["chosen"]["iti"], tuned["chosen"]["fasb"]
    test, monitor = _evaluation(loaded, artifact, artifact.manifest, args, "test")
    rows = [test.baseline(), test.iti(chosen_iti["alpha"]),
            test.fasb(chosen_fasb["alpha"], chosen_fasb["threshold"], args.backtrack_tokens)]
    test.scorer.close()
    if args.write_recommended:
        write_recommended(artifact_dir, {
            "alpha": chosen_fasb["alpha"], "threshold": chosen_fasb["threshold"],
            "backtrack_tokens": args.backtrack_tokens, "iti_alpha": chosen_iti["alpha"],
            "chosen_by": f"eval mc sweep on {chosen_fasb['items']} validation items (max acc, tie-break acc_norm, "
                         f"then the lighter intervention): {_command()}",
        })
    return {"task": task, "behavior": behavior, "artifact": str(artifact_dir),
            "probe_accuracy": artifact.manifest.get("accuracy", {}).get("ensemble_test"),
            "validation": tuned, "test": [{"task": task, **r} for r in rows],
            "monitor_test": monitor, "seconds": round(time.perf_counter() - started, 1)}


def _average_rows(results: list[dict]) -> list[dict]:
    averaged = []
    for k, name in enumerate(("baseline", "ITI", "FASB")):
        rows = [r["test"][k] for r in results]
        averaged.append({"task": "average", "row": name, "acc": sum(r["acc"] for r in rows) / len(rows),
                         "acc_norm": sum(r["acc_norm"] for r in rows) / len(rows),
                         "items": sum(r["items"] for r in rows)})
    return averaged


def _settings(args) -> dict:
    """What a per-task result depends on besides the artifact; --resume reuses a result only if equal."""
    return {k: getattr(args, k) for k in ("limit", "val_limit", "backtrack_tokens", "model")} | {
        "alphas": list(args.alphas), "thresholds": list(args.thresholds)}


def _task_result(loaded, task: str, args) -> dict:
    """Run one task, or with --resume reuse its saved result when settings and artifact are unchanged."""
    path = RESULTS_DIR / f"mc_task_{task}" f"{f'_limit{args.limit}' if args.limit else ''}.json"
    manifest_path = Path(args.artifact_root) / (args.behavior or TASK_BEHAVIORS.get(task, task)) / "manifest.json"
    created = json.loads(manifest_path.read_text()).get("created") if manifest_path.is_file() else None
    if args.resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == _settings(args) and saved.get("artifact_created") == created:
            log.info("%s: reusing %s (--resume)", task, path)
            return saved
    result = run_task(loaded, task, args) | {"settings": _settings(args), "artifact_created": created}
    write_json(result, path, path.stem)
    return result


def _command() -> str:
    return "python -m eval " + shlex.join(sys.argv[1:])


def run_mc_tasks(args) -> dict:
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    if args.artifact_root is None:
        args.artifact_root = str(artifacts_root() / model_slug(loaded.model_id))
    tasks = list(TASK_BEHAVIORS) if args.task == "all" else [args.task]
    results = [_task_result(loaded, task, args) for task in tasks]
    table = [row for r in results for row in r["test"]] + (_average_rows(results) if len(results) > 1 else [])
    limit = f", first {args.limit} items per split" if args.limit else ""
    print_table(f"Multiple-choice accuracy on held-out items ({loaded.model_id}{limit})", table, TABLE_COLUMNS)
    for r in results:
        monitor = r["monitor_test"]
        print(f"{r['task']}: probe held-out ensemble accuracy (builder) {r['probe_accuracy']:.3f}; "
              f"probe picks the right option {monitor['probe_pick_accuracy']:.3f}; mean P(correct) "
              f"{monitor['mean_p_correct_options']:.2f} correct / {monitor['mean_p_incorrect_options']:.2f} incorrect")
    payload = {"model": loaded.model_id, "command": _command(), "limit": args.limit, "table": table,
               "tasks": results, "seconds": round(time.perf_counter() - started, 1)}
    write_json(payload, args.out, f"mc_{args.task}" + (f"_limit{args.limit}" if args.limit else ""))
    return payload
