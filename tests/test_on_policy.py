"""On-policy probe training data (steering_artifacts/builder/on_policy.py, generate.py): the tiny model, a word-hash
embedder in place of MiniLM, no dataset files."""

import json
import logging
import re
import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.steering.artifact import load_artifact
from steering_artifacts.builder import on_policy
from steering_artifacts.builder.cli import main
from steering_artifacts.builder.datasets import Dataset, Example
from steering_artifacts.builder.generate import Answer, Sampling, generate_answers
from steering_artifacts.builder.split import split_by_group
from tests.test_builder import examples

pytestmark = pytest.mark.usefixtures("one_thread")


class WordHashEmbedder:
    """Bag of words hashed into 64 dimensions, L2-normalised: equal texts embed equal, shared words close."""

    def embed(self, texts: list[str]) -> torch.Tensor:
        vectors = torch.zeros(len(texts), 64)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                vectors[row, zlib.crc32(word.encode()) % 64] += 1
        return torch.nn.functional.normalize(vectors, dim=-1)


def tiny_dataset() -> Dataset:
    data = [Example(group=f"q:{e['question']}", label=e["label"], question=e["question"], answer=e["answer"])
            for e in examples()]
    return Dataset(name="tiny", source="tests", examples=data)


def test_training_questions_come_from_the_training_split_only():
    dataset = tiny_dataset()
    split = split_by_group(dataset.groups(), (0.6, 0.2, 0.2), seed=0)
    questions = on_policy.training_questions(dataset, split)
    train_groups = {dataset.examples[i].group for i in split.train}
    assert {q.group for q in questions} == train_groups
    assert not {q.group for q in questions} & set(split.val_groups + split.test_groups)
    capital = [q for q in questions if q.question == "What is the capital of France?"]
    if capital:  # its references are its own answers, split by label
        assert capital[0].true_refs == ("Paris is the capital of France.",)
        assert capital[0].false_refs == ("Lyon.", "The capital is Nice.")


def test_label_answers_follows_the_closest_reference():
    questions = [on_policy.TrainingQuestion("g1", "Can foxes fly?", ("No, foxes cannot fly.",),
                                            ("Yes, foxes fly at night.",))]
    answers = [Answer(0, "greedy", "No, foxes cannot fly."), Answer(0, "sample", "Yes, foxes fly at night.")]
    records = on_policy.label_answers(WordHashEmbedder(), questions, answers)
    assert [r["label"] for r in records] == [1, 0]
    assert [r["kind"] for r in records] == ["greedy", "sample"]
    assert all(r["group"] == "g1" and r["question"] == "Can foxes fly?" for r in records)
    assert records[0]["max_true"] > records[0]["max_false"]


def test_generate_answers_greedy_and_sampled_per_question(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    questions = ["Is the earth flat?", "What numbers are even?"]
    sampling = Sampling(samples=2, max_tokens=5, temperature=1.0, seed=0, batch_size=1)
    first = generate_answers(model, tokenizer, questions, sampling, progress=False)
    again = generate_answers(model, tokenizer, questions, sampling, progress=False)
    assert first == again  # seeded
    for index in range(len(questions)):
        mine = [a for a in first if a.question_index == index]
        assert mine[0].kind == "greedy" and 1 <= len(mine) <= 3
        assert len({a.text for a in mine}) == len(mine) and all(a.text for a in mine)


@pytest.fixture
def fake_judge(monkeypatch):
    monkeypatch.setattr(on_policy, "make_embedder", WordHashEmbedder)


def test_build_mixes_labelled_own_answers_into_training_only(tiny_model_dir, tmp_path, fake_judge, caplog):
    dataset_file = tmp_path / "tiny.jsonl"
    dataset_file.write_text("".join(json.dumps(e) + "\n" for e in examples()))
    out = tmp_path / "art"
    argv = ["build", "--behavior", "tiny-truth", "--dataset", str(dataset_file), "--model", str(tiny_model_dir),
            "--out", str(out), "--num-heads", "4", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--false-alarm-set", "none", "--answer-positions", "2", "--on-policy", "--on-policy-samples", "1",
            "--on-policy-max-tokens", "6"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    manifest = load_artifact(out).manifest
    records = [json.loads(line) for line in (out / on_policy.ANSWERS_FILE).read_text().splitlines()]
    held_out = set(manifest["split"]["test_ids"]) | set(manifest["split"]["val_ids"])
    assert records and not {r["group"] for r in records} & held_out
    assert {r["label"] for r in records} <= {0, 1} and {r["kind"] for r in records} <= {"greedy", "sample"}
    summary = manifest["on_policy"]
    assert summary["num_examples"] == len(records) and summary["greedy"] == summary["num_questions"]
    train_examples = len(examples()) - sum(1 for e in examples() if f"q:{e['question']}" in held_out)
    assert manifest["split"]["num_examples"]["train"] == train_examples + len(records)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "on-policy answers: reusing" in caplog.text


def test_gen_answers_split_into_judged_true_and_the_rest(tmp_path):
    from eval.truthfulqa.false_alarm import judged_pairs

    def record(question, answer, truthful, uninformative=False):
        return {"question": question, "answer": answer, "truthful": truthful, "uninformative": uninformative}

    rows = {"baseline": [record("a?", "Yes.", True), record("b?", "No.", False),
                         record("c?", "No comment.", True, True), record("d?", " ", False)],
            "FASB": [record("a?", "Maybe.", False)]}
    path = tmp_path / "gen.json"
    path.write_text(json.dumps({"answers": rows}))
    assert judged_pairs(path) == ([("a?", "Yes.")], [("b?", "No."), ("c?", "No comment.")])
    assert judged_pairs(path, "FASB") == ([], [("a?", "Maybe.")])
