"""Multiple-choice datasets (COPA, SNLI, MMLU, WinoGrande) as labelled examples for probe training.

Every item becomes one example per answer option: `question` is the item rendered as a question,
`answer` the option's text, label 1 for the correct option and 0 for the others. The builder's
`qa` format turns that into "Q: {question} A: {option}" and the probe reads the option's last
token; the evaluation (`python -m eval mc`) scores the same text by the option's log-likelihood.

Why this template and not the letter templates of related work (SADI: options listed, answer a
letter): a letter answer ("A"/"B") is one token whose activation says little about the option's
content, and the 135M model answers letter prompts near chance; the option text appended to the
question is what the FASB/ITI probes read on TruthfulQA ("Q: … A: …"), so the same probe code
applies unchanged.

Groups (the split unit) are item ids, except for COPA where an item and its Balanced-COPA mirror
(id + 1000, same two alternatives with the other one correct) share a group, so no alternative
text is seen in training and again at test. Large sets are subsampled with a seeded permutation;
the selection is recorded in `Dataset.selection` and from there in the manifest.
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steering_artifacts.builder.examples import Dataset, Example

COPA_FILE = "balanced_copa/balacopa-dev-all.xml"
SNLI_FILE = "dev.jsonl"
MMLU_TEST_DIR = "test"
WINOGRANDE_FILE = "dev_llm_adapters_format.json"

# Defaults keep each build to a few minutes of CPU (tokens ~ items x prompt length).
DEFAULT_MAX_ITEMS = {"copa": None, "snli": 900, "mmlu": 600, "winogrande": 1000}
MMLU_MAX_QUESTION_CHARS = 400  # drops the long reading passages (history, law) that dominate token counts
SNLI_ANSWERS = {"entailment": "True", "contradiction": "False", "neutral": "Neither"}
MC_DATASETS = tuple(DEFAULT_MAX_ITEMS)


@dataclass(frozen=True)
class Item:
    group: str
    question: str
    options: list[str]
    correct: int  # index into options


def copa_question(premise: str, asks_for: str) -> str:
    return f"{premise} What was the {asks_for} of this?"


def snli_question(premise: str, hypothesis: str) -> str:
    return f"{premise} Question: {hypothesis} True, False, or Neither?"


def mmlu_question(question: str) -> str:
    return question.strip()


def winogrande_question(sentence: str) -> str:
    return f"Fill in the blank: {sentence}"


def load_copa_items(data_dir: Path) -> list[Item]:
    """Balanced COPA; a mirror whose premise repeats its original's is dropped (id 1381 repeats 381's
    premise and alternatives with the other answer marked: contradictory labels, so no usable item)."""
    root = ElementTree.parse(data_dir / COPA_FILE).getroot()
    items, seen = [], set()
    for node in root.iter("item"):
        item_id = int(node.get("id"))
        options = [node.findtext("a1").strip(), node.findtext("a2").strip()]
        question = copa_question(node.findtext("p").strip(), node.get("asks-for"))
        group = f"copa-{item_id % 1000}"  # an item and its mirror share the alternatives
        if (group, question) in seen:
            continue
        seen.add((group, question))
        items.append(Item(group, question, options, int(node.get("most-plausible-alternative")) - 1))
    return items


def load_snli_items(data_dir: Path) -> list[Item]:
    items = []
    with (data_dir / SNLI_FILE).open() as lines:
        for number, line in enumerate(lines):
            row = json.loads(line)
            if row["label"] not in SNLI_ANSWERS:  # "-": annotators did not agree, no gold label
                continue
            options = list(SNLI_ANSWERS.values())
            correct = options.index(SNLI_ANSWERS[row["label"]])
            items.append(Item(f"snli-{number}", snli_question(row["premise"], row["hypothesis"]), options, correct))
    return items


def load_mmlu_items(data_dir: Path) -> list[Item]:
    items = []
    for path in sorted((data_dir / MMLU_TEST_DIR).glob("*_test.csv")):
        subject = path.name.removesuffix("_test.csv")
        with path.open(newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.DictReader(f)):
                if len(row["question"]) > MMLU_MAX_QUESTION_CHARS:
                    continue
                options = [row[f"choice{k}"].strip() for k in range(4)]
                items.append(Item(f"mmlu-{subject}-{number}", mmlu_question(row["question"]), options,
                                  int(row["answer"])))
    return items


_WINOGRANDE_PATTERN = re.compile(r"sentence: (?P<sentence>.*)\n\nOption1: (?P<o1>.*) Option2: (?P<o2>.*) Answer format",
                                 re.S)


def load_winogrande_items(data_dir: Path) -> list[Item]:
    items = []
    for number, row in enumerate(json.loads((data_dir / WINOGRANDE_FILE).read_text())):
        match = _WINOGRANDE_PATTERN.search(row["instruction"])
        if match is None:
            raise ValueError(f"{WINOGRANDE_FILE} row {number}: unexpected instruction {row['instruction'][:80]!r}")
        options = [match["o1"].strip(), match["o2"].strip()]
        correct = {"option1": 0, "option2": 1}[row["answer"].strip()]
        items.append(Item(f"winogrande-{number}", winogrande_question(match["sentence"].strip()), options, correct))
    return items


ITEM_LOADERS = {
    "copa": (load_copa_items, COPA_FILE),
    "snli": (load_snli_items, SNLI_FILE),
    "mmlu": (load_mmlu_items, f"{MMLU_TEST_DIR}/*_test.csv"),
    "winogrande": (load_winogrande_items, WINOGRANDE_FILE),
}


def subsample_groups(items: list[Item], max_items: int | None, seed: int) -> list[Item]:
    """Keep whole groups, chosen by a seeded permutation, until `max_items` items; file order kept."""
    if max_items is None or max_items >= len(items):
        return items
    groups = list(dict.fromkeys(i.group for i in items))
    sizes = {g: 0 for g in groups}
    for item in items:
        sizes[item.group] += 1
    chosen, total = set(), 0
    for index in np.random.default_rng(seed).permutation(len(groups)):
        if total + sizes[groups[index]] > max_items:
            break
        chosen.add(groups[index])
        total += sizes[groups[index]]
    return [i for i in items if i.group in chosen]


def items_to_examples(items: list[Item]) -> list[Example]:
    return [
        Example(group=item.group, label=int(k == item.correct), question=item.question, answer=option)
        for item in items
        for k, option in enumerate(item.options)
    ]


def load_mc_dataset(name: str, data_dir: str | Path, max_items: int | None = None, seed: int = 0) -> Dataset:
    """`name` in MC_DATASETS, read from `data_dir` (its data folder, e.g. copa/); `max_items` None = default cap."""
    loader, source = ITEM_LOADERS[name]
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a folder (expected ../shared/data/{name})")
    items = loader(data_dir)
    cap = max_items if max_items is not None else DEFAULT_MAX_ITEMS[name]
    kept = subsample_groups(items, cap, seed)
    selection = f"all {len(items)} items" if len(kept) == len(items) else (
        f"{len(kept)} of {len(items)} items, whole groups in a seed-{seed} permutation order")
    if name == "mmlu":
        selection += f", questions of at most {MMLU_MAX_QUESTION_CHARS} characters, all 57 subjects' test files"
    return Dataset(name=name, source=source, examples=items_to_examples(kept), selection=selection)
