"""`truthfulqa gen --folds-dir DIR`: generation over every fold of a cross-validated build, pooled.

Each `DIR/fold-<i>` artifact (`python -m steering_artifacts build ... --folds K --fold all`) was built
without its own test questions; each fold's rows run on that fold's test questions with that fold's
artifact, and the judged answers of all folds are pooled into one table with bootstrap intervals over
every pooled question (eval/README.md, "Cross-validated over all questions").
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from eval.core.report import print_table, write_json
from eval.truthfulqa.data import load_questions
from eval.truthfulqa.gen import GEN_COLUMNS, gen_rows, interval_report, print_intervals, summary
from server.steering.artifact import MANIFEST_FILE, load_artifact

log = logging.getLogger(__name__)

FOLD_COLUMNS = ["fold", "questions", "alpha", "threshold", "backtrack_tokens", "iti_alpha",
                "baseline", "ITI", "FASB", "seconds"]


def fold_artifacts(folds_dir: str | Path) -> list[tuple[Path, dict]]:
    """The fold folders (those with a manifest) and their manifests' `split`, in fold order."""
    found = []
    for folder in sorted(Path(folds_dir).iterdir()):
        if (folder / MANIFEST_FILE).is_file():
            split = load_artifact(folder).manifest["split"]
            if "fold" not in split:
                raise ValueError(f"{folder} is not a fold artifact (its manifest's split has no 'fold')")
            found.append((folder, split))
    if not found:
        raise ValueError(f"no fold artifacts (folders with {MANIFEST_FILE}) in {folds_dir}")
    return sorted(found, key=lambda item: item[1]["fold"])


def check_folds(splits: list[dict], total: int) -> int:
    """Folds must test disjoint questions (else a question counts twice); returns how many they cover."""
    seen: set[str] = set()
    for split in splits:
        overlap = seen & set(split["test_ids"])
        if overlap:
            raise ValueError(f"fold {split['fold']} tests {len(overlap)} questions another fold also tests")
        seen |= set(split["test_ids"])
    k = splits[0]["folds"]
    if any(split["folds"] != k for split in splits):
        raise ValueError(f"fold artifacts of different k-fold splits: {sorted({s['folds'] for s in splits})}")
    if len(splits) < k:
        log.warning("partial cross-validation: folds %s of %d", [s["fold"] for s in splits], k)
    log.info("%d folds cover %d of %d questions", len(splits), len(seen), total)
    return len(seen)


def _common(values: list) -> float | str | None:
    """One value when every fold used it (CLI values, or equal manifests), else 'per fold'."""
    return values[0] if len(set(values)) == 1 else "per fold"


def pooled_rows(per_fold: list[dict], pooled: dict[str, list[dict]]) -> list[dict]:
    """Each row's summary over the pooled records; seconds are the folds' sum."""
    rows = []
    for k, name in enumerate(pooled):
        fold_rows = [fold["rows"][k] for fold in per_fold]
        rows.append(summary(name, _common([r["alpha"] for r in fold_rows]),
                            _common([r["threshold"] for r in fold_rows]), pooled[name],
                            sum(r["seconds"] for r in fold_rows)))
    return rows


def _fold_table(per_fold: list[dict]) -> list[dict]:
    """Per fold: its questions, the values it ran with, and each row's true & informative share."""
    return [{"fold": f["fold"], "questions": f["questions"], **f["values"], "seconds": f["seconds"],
             **{r["row"]: r["true_and_informative"] for r in f["rows"]}} for f in per_fold]


def _payload(args, per_fold: list[dict], pooled: dict[str, list[dict]], covered: int, total: int) -> dict:
    return {"folds_dir": str(args.folds_dir), "command": "python -m eval " + shlex.join(sys.argv[1:]),
            "folds_run": [f["fold"] for f in per_fold],
            "questions": len(next(iter(pooled.values()))),  # every row answers the same questions
            "covered_by_folds": covered, "total_questions": total, "rows": pooled_rows(per_fold, pooled),
            "intervals": interval_report(pooled), "per_fold": per_fold, "answers": pooled}


def run_gen_folds(args) -> dict:
    folds = fold_artifacts(args.folds_dir)
    total = len(load_questions(Path(args.data_dir)))
    covered = check_folds([split for _, split in folds], total)
    per_fold: list[dict] = []
    pooled: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for n, (folder, split) in enumerate(folds, start=1):
        log.info("fold %d (%d/%d): %s, %d test questions", split["fold"], n, len(folds), folder,
                 len(split["test_ids"]))
        fold_start = time.perf_counter()
        info, rows, answers = gen_rows(argparse.Namespace(**{**vars(args), "artifact": str(folder), "split": "test"}))
        per_fold.append({"fold": split["fold"], "artifact": str(folder), "questions": info["questions"],
                         "values": info["values"], "rows": rows,
                         "seconds": round(time.perf_counter() - fold_start, 1)})
        for name, records in answers.items():
            pooled.setdefault(name, []).extend(records)
        # Written after every fold, so a run stopped early still leaves the pooled folds done so far.
        payload = _payload(args, per_fold, pooled, covered, total)
        write_json(payload, args.out, "truthfulqa_gen_folds")
        elapsed = time.perf_counter() - started
        log.info("fold %d done; %.0fs so far, ~%.0fs to go", split["fold"], elapsed, elapsed / n * (len(folds) - n))
    print_table(f"TruthfulQA generation, cross-validated: {payload['questions']} test questions of {total}, "
                f"folds {payload['folds_run']} ({args.folds_dir})", payload["rows"], GEN_COLUMNS)
    print_table("per fold (true & informative by row)", _fold_table(per_fold), FOLD_COLUMNS)
    print_intervals(payload["intervals"])
    return payload
