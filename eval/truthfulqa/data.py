"""TruthfulQA questions and the artifact's held-out split.

Question ids are indices into data/mc_task.json, as the artifact builder's groups are, so the
manifest's `split.test_ids` name the questions the probes never saw.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MC_FILE = "data/mc_task.json"
CSV_FILE = "TruthfulQA.csv"
PRIMER_FILE = "QA_PRIMER.txt"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "truthfulqa"


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    mc1_targets: dict[str, int]
    mc2_targets: dict[str, int]
    true_refs: tuple[str, ...] = ()  # CSV Best Answer + Correct Answers, for the generation judge
    false_refs: tuple[str, ...] = ()  # CSV Incorrect Answers


def load_primer(data_dir: Path) -> str:
    return (data_dir / PRIMER_FILE).read_text().strip()


def _split_answers(text: str) -> list[str]:
    return [part.strip() for part in text.split(";") if part.strip()]


def _csv_references(data_dir: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """question text -> (true references, false references)."""
    refs = {}
    with (data_dir / CSV_FILE).open(encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            true = [row["Best Answer"].strip()] + _split_answers(row["Correct Answers"])
            false = _split_answers(row["Incorrect Answers"])
            refs[row["Question"].strip()] = (tuple(dict.fromkeys(true)), tuple(false))
    return refs


def load_questions(data_dir: Path) -> dict[str, Question]:
    rows = json.loads((data_dir / MC_FILE).read_text())
    refs = _csv_references(data_dir)
    questions = {}
    for index, row in enumerate(rows):
        true, false = refs.get(row["question"].strip(), ((), ()))
        qid = str(index)
        questions[qid] = Question(qid, row["question"], row["mc1_targets"], row["mc2_targets"], true, false)
    return questions


def split_ids(manifest: dict, split: str, data_dir: Path) -> list[str]:
    """The artifact's test question ids, or its validation ids (recorded, else re-derived)."""
    recorded = manifest.get("split", {})
    if split == "test":
        return list(recorded["test_ids"])
    if "val_ids" in recorded:
        return list(recorded["val_ids"])
    return _derive_val_ids(recorded, data_dir)


def _derive_val_ids(recorded: dict, data_dir: Path) -> list[str]:
    """Re-run the builder's seeded split; it must reproduce the recorded test ids exactly."""
    from steering_artifacts.builder.datasets import load_truthfulqa_mc2
    from steering_artifacts.builder.split import split_by_group

    fractions = tuple(recorded["fractions"][k] for k in ("train", "val", "test"))
    split = split_by_group(load_truthfulqa_mc2(data_dir).groups(), fractions, recorded["seed"])
    if split.test_groups != list(recorded["test_ids"]):
        raise ValueError("re-deriving the split did not reproduce the manifest's test ids; record val ids in it")
    log.info("manifest has no val ids: re-derived %d from the builder's seeded split (seed %s)",
             len(split.val_groups), recorded["seed"])
    return split.val_groups
