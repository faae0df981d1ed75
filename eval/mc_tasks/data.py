"""Multiple-choice task items for evaluation, rebuilt from an artifact's own dataset and split.

The artifact's manifest names the dataset, its subsample (`builder.max_items`, `seed`) and the
held-out groups (`split.test_ids`, `split.val_ids`); we re-load the same examples with the
builder's adapter and refuse to go on if their hash differs from the manifest's, so evaluation
items are exactly the groups the probes never trained on. An item is one question of a group with
its options (COPA groups hold an item and its mirror; other sets one item per group).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steering_artifacts.builder.datasets import Dataset, load_dataset
from steering_artifacts.builder.datasets_mc import MC_DATASETS

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class TaskItem:
    item_id: str  # group id, plus "#k" for the k-th question of a group holding several
    question: str
    options: tuple[str, ...]
    correct: int  # index of the label-1 option


def load_artifact_dataset(manifest: dict, data_root: Path) -> Dataset:
    """The build dataset, re-loaded and checked against the manifest's sha256."""
    builder = manifest["builder"]
    name = builder["dataset"]
    data_dir = data_root / name if name in MC_DATASETS else builder.get("data_dir")
    dataset = load_dataset(name, data_dir, builder.get("max_items"), builder.get("seed", 0))
    if dataset.sha256 != manifest["dataset"]["sha256"]:
        raise ValueError(
            f"dataset {name!r} read from {data_dir} differs from the one the artifact was built on "
            "(sha256 mismatch): wrong data folder or a changed adapter"
        )
    return dataset


def split_groups(manifest: dict, split: str) -> list[str]:
    recorded = manifest["split"]
    key = {"test": "test_ids", "val": "val_ids"}[split]
    if key not in recorded:
        raise ValueError(f"the manifest records no {key}; rebuild the artifact with this builder")
    return list(recorded[key])


def task_items(dataset: Dataset, groups: list[str]) -> list[TaskItem]:
    """Items of `groups`, in the order given; each needs exactly one correct option."""
    by_question: dict[tuple[str, str], list] = {}
    for example in dataset.examples:
        by_question.setdefault((example.group, example.question), []).append(example)
    by_group: dict[str, list[list]] = {}
    for (group, _), options in by_question.items():
        by_group.setdefault(group, []).append(options)
    items = []
    for group in groups:
        questions = by_group[group]
        for k, options in enumerate(questions):
            correct = [i for i, e in enumerate(options) if e.label == 1]
            if len(correct) != 1 or len(options) < 2:
                raise ValueError(f"group {group}: an item needs >= 2 options and exactly one with label 1")
            item_id = group if len(questions) == 1 else f"{group}#{k}"
            items.append(TaskItem(item_id, options[0].question, tuple(e.answer for e in options), correct[0]))
    return items
