"""Multiple-choice adapters on tiny hand-written samples in each file's real format, and the split."""

import json

import pytest

from steering_artifacts.builder.datasets import load_dataset
from steering_artifacts.builder.datasets_mc import (
    MMLU_TEST_DIR,
    Item,
    items_to_examples,
    load_mc_dataset,
    subsample_groups,
)
from steering_artifacts.builder.split import split_by_group

COPA_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE copa-corpus SYSTEM "copa.dtd">
<copa-corpus  version="1.0">
  <item id="1" asks-for="cause" most-plausible-alternative="1">
    <p>My body cast a shadow over the grass.</p>
    <a1>The sun was rising.</a1>
    <a2>The grass was cut.</a2>
  </item>
  <item id="1001" asks-for="cause" most-plausible-alternative="1">
    <p>The garden looked well-groomed.</p>
    <a1>The grass was cut.</a1>
    <a2>The sun was rising.</a2>
  </item>
  <item id="2" asks-for="effect" most-plausible-alternative="2">
    <p>The man dropped the glass.</p>
    <a1>It floated.</a1>
    <a2>It broke.</a2>
  </item>
</copa-corpus>
"""

SNLI_ROWS = [
    {"premise": "Two women are embracing.", "hypothesis": "Two women hug.", "label": "entailment"},
    {"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "label": "contradiction"},
    {"premise": "A man sings.", "hypothesis": "A man sings well.", "label": "neutral"},
    {"premise": "A boy waits.", "hypothesis": "Nobody agrees.", "label": "-"},
]

MMLU_CSV = """question,choice0,choice1,choice2,choice3,answer
What is 2 + 2?,3,4,5,"6, or more",1
"A ""dished face"" is",a,b,c,d,3
"""

WINOGRANDE_ROWS = [
    {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                    "Sarah was a better surgeon than Maria so _ got the easier cases.\n\n"
                    "Option1: Sarah Option2: Maria Answer format: option1/option2",
     "input": "", "output": "the correct answer is option2", "answer": "option2"},
    {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                    "The wine ruined the bed but not the blanket, so the _ was clean.\n\n"
                    "Option1: blanket Option2: bed Answer format: option1/option2",
     "input": "", "output": "the correct answer is option1", "answer": "option1"},
]


@pytest.fixture
def data_root(tmp_path):
    (tmp_path / "copa/balanced_copa").mkdir(parents=True)
    (tmp_path / "copa/balanced_copa/balacopa-dev-all.xml").write_text(COPA_XML)
    (tmp_path / "snli").mkdir()
    (tmp_path / "snli/dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SNLI_ROWS))
    (tmp_path / "mmlu" / MMLU_TEST_DIR).mkdir(parents=True)
    (tmp_path / "mmlu" / MMLU_TEST_DIR / "anatomy_test.csv").write_text(MMLU_CSV)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande/dev_llm_adapters_format.json").write_text(json.dumps(WINOGRANDE_ROWS))
    return tmp_path


def correct_answers(dataset) -> dict:
    return {(e.group, e.question): e.answer for e in dataset.examples if e.label == 1}


def test_copa_pairs_an_item_with_its_mirror(data_root):
    d = load_dataset("copa", data_root / "copa")
    assert len(d.examples) == 6 and d.groups() == ["copa-1"] * 4 + ["copa-2"] * 2
    assert correct_answers(d) == {
        ("copa-1", "My body cast a shadow over the grass. What was the cause of this?"): "The sun was rising.",
        ("copa-1", "The garden looked well-groomed. What was the cause of this?"): "The grass was cut.",
        ("copa-2", "The man dropped the glass. What was the effect of this?"): "It broke.",
    }


def test_snli_three_options_and_no_gold_rows_dropped(data_root):
    d = load_dataset("snli", data_root / "snli")
    assert len(d.examples) == 9 and sum(d.labels()) == 3
    assert [e.answer for e in d.examples[:3]] == ["True", "False", "Neither"]
    assert list(correct_answers(d).values()) == ["True", "False", "Neither"]
    assert d.examples[0].question == "Two women are embracing. Question: Two women hug. True, False, or Neither?"


def test_mmlu_four_options_from_csv(data_root):
    d = load_dataset("mmlu", data_root / "mmlu")
    assert [e.answer for e in d.examples[:4]] == ["3", "4", "5", "6, or more"]
    assert list(correct_answers(d).values()) == ["4", "d"]
    assert d.examples[4].question == 'A "dished face" is' and d.groups()[0] == "mmlu-anatomy-0"


def test_winogrande_options_parsed_from_instruction(data_root):
    d = load_dataset("winogrande", data_root / "winogrande")
    assert [e.answer for e in d.examples] == ["Sarah", "Maria", "blanket", "bed"]
    assert d.labels() == [0, 1, 1, 0]
    sentence = "Sarah was a better surgeon than Maria so _ got the easier cases."
    assert d.examples[0].question == f"Fill in the blank: {sentence}"


def test_subsample_is_seeded_and_keeps_whole_groups(data_root):
    items = [Item(f"g{i // 2}", f"q{i}", ["a", "b"], 0) for i in range(40)]
    first, again = subsample_groups(items, 10, seed=3), subsample_groups(items, 10, seed=3)
    assert first == again and len(first) == 10
    groups = {i.group for i in first}
    assert all(sum(i.group == g for i in first) == 2 for g in groups)  # never half a group
    d = load_mc_dataset("snli", data_root / "snli", max_items=2)
    assert len(d.examples) == 6 and "2 of 3 items" in d.selection


def test_split_by_item_has_no_leakage(data_root):
    d = load_dataset("copa", data_root / "copa")
    items = [Item(f"copa-{i}", f"premise {i} mirror {m}", ["x", "y"], m) for i in range(20) for m in (0, 1)]
    groups = [e.group for e in items_to_examples(items)]
    split = split_by_group(groups, (0.6, 0.2, 0.2), seed=0)
    parts = [{groups[i] for i in rows} for rows in (split.train, split.val, split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set(split.test_groups) == parts[2] and sum(map(len, parts)) == 20
    assert len(d.examples) == 6  # the COPA sample above: a mirror can only land with its original
