"""The artifact builder: end to end on a tiny model, and each step against a plain reference."""

import json
import logging

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.steering.artifact import check_compatible, load_artifact
from server.steering.layers import attention_output_projections
from steering_artifacts.builder import probes
from steering_artifacts.builder.cli import main
from steering_artifacts.builder.collect import collect_activations, pack_prompts
from steering_artifacts.builder.datasets import Example, load_jsonl
from steering_artifacts.builder.prompts import chat_text, encode
from steering_artifacts.builder.report import report_artifact
from steering_artifacts.builder.split import fold_split, split_by_group

QUESTIONS = {
    "Is the earth flat?": (["No, the earth is round.", "The earth is a sphere."], ["Yes, the earth is flat."]),
    "What is the capital of France?": (["Paris is the capital of France."], ["Lyon.", "The capital is Nice."]),
    "Can foxes fly?": (["No, foxes cannot fly."], ["Yes, foxes fly at night."]),
    "Is the dog lazy?": (["Some dogs are lazy."], ["All dogs are always lazy.", "Dogs never move."]),
    "How are you today?": (["I am fine, thank you."], ["I am a fox."]),
    "What numbers are even?": (["0 2 4 6 8"], ["1 3 5 7 9"]),
    "Is café a word?": (["Yes, café is a word."], ["No, café is an emoji."]),
    "Do fish jump over dogs?": (["Rarely."], ["Fish jump over every dog."]),
}

# The first test ids of the shipped TruthfulQA artifacts (817 questions, seed 0; their manifests' split.test_ids).
PINNED_TEST_IDS = ["371", "448", "449", "630", "685"]


def examples() -> list[dict]:
    return [
        {"question": q, "answer": a, "label": label}
        for q, (good, bad) in QUESTIONS.items()
        for label, answers in ((1, good), (0, bad))
        for a in answers
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def dataset_file(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples()))
    return path


def test_cli_builds_a_loadable_compatible_artifact(tiny, tiny_model_dir, dataset_file, tmp_path, caplog):
    argv = [
        "build",
        "--behavior",
        "tiny-truth",
        "--dataset",
        str(dataset_file),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "art"),
        "--num-heads",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--eval-formats",
        "qa",
        "--no-progress",
        "--alpha",
        "3",
        "--threshold",
        "0.4",
    ]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    artifact = load_artifact(tmp_path / "art")
    check_compatible(artifact, tiny[0])
    manifest = artifact.manifest
    assert (artifact.behavior, artifact.num_heads, artifact.head_dim, artifact.prompt_format) == (
        "tiny-truth",
        4,
        16,
        "chat",
    )
    assert (artifact.alpha, artifact.threshold, artifact.backtrack_tokens) == (3.0, 0.4, 10)
    assert artifact.val_accuracy.tolist() == sorted(artifact.val_accuracy.tolist(), reverse=True)
    assert set(manifest["accuracy"]["test_ensemble_by_format"]) == {"chat", "qa"}
    assert 0 <= manifest["accuracy"]["test_ensemble_by_format"]["qa"]["mean_p_desired"] <= 1
    assert len(manifest["split"]["test_ids"]) == 2 and manifest["dataset"]["num_examples"] == len(examples())
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # chat and qa activations
    assert "held-out ensemble, qa prompts: accuracy" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(argv)
    assert "reusing cache" in caplog.text
    assert load_artifact(tmp_path / "art").probe_weight.equal(artifact.probe_weight)


