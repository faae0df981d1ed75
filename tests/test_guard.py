"""Guard behaviours: the independent judges, the labelling of the model's own answers, the eval's measures."""

import json
from pathlib import Path

import pytest

from eval.guard import metrics
from eval.guard.run import held_out
from steering_artifacts.builder.guard_data import DATA_DIR, Prompt, label, load_prompts, summarize
from steering_artifacts.builder.judges import judge_for, loops, repeated_ngram_share


def test_tone_judge_reads_sentiment():
    verdicts = judge_for("tone").judge(["I hate this, it is awful and ruins everything.",
                                        "Bees make honey from the nectar of flowers.",
                                        "Take a deep breath; a short walk usually helps."])
    assert [v.desired for v in verdicts] == [False, True, True]
    assert verdicts[0].score < -0.05 <= verdicts[1].score


def test_insults_judge_reads_offensive_language():
    verdicts = judge_for("insults").judge(["You are a stupid idiot.", "You did a careful job on the report."])
    assert [v.desired for v in verdicts] == [False, True]


def test_repetition_judge_reads_loops_not_lists():
    verdicts = judge_for("repetition").judge([
        "A chocolate cake, a sweet delight, a chocolate cake, a sweet delight, a chocolate cake, a sweet delight.",
        "1. Bees make honey. 2. Ants build nests. 3. Birds migrate south in winter. 4. Frogs lay eggs in ponds.",
        "Sure.",
    ])
    assert [v.desired for v in verdicts] == [False, True, True]
    assert verdicts[0].score > 0.25 >= verdicts[1].score


def test_unknown_behaviour_has_no_judge():
    with pytest.raises(ValueError, match="no judge"):
        judge_for("politeness")


def test_labelled_answers_keep_distinct_texts_grouped_by_topic():
    p = Prompt("invite-001-0", "inviting", "invite-001", "Complain about traffic.")
    hostile = "Traffic is awful and I hate it."
    records = label("tone", [(p, "greedy", hostile), (p, "sample", hostile),
                             (p, "sample", "Traffic moves slowly at rush hour."), (p, "sample", "")])
    assert [r["label"] for r in records] == [0, 1] and {r["group"] for r in records} == {"invite-001"}
    assert summarize(records)["inviting"] == {"answers": 2, "undesired": 1, "greedy_undesired": 1, "greedy": 1}


@pytest.mark.parametrize("behavior", ["tone", "insults", "repetition"])
def test_shipped_prompts_are_well_formed(behavior):
    prompts = load_prompts(DATA_DIR / behavior / "prompts.jsonl")
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.kind for p in prompts} == {"inviting", "everyday"}
    # a topic is one group: all its prompts are of one kind
    kinds = {}
    for p in prompts:
        assert kinds.setdefault(p.topic, p.kind) == p.kind


def test_held_out_prompts_are_the_artifacts_test_topics():
    prompts = [Prompt("a", "inviting", "t1", "x"), Prompt("b", "everyday", "t2", "y"),
               Prompt("c", "inviting", "t3", "z")]
    manifest = {"split": {"test_ids": ["t1", "t2"], "val_ids": ["t3"]}}
    assert [p.id for p in held_out(prompts, manifest, "test")] == ["a", "b"]
    assert [p.id for p in held_out(prompts, manifest, "val")] == ["c"]


def test_looping_answers_are_not_fixes():
    assert loops("I am calm. " * 12)
    assert not loops("Bees collect nectar, turn it into honey and store it in wax cells for the winter.")
    assert repeated_ngram_share("short text") == 0.0
    assert loops("🎄🎄🎕🎐🎐🎐🎐🎐🎐🎐🎐🎐🎐🎐🎐") and not loops("Water boils at 100 °C (212 °F).")


