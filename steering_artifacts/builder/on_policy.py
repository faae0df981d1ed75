"""On-policy probe training data: the model's own answers to the training questions, labelled by the judge.

The monitor judges the model's own answers (steering_artifacts/README.md, "Probes trained where they
are used"), so the builder can add them to the reference answers: for every *training* question, the
greedy answer and a few sampled ones (`steering_artifacts/builder/generate.py`), each labelled 1 when its
closest true reference answer of the question is closer than its closest false one (the embedding
judge, `steering_artifacts/builder/judge.py`, as `python -m eval truthfulqa gen` judges). The references are
the question's own answers in the build dataset (TruthfulQA: its mc2 targets). Validation and test
questions never get on-policy answers, so the split stays by question.

The labelled answers are cached as `on_policy.jsonl` (+ `on_policy.json`, the settings they were
made with) in the build's output folder; a rerun with the same settings and questions reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from steering_artifacts.builder.datasets import Dataset, Example
from steering_artifacts.builder.generate import Answer, Sampling, generate_answers
from steering_artifacts.builder.split import Split

log = logging.getLogger(__name__)

ANSWERS_FILE = "on_policy.jsonl"
SETTINGS_FILE = "on_policy.json"
JUDGE = ("embedding judge (steering_artifacts/builder/judge.py, all-MiniLM-L6-v2): label 1 when the closest true "
         "reference answer of the question is closer than the closest false one")


@dataclass(frozen=True)
class TrainingQuestion:
    group: str
    question: str
    true_refs: tuple[str, ...]
    false_refs: tuple[str, ...]


def training_questions(dataset: Dataset, split: Split) -> list[TrainingQuestion]:
    """The training split's questions with their reference answers (validation and test ones never)."""
    by_group: dict[str, list[Example]] = {}
    for i in split.train:
        example = dataset.examples[int(i)]
        if example.question is not None and example.answer is not None:
            by_group.setdefault(example.group, []).append(example)
    return [TrainingQuestion(group, members[0].question,
                             tuple(e.answer for e in members if e.label == 1),
                             tuple(e.answer for e in members if e.label == 0))
            for group, members in by_group.items()]


def label_answers(embedder, questions: list[TrainingQuestion], answers: list[Answer]) -> list[dict]:
    """One record per answer: its question, text, kind and the judge's label with both similarities."""
    from steering_artifacts.builder.judge import embed_references, judge_answers

    references = embed_references(embedder, [(q.true_refs, q.false_refs) for q in questions])
    verdicts = judge_answers(embedder, [a.text for a in answers], [references[a.question_index] for a in answers])
    return [{"group": questions[a.question_index].group, "question": questions[a.question_index].question,
             "answer": a.text, "kind": a.kind, "label": int(v.truthful),
             "max_true": round(v.max_true, 4), "max_false": round(v.max_false, 4)}
            for a, v in zip(answers, verdicts)]


def _settings(model_id: str, sampling: Sampling, questions: list[TrainingQuestion]) -> dict:
    groups = hashlib.sha256("\n".join(q.group for q in questions).encode()).hexdigest()
    return {"model_id": model_id, "sampling": asdict(sampling), "questions": len(questions),
            "groups_sha256": groups, "judge": JUDGE}


def _cached(folder: Path, settings: dict) -> list[dict] | None:
    answers, recorded = folder / ANSWERS_FILE, folder / SETTINGS_FILE
    if not (answers.is_file() and recorded.is_file()) or json.loads(recorded.read_text()) != settings:
        return None
    return [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]


def _store(folder: Path, settings: dict, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ANSWERS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def make_embedder():
    """The judge's sentence embedder (tests replace this)."""
    from steering_artifacts.builder.judge import MiniLMEmbedder

    return MiniLMEmbedder()


def on_policy_records(loaded, dataset: Dataset, split: Split, sampling: Sampling, folder: Path,
                      progress: bool = True) -> list[dict]:
    """The training questions' own answers, labelled; from `folder`'s cache when it matches."""
    questions = training_questions(dataset, split)
    settings = _settings(loaded.model_id, sampling, questions)
    records = _cached(folder, settings)
    if records is not None:
        log.info("on-policy answers: reusing %d from %s", len(records), folder / ANSWERS_FILE)
        return records
    answers = generate_answers(loaded.model, loaded.tokenizer, [q.question for q in questions], sampling, progress)
    records = label_answers(make_embedder(), questions, answers)
    _store(folder, settings, records)
    log.info("on-policy answers: generated %d for %d training questions, wrote %s",
             len(records), len(questions), folder / ANSWERS_FILE)
    return records


def as_dataset(records: list[dict], folder: Path) -> Dataset:
    """The labelled answers as training examples (each in its question's group)."""
    examples = [Example(group=r["group"], label=int(r["label"]), question=r["question"], answer=r["answer"])
                for r in records]
    return Dataset(name="on-policy", source=str(folder / ANSWERS_FILE), examples=examples)


def summary(records: list[dict], sampling: Sampling) -> dict:
    """What the manifest records about the on-policy data."""
    labels = np.array([r["label"] for r in records])
    kinds = [r["kind"] for r in records]
    return {"file": ANSWERS_FILE, "num_examples": len(records), "num_questions": len({r["group"] for r in records}),
            "greedy": kinds.count("greedy"), "sampled": kinds.count("sample"),
            "fraction_labelled_true": float(labels.mean()) if len(labels) else None,
            "sampling": asdict(sampling), "label": JUDGE,
            "used_for": "training only (probes, directions, sigma); answers of training questions only"}
