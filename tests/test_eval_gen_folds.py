"""`truthfulqa gen --folds-dir`: fold artifacts built by the builder on a tiny TruthfulQA, generated with the
tiny model through the real Engine, judged by a stub embedder, pooled over folds."""

import csv
import json

import pytest

from eval.cli import main as eval_main
from eval.truthfulqa.folds import check_folds
from steering_artifacts.builder.cli import main as build_main
from tests.test_builder import QUESTIONS
from tests.test_eval_judge import BagOfWordsEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def truthfulqa_dir(tmp_path):
    """mc_task.json (mc1/mc2 targets) and TruthfulQA.csv (the judge's references), as in the real set."""
    folder = tmp_path / "truthfulqa"
    (folder / "data").mkdir(parents=True)
    rows = [{"question": q, "mc1_targets": {good[0]: 1, bad[0]: 0},
             "mc2_targets": {**{a: 1 for a in good}, **{a: 0 for a in bad}}} for q, (good, bad) in QUESTIONS.items()]
    (folder / "data" / "mc_task.json").write_text(json.dumps(rows))
    with (folder / "TruthfulQA.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question", "Best Answer", "Correct Answers", "Incorrect Answers"])
        for q, (good, bad) in QUESTIONS.items():
            writer.writerow([q, good[0], "; ".join(good), "; ".join(bad)])
    return folder


def test_gen_pools_every_fold_on_its_own_questions(tiny_model_dir, truthfulqa_dir, tmp_path, monkeypatch):
    folds = tmp_path / "folds"
    assert build_main(["build", "--behavior", "tiny-truth", "--dataset", "truthfulqa", "--data-dir",
                       str(truthfulqa_dir), "--model", str(tiny_model_dir), "--out", str(folds), "--num-heads", "4",
                       "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--false-alarm-set", "none",
                       "--folds", "3", "--fold", "all"]) == 0
    monkeypatch.setattr("eval.truthfulqa.gen.MiniLMEmbedder", BagOfWordsEmbedder)
    out = tmp_path / "gen.json"
    assert eval_main(["truthfulqa", "gen", "--folds-dir", str(folds), "--data-dir", str(truthfulqa_dir), "--model",
                      str(tiny_model_dir), "--max-tokens", "6", "--alpha", "3", "--threshold", "0.9",
                      "--backtrack-tokens", "2", "--iti-alpha", "2", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["questions"] == payload["covered_by_folds"] == payload["total_questions"] == len(QUESTIONS)
    assert [f["fold"] for f in payload["per_fold"]] == payload["folds_run"] == [0, 1, 2]
    assert sum(f["questions"] for f in payload["per_fold"]) == len(QUESTIONS)
    for name, records in payload["answers"].items():  # every question once per row, from its own fold
        assert sorted(r["qid"] for r in records) == sorted(str(i) for i in range(len(QUESTIONS))), name
    assert [r["row"] for r in payload["rows"]] == ["baseline", "ITI", "FASB"]
    assert (payload["rows"][2]["alpha"], payload["rows"][2]["threshold"]) == (3.0, 0.9)
    assert set(payload["intervals"]["differences"]) == {"FASB - baseline", "FASB - ITI"}
    assert payload["intervals"]["rows"]["FASB"]["truthful"]["mean"] == payload["rows"][2]["truthful"]


def test_overlapping_or_mixed_folds_are_refused():
    fold = {"folds": 2, "fold": 0, "test_ids": ["1", "2"]}
    assert check_folds([fold, {**fold, "fold": 1, "test_ids": ["3"]}], 5) == 3
    with pytest.raises(ValueError, match="another fold also tests"):
        check_folds([fold, {**fold, "fold": 1, "test_ids": ["2", "3"]}], 5)
    with pytest.raises(ValueError, match="different k-fold splits"):
        check_folds([fold, {**fold, "folds": 3, "fold": 1, "test_ids": ["3"]}], 5)