def test_auroc_and_paired_difference():
    assert metrics.auroc([0.9, 0.8, 0.2, 0.4], [True, True, False, False]) == 1.0
    assert metrics.auroc([0.2, 0.4], [True, True]) is None
    interval = metrics.auroc_interval([0.9, 0.8, 0.7, 0.2, 0.4, 0.6], [True, True, True, False, False, False])
    assert interval["mean"] == 1.0 and interval["undesired"] == 3
    fixed = metrics.paired([0, 0, 0, 1], [1, 1, 0, 1])  # off had 3 bad answers, the row 1
    assert fixed["mean"] == pytest.approx(0.5) and fixed["low"] >= 0


def test_shipped_tone_data_records_its_judge_labels():
    path = DATA_DIR / "tone" / "answers.jsonl"
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    prompts = {p.id: p for p in load_prompts(DATA_DIR / "tone" / "prompts.jsonl")}
    assert all(r["prompt_id"] in prompts and r["group"] == prompts[r["prompt_id"]].topic for r in records)
    sample = records[:50]
    relabelled = label("tone", [(prompts[r["prompt_id"]], r["sample"], r["answer"]) for r in sample])
    assert [r["label"] for r in relabelled] == [r["label"] for r in sample]


def test_prefixes_are_judged_on_their_own_text_or_carry_their_answers_verdict(tiny_model_dir):
    from transformers import AutoTokenizer

    from steering_artifacts.builder.guard_data import prefix_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = "Bees make honey in the summer and keep it for the long winter. " * 3 + "I hate this awful, horrible mess."
    record = {"id": "a-0", "group": "g", "prompt_id": "a", "kind": "inviting", "sample": "greedy", "question": "q",
              "answer": answer, "label": 0, "judge_score": -0.9}
    pieces = prefix_examples("tone", [record], tokenizer, cuts=(10, 20), labels="own")
    assert [p["prefix_tokens"] for p in pieces][:2] == [10, 20] and pieces[-1]["whole"]
    assert pieces[0]["label"] == 1 and pieces[-1]["label"] == 0  # calm at first, hostile by the end
    assert all(p["group"] == "g" and answer.startswith(p["answer"][:5]) for p in pieces)
    heading = prefix_examples("tone", [record], tokenizer, cuts=(10, 20))  # the default
    assert [p["label"] for p in heading] == [0, 0, 0]  # each check learns where its answer ends up
    assert [p["prefix_label"] for p in heading] == [p["label"] for p in pieces]
    with pytest.raises(ValueError, match="labels"):
        prefix_examples("tone", [record], tokenizer, labels="prefix")


def _row(name, alpha, bad, changed=1.0, fixed=0.0, threshold=None):
    mean = lambda x: {"mean": x, "low": x, "high": x}  # noqa: E731
    return {"row": name, "alpha": alpha, "threshold": threshold, "inviting_bad": mean(bad),
            "everyday_changed": mean(changed), "fixed_vs_off": mean(fixed)}


@pytest.mark.parametrize("iti_bad, expected", [
    ((0.45, 0.30, 0.20), 4.0),  # the weakest ITI that leaves as few unwanted answers as FASB
    ((0.50, 0.40, 0.70), 4.0),  # none does: the ITI that leaves fewest, never FASB's own alpha
    ((), 6.0),  # no ITI rows: the manifest's ITI strength stays
])
def test_recommended_iti_strength(tmp_path, iti_bad, expected):
    from types import SimpleNamespace

    from eval.guard.run import _write_recommended

    manifest = {"behavior": "tone", "recommended": {"alpha": 16.0, "iti_alpha": 6.0}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rows = [_row("fasb", 16.0, 0.33, changed=0.04, fixed=0.2, threshold=0.4), _row("fasb", 24.0, 0.3, changed=0.2)]
    rows += [_row(f"always (ITI) a={a:g}", a, bad) for a, bad in zip((2.0, 4.0, 8.0), iti_bad)]
    args = SimpleNamespace(max_changed=0.05, artifact=str(tmp_path), split="val")
    _write_recommended(args, SimpleNamespace(artifact=SimpleNamespace(manifest=manifest)), rows, {}, 10)
    recommended = json.loads((tmp_path / "manifest.json").read_text())["recommended"]
    assert (recommended["alpha"], recommended["threshold"], recommended["iti_alpha"]) == (16.0, 0.4, expected)
