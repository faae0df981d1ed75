"""Result tables for the terminal and JSON files for eval/results/."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}\n{format_table(rows, columns)}\n")


def write_json(payload: dict, out: str | Path | None, default_name: str) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{default_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    log.info("wrote %s", path)
    return path
