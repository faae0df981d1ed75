"""Labelled examples for probe training: TruthfulQA's mc2 targets, a multiple-choice set, or a JSONL file.

`Example` and `Dataset` live in examples.py (the loaders import them from there) and are re-exported here."""

from __future__ import annotations

import json
from pathlib import Path

from steering_artifacts.builder.datasets_mc import MC_DATASETS, load_mc_dataset
from steering_artifacts.builder.examples import Dataset, Example

__all__ = ["Dataset", "Example", "load_dataset", "load_jsonl", "load_truthfulqa_mc2"]

TRUTHFULQA_MC_FILE = "data/mc_task.json"


def load_truthfulqa_mc2(data_dir: str | Path) -> Dataset:
    """One example per mc2 answer; the group is the question's index in mc_task.json."""
    path = Path(data_dir) / TRUTHFULQA_MC_FILE
    if not path.is_file():
        raise ValueError(f"TruthfulQA multiple-choice file not found: {path} (pass --data-dir pointing at truthfulqa/)")
    examples = [
        Example(group=str(index), label=int(label), question=row["question"], answer=answer)
        for index, row in enumerate(json.loads(path.read_text()))
        for answer, label in row["mc2_targets"].items()
    ]
    return Dataset(name="truthfulqa-mc2", source=TRUTHFULQA_MC_FILE, examples=examples)


def load_jsonl(path: str | Path) -> Dataset:
    """Lines of {"question", "answer", "label"} or {"prompt", "label"}, optional "group" or "id".

    Without "group"/"id", examples that share a question form one group (so a question's answers
    never straddle splits); prompt-only examples are their own group.
    """
    path = Path(path)
    examples = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                examples.append(_parse_jsonl_record(json.loads(line), f"{path}:{number}"))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return Dataset(name=path.stem, source=str(path), examples=examples)


def _parse_jsonl_record(record: dict, where: str) -> Example:
    label = record.get("label")
    if label not in (0, 1, True, False):
        raise ValueError(f"{where}: 'label' must be 0 or 1 (1 = desired behaviour); got {label!r}")
    has_qa = isinstance(record.get("question"), str) and isinstance(record.get("answer"), str)
    if not has_qa and not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: needs string fields 'question' and 'answer', or 'prompt'")
    group = record.get("group", record.get("id"))
    if group is None:
        group = f"q:{record['question']}" if has_qa else f"line:{where}"
    if has_qa:
        return Example(group=str(group), label=int(label), question=record["question"], answer=record["answer"])
    return Example(group=str(group), label=int(label), prompt=record["prompt"])


def load_dataset(name: str, data_dir: str | Path | None, max_items: int | None = None, seed: int = 0) -> Dataset:
    """`truthfulqa` or a multiple-choice set (both need `data_dir`), or the path of a .jsonl file."""
    if name in MC_DATASETS:
        if data_dir is None:
            raise ValueError(f"--dataset {name} needs --data-dir (e.g. ../shared/data/{name})")
        return load_mc_dataset(name, data_dir, max_items, seed)
    if name == "truthfulqa":
        if data_dir is None:
            raise ValueError("--dataset truthfulqa needs --data-dir (the truthfulqa/ folder with data/mc_task.json)")
        return load_truthfulqa_mc2(data_dir)
    if name.endswith(".jsonl"):
        return load_jsonl(name)
    raise ValueError(f"unknown dataset {name!r}: use truthfulqa, {', '.join(MC_DATASETS)} or a path ending in .jsonl")
