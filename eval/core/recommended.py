"""Write the sweep's chosen values into an artifact's manifest ("recommended" only)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from eval.core.report import print_table, write_json
from server.steering.artifact import MANIFEST_FILE

log = logging.getLogger(__name__)


def write_recommended(artifact_dir: str | Path, values: dict) -> None:
    """Replace the manifest's "recommended" object, leaving every other key as it was."""
    path = Path(artifact_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["recommended"] = values
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    log.info("wrote recommended %s into %s", {k: v for k, v in values.items() if k != "chosen_by"}, path)


@dataclass(frozen=True)
class RowValues:
    alpha: float  # FASB
    threshold: float
    backtrack_tokens: int
    iti_alpha: float


def row_values(args, manifest: dict) -> RowValues:
    """Command-line values where given, else the manifest's recommendation (ITI: iti_alpha, else alpha)."""
    rec = manifest["recommended"]

    def pick(given, key, default=None):
        return given if given is not None else rec.get(key, default)

    return RowValues(
        alpha=float(pick(args.alpha, "alpha")),
        threshold=float(pick(args.threshold, "threshold")),
        backtrack_tokens=int(pick(args.backtrack_tokens, "backtrack_tokens")),
        iti_alpha=float(pick(args.iti_alpha, "iti_alpha", rec["alpha"])),
    )


def finish_sweep(args, info: dict, rows: tuple[dict, list[dict], list[dict]], best, kind: str, rule: str,
                 columns: list[str], name: str) -> dict:
    """Shared end of every sweep: print the grid and the choice (`best` over the ITI and the FASB rows),
    write the choice into the manifest when --write-recommended, save everything as JSON."""
    baseline, iti_rows, fasb_rows = rows
    best_fasb, best_iti = best(fasb_rows), best(iti_rows)
    print_table(f"{kind} sweep, {info['questions']} {args.split} questions", [baseline, *iti_rows, *fasb_rows], columns)
    print_table(f"chosen ({rule})", [best_iti, best_fasb], columns)
    payload = {**info, "baseline": baseline, "iti": iti_rows, "fasb": fasb_rows,
               "chosen": {"fasb": best_fasb, "iti": best_iti}}
    if args.write_recommended:
        extra = {"false_alarm_rate": best_fasb["false_alarm"]} if "false_alarm" in best_fasb else {}
        write_recommended(args.artifact, {
            "alpha": best_fasb["alpha"], "threshold": best_fasb["threshold"], "backtrack_tokens": args.backtrack_tokens,
            "iti_alpha": best_iti["alpha"], **extra,
            "chosen_by": f"eval {kind} sweep on {info['questions']} validation questions ({rule}): {info['command']}",
        })
    write_json(payload, args.out, name)
    return payload