def test_cli_builds_every_fold_from_one_collection(tiny_model_dir, dataset_file, tmp_path, caplog):
    argv = ["build", "--behavior", "tiny-truth", "--dataset", str(dataset_file), "--model", str(tiny_model_dir),
            "--out", str(tmp_path / "folds"), "--num-heads", "4", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--folds", "3", "--fold", "all", "--false-alarm-set", "none"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    splits = [load_artifact(tmp_path / "folds" / f"fold-{i}").manifest["split"] for i in range(3)]
    assert [(s["folds"], s["fold"]) for s in splits] == [(3, 0), (3, 1), (3, 2)]
    tested = [set(s["test_ids"]) for s in splits]
    assert sum(map(len, tested)) == len(QUESTIONS) == len(set.union(*tested))
    assert all(not set(s["val_ids"]) & set(s["test_ids"]) for s in splits)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # collected once, for all three folds
    assert caplog.text.count("(cache)") == 2 and "fold 3/3 done" in caplog.text
    # `report` re-derives a fold's split from its manifest (it refuses a split that misses the test ids)
    report = report_artifact(str(tmp_path / "folds" / "fold-1"), str(dataset_file), None, answer_positions=0,
                             model=str(tiny_model_dir), cache_dir=str(tmp_path / "cache"), progress=False)
    tested_answers = [e for e in examples() if f"q:{e['question']}" in splits[1]["test_ids"]]
    assert report["test_by_position"]["all"]["rows"] == len(tested_answers)  # last token: one row per answer


def test_batched_collection_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    data = [
        Example(group=e["question"], label=e["label"], question=e["question"], answer=e["answer"]) for e in examples()
    ]
    for prompt_format in ("qa", "chat"):
        token_ids = encode(data, prompt_format, tokenizer)
        # a small batch budget forces several batches and padding
        batched = collect_activations(
            model, token_ids, [e.group for e in data], batch_tokens=64, dtype=np.float32, progress=False
        )
        np.testing.assert_allclose(batched, one_at_a_time(model, token_ids), atol=1e-4)


def one_at_a_time(model, token_ids) -> np.ndarray:
    captured = {}
    projections = attention_output_projections(model)
    handles = [
        p.register_forward_pre_hook(lambda m, a, layer=layer: captured.__setitem__(layer, a[0][0, -1]))
        for layer, p in enumerate(projections)
    ]
    rows = []
    with torch.inference_mode():
        for ids in token_ids:
            model(torch.tensor([ids]))
            rows.append(torch.stack([captured[layer] for layer in range(len(projections))]).numpy())
    for handle in handles:
        handle.remove()
    return np.stack(rows)


def test_packing_shares_the_prefix_and_keeps_each_prompt():
    token_ids = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7], [9, 9]]
    packs = pack_prompts(token_ids, ["a", "a", "a", "b"])
    first = packs[0]
    assert first.input_ids == [1, 2, 3, 4, 3, 5, 6, 7]  # common prefix [1, 2], then each prompt's own tokens
    assert first.position_ids == [0, 1, 2, 3, 2, 3, 4, 2]
    assert first.last_positions == [3, 6, 7]
    assert packs[1].input_ids == [9, 9] and packs[1].last_positions == [1]
    # group a shares [1, 2, 3]: 3 + 1 + 2 tokens exceed 5, so it is cut in two; group b fits in 3 + 2
    chunks = pack_prompts(token_ids, ["a", "a", "b", "b"], max_pack_tokens=5)
    assert [p.prompt_indices for p in chunks] == [[0], [1], [2, 3]]


def test_chat_prompt_ends_at_the_answers_last_token(tiny):
    tokenizer = tiny[1]
    text = chat_text(Example(group="g", label=1, question="Is the earth flat?", answer="No."), tokenizer)
    assert text.endswith("<|im_start|>assistant\nNo.")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the earth flat?"}, {"role": "assistant", "content": "No."}], tokenize=False
    )
    assert full.startswith(text) and full[len(text) :].startswith("<|im_end|>")


