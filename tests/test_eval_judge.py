"""Evaluation harness, generation side: the judge's decision rule (stub embedder) and the uninformative rule."""

import pytest
import torch

from eval.core.judge import embed_references, is_uninformative, judge, judge_answers


class BagOfWordsEmbedder:
    """Stub: unit vectors of word counts over a fixed vocabulary."""

    VOCAB = ["paris", "lyon", "capital", "france", "nothing", "happens", "you", "die", "empty"]

    def embed(self, texts):
        rows = []
        for text in texts:
            words = text.lower().replace(".", " ").replace("(", " ").replace(")", " ").split()
            v = torch.tensor([float(words.count(w)) for w in self.VOCAB])
            rows.append(v / v.norm() if v.norm() > 0 else v)
        return torch.stack(rows) if rows else torch.zeros(0, len(self.VOCAB))


def test_judge_compares_best_true_with_best_false():
    e = torch.eye(3)
    verdict = judge(e[0], torch.stack([e[1], e[0] * 0.8 + e[2] * 0.6]), torch.stack([e[2]]))
    assert verdict.truthful and verdict.max_true == pytest.approx(0.8) and verdict.max_false == 0.0
    assert not judge(e[2], torch.stack([e[0]]), torch.stack([e[2]])).truthful
    assert not judge(e[0], torch.stack([e[0]]), torch.stack([e[0]])).truthful  # a tie is not true
    assert judge(e[0], torch.stack([e[0]]), torch.zeros(0, 3)).truthful  # no false reference


def test_judge_answers_with_stub_embedder():
    embedder = BagOfWordsEmbedder()
    refs = embed_references(embedder, [(["Paris is the capital of France."], ["Lyon is the capital of France."]),
                                       (["Nothing happens."], ["You die."])])
    verdicts = judge_answers(embedder, ["The capital is Paris.", "You die."], refs)
    assert [v.truthful for v in verdicts] == [True, False]
    assert judge_answers(embedder, ["   "], refs[:1])[0].max_true == 0.0  # empty answers embed as "(empty)"


@pytest.mark.parametrize("text", ["", "  ", "I have no comment.", "I have no comment", "i don’t know.",
                                  "I'm not sure what you mean.", "I cannot answer that.", "As an AI, I can't say.",
                                  "I'm sorry, but I can't help.", "Well, no comment on that."])
def test_uninformative(text):
    assert is_uninformative(text)


@pytest.mark.parametrize("text", ["Paris is the capital of France.", "Nothing happens if you eat seeds.",
                                  "Scientists don't know exactly when, but it was about 13.8 billion years ago.",
                                  "I know that the earth is round."])
def test_informative(text):
    assert not is_uninformative(text)


def test_split_ids_reads_recorded_test_and_val_ids(tmp_path):
    from eval.truthfulqa.data import split_ids

    manifest = {"split": {"test_ids": ["3", "1"], "val_ids": ["2", "5"], "seed": 0}}
    assert split_ids(manifest, "test", tmp_path) == ["3", "1"]
    assert split_ids(manifest, "val", tmp_path) == ["2", "5"]
