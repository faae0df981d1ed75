"""`python -m eval mc` on the tiny model: item rebuilding from a manifest, option scoring, steering rows."""

import json
from types import SimpleNamespace

import pytest
import torch

from eval.core.scoring import MCScorer
from eval.core.steering import iti_from_prompt_end
from eval.mc_tasks.data import load_artifact_dataset, split_groups, task_items
from eval.mc_tasks.options import encode_items, task_evaluation
from eval.mc_tasks.run import run_task
from server.engine.loader import load_model
from server.steering.artifact import load_artifact
from steering_artifacts.builder.cli import main as build_main

ITEMS = [
    ("The man dropped the glass. What was the effect of this?", ["It broke.", "It floated away."], 0),
    ("The sun rose. What was the effect of this?", ["It got light.", "It got dark."], 0),
    ("The dog barked. What was the cause of this?", ["A cat came.", "Nothing at all happened."], 0),
    ("The girl laughed. What was the cause of this?", ["A joke.", "A sad song."], 0),
    ("The tea was hot. What was the effect of this?", ["I waited.", "I froze."], 0),
    ("The road was wet. What was the cause of this?", ["Rain.", "Sunshine."], 0),
    ("The baby cried. What was the cause of this?", ["Hunger.", "Joy."], 0),
    ("The ice melted. What was the cause of this?", ["Heat.", "Cold."], 0),
    ("The car stopped. What was the cause of this?", ["No fuel.", "Full tank."], 0),
    ("The bell rang. What was the effect of this?", ["Class ended.", "Nobody heard anything."], 0),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    """A tiny artifact built by the real builder from a JSONL of items (one group per item)."""
    folder = tmp_path_factory.mktemp("mc")
    lines = [{"question": q, "answer": option, "label": int(k == correct), "group": f"item-{n}"}
             for n, (q, options, correct) in enumerate(ITEMS) for k, option in enumerate(options)]
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = folder / "artifact"
    torch.manual_seed(0)
    build_main(["build", "--behavior", "tiny-mc", "--format", "qa", "--dataset", str(data), "--model",
                str(tiny_model_dir), "--out", str(out), "--num-heads", "4", "--cache-dir", str(folder / "cache"),
                "--no-progress", "--threads", "1"])
    return out


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def _evaluation(tiny_loaded, artifact_dir, split="test"):
    artifact = load_artifact(artifact_dir)
    dataset = load_artifact_dataset(artifact.manifest, artifact_dir)
    items = task_items(dataset, split_groups(artifact.manifest, split))
    rows, prefix = encode_items(items, tiny_loaded.tokenizer)
    return task_evaluation(MCScorer(tiny_loaded.model, artifact, prefix, batch_rows=3), items, rows), rows


def test_items_come_from_the_manifest_split(tiny_loaded, tiny_artifact):
    manifest = load_artifact(tiny_artifact).manifest
    test, val = split_groups(manifest, "test"), split_groups(manifest, "val")
    assert test and val and not set(test) & set(val)
    items = task_items(load_artifact_dataset(manifest, tiny_artifact), test)
    assert [i.item_id for i in items] == test and all(i.correct == 0 for i in items)


def test_option_scores_equal_a_plain_forward(tiny_loaded, tiny_artifact):
    evaluation, rows = _evaluation(tiny_loaded, tiny_artifact)
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    for row, score in zip(rows, evaluation.baseline_scores):
        ids = torch.tensor([row.seq.ids])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(logp[j - 1, row.seq.ids[j]].item() for j in range(row.seq.answer_start, len(row.seq.ids)))
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert len(score.answer_probs) == len(row.seq.ids) - row.seq.answer_start
    assert tok.decode(rows[0].seq.ids[rows[0].seq.answer_start:]).strip()
    evaluation.scorer.close()


def test_rows_iti_zero_is_baseline_and_fasb_threshold_zero_never_fires(tiny_loaded, tiny_artifact):
    evaluation, rows = _evaluation(tiny_loaded, tiny_artifact)
    base = evaluation.baseline()
    assert evaluation.iti(0.0)["acc"] == base["acc"]
    never = evaluation.fasb(5.0, 0.0, 10)
    assert never["steered_options"] == 0.0 and never["acc"] == base["acc"]
    always = evaluation.fasb(50.0, 1.01, 10)  # every option's last-token check fires
    assert always["steered_options"] == 1.0 and always["mean_strength"] > 0
    unsteered = evaluation.scorer.score([rows[0].seq])
    assert unsteered[0].logprob == pytest.approx(evaluation.baseline_scores[0].logprob, abs=1e-5)
    iti = evaluation.scorer.score([iti_from_prompt_end(rows[0].seq, 50.0)])
    assert iti[0].logprob != pytest.approx(evaluation.baseline_scores[0].logprob, abs=1e-5)  # first token steered
    evaluation.scorer.close()


def test_run_task_sweeps_validation_and_writes_recommended(tiny_loaded, tiny_artifact):
    args = SimpleNamespace(behavior=tiny_artifact.name, artifact_root=str(tiny_artifact.parent),
                           data_root=str(tiny_artifact), limit=None, val_limit=100, alphas=(0.0, 5.0),
                           thresholds=(0.0, 0.6), backtrack_tokens=10, batch_rows=4, write_recommended=True,
                           resume=False, model="tiny")
    result = run_task(tiny_loaded, "tiny", args)
    assert [r["row"] for r in result["test"]] == ["baseline", "ITI", "FASB"]
    assert all(0.0 <= r["acc"] <= 1.0 for r in result["test"])
    recommended = load_artifact(tiny_artifact).manifest["recommended"]
    assert recommended["alpha"] == result["validation"]["chosen"]["fasb"]["alpha"] and "chosen_by" in recommended