def test_split_has_no_group_leakage_and_is_seeded():
    groups = [f"q{i // 3}" for i in range(300)]
    split = split_by_group(groups, (0.6, 0.2, 0.2), seed=7)
    sets = [{groups[i] for i in part} for part in (split.train, split.val, split.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(300))
    assert (len(sets[0]), len(sets[1]), len(sets[2])) == (60, 20, 20)
    assert set(split.test_groups) == sets[2]
    assert split_by_group(groups, seed=7).test_groups == split.test_groups
    assert split_by_group(groups, seed=8).test_groups != split.test_groups


def test_fold_split_tests_every_group_once_and_never_validates_on_test():
    groups = [f"q{i // 3}" for i in range(3 * 103)]  # 103 groups: folds of 21 and 20
    splits = [fold_split(groups, 5, fold, 0.2, seed=7) for fold in range(5)]
    tested = [set(s.test_groups) for s in splits]
    assert sorted(len(t) for t in tested) == [20, 20, 21, 21, 21]
    assert set.union(*tested) == set(groups) and sum(map(len, tested)) == 103  # disjoint, cover every group
    for s in splits:
        sets = [{groups[i] for i in part} for part in (s.train, s.val, s.test)]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert sorted(np.concatenate([s.train, s.val, s.test])) == list(range(len(groups)))
        assert sets[2] == set(s.test_groups) and sets[1] == set(s.val_groups) and len(sets[1]) == 21
    assert fold_split(groups, 5, 2, seed=7).test_groups == splits[2].test_groups
    with pytest.raises(ValueError, match="0 <= fold < folds"):
        fold_split(groups, 5, 5)


def test_default_split_is_unchanged():
    """The shipped artifacts' test ids come from this split: fold support must not move them."""
    split = split_by_group([str(i) for i in range(817)], (0.6, 0.2, 0.2), seed=0)
    assert split.test_groups[:5] == PINNED_TEST_IDS and len(split.test_groups) == 163 and len(split.val_groups) == 163


def test_split_refuses_too_few_groups():
    with pytest.raises(ValueError, match="at least 3 groups"):
        split_by_group(["a", "a", "b"])


def test_folded_probe_equals_sklearn_on_standardised_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 0, 1]
    y = ((x - x.mean(0)) @ [1, 0.1, 5, -0.3, 0] + rng.normal(size=200) > 0).astype(int)
    weight, bias = probes.fit_logistic(x, y, C=0.5)
    mean, std = x.mean(0), x.std(0)
    reference = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit((x - mean) / std, y)
    np.testing.assert_allclose(x @ weight + bias, reference.decision_function((x - mean) / std), atol=1e-8)


def test_ensemble_direction_and_sigma_on_fixed_numbers():
    selected = np.array([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, -2.0]]])  # [N=2, K=2, D=2]
    labels = np.array([1, 0])
    weights, biases = np.array([[1.0, 0.0], [0.0, 0.5]]), np.array([-2.0, 0.0])
    # logits: row 0 -> [-1, 1], row 1 -> [1, -1]; both rows average sigmoid(1) and sigmoid(-1) to 0.5
    np.testing.assert_allclose(probes.ensemble_probability(selected, weights, biases), [0.5, 0.5])
    np.testing.assert_allclose(probes.directions(selected, labels, weights), [[-1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(probes.directions(selected, labels, weights, "probe"), [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(probes.projection_std(selected, np.array([[-1.0, 0.0], [0.0, 1.0]])), [1.0, 2.0])
    acts = selected[:, None]  # [N, L=1, H=2, D]
    np.testing.assert_allclose(probes.head_accuracy(acts, labels, weights[None], biases[None]), [[0.0, 1.0]])
    assert probes.rank_heads(np.array([[0.5, 0.9], [0.9, 0.1]]), 3) == [(0, 1), (1, 0), (0, 0)]


def test_jsonl_groups_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"question": "q", "answer": "a", "label": 1}\n{"question": "q", "answer": "b", "label": 0}\n'
        '{"prompt": "p", "label": 1, "id": 7}\n\n'
    )
    data = load_jsonl(path)
    assert [e.group for e in data.examples] == ["q:q", "q:q", "7"]
    path.write_text('{"question": "q", "answer": "a", "label": 2}\n')
    with pytest.raises(ValueError, match="d.jsonl:1: 'label' must be 0 or 1"):
        load_jsonl(path)
