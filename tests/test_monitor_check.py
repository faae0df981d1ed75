"""Answer-prefix positions, calibration, the false-alarm check and bootstrap intervals."""

import json

import numpy as np
import pytest

from eval.core.bootstrap import bootstrap_interval, format_interval, paired_difference
from server.config import Settings
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.types import SteeringParams
from server.steering.artifact import load_artifact
from steering_artifacts.builder.calibration import expected_calibration_error, plot_reliability, reliability_bins
from steering_artifacts.builder.cli import main
from steering_artifacts.builder.collect import collect_activations
from steering_artifacts.builder.datasets import Example
from steering_artifacts.builder.false_alarm import (
    DEFAULT_SET,
    check_positions,
    firing_rate,
    load_pairs,
    max_safe_threshold,
    monitor_scores,
    score_answers,
)
from steering_artifacts.builder.positions import answer_positions, answer_starts, bucket, read_plan
from steering_artifacts.builder.prompts import encode
from tests.engine_helpers import collect
from tests.synthetic_artifact import write_synthetic_artifact
from tests.test_builder import examples, one_at_a_time

pytestmark = pytest.mark.usefixtures("one_thread")


# -- positions


def test_answer_positions_start_at_s_keep_the_last_and_subsample_evenly():
    assert answer_positions(0, 10, 4) == []
    assert answer_positions(3, 10, 4) == [2]  # shorter than s: only the last token, as the monitor checks
    assert answer_positions(12, 10, 4) == [9, 10, 11]
    assert answer_positions(30, 10, 4) == [9, 16, 22, 29]
    assert answer_positions(30, 10, 1) == [29]
    assert answer_positions(5, 1, 10) == [0, 1, 2, 3, 4]


def test_buckets():
    assert [bucket(j, 6) for j in range(6)] == ["early", "early", "early", "middle", "middle", "end"]
    assert bucket(0, 1) == "end"


def test_read_plan_rows_follow_examples():
    token_ids = [[1, 2, 3, 4, 5], [1, 2, 9]]
    reads, example, position, length = read_plan(token_ids, [2, 2], first=1, max_positions=2)
    assert reads == [[2, 4], [2]]
    assert example.tolist() == [0, 0, 1] and position.tolist() == [0, 2, 0] and length.tolist() == [3, 3, 1]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    return loaded.model, loaded.tokenizer


def test_answer_starts_and_reads_equal_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    data = [Example(e["question"], e["label"], e["question"], e["answer"]) for e in examples()]
    for prompt_format in ("qa", "chat"):
        token_ids = encode(data, prompt_format, tokenizer)
        starts = answer_starts(data, token_ids, prompt_format, tokenizer)
        assert all(0 < s < len(ids) for s, ids in zip(starts, token_ids))
        reads, example, _, _ = read_plan(token_ids, starts, first=2, max_positions=3)
        got = collect_activations(model, token_ids, [e.group for e in data], batch_tokens=64, dtype=np.float32,
                                  progress=False, reads=reads)
        # the reference: each read as the last token of the prompt cut there, one forward per prompt
        cut = [token_ids[i][: r + 1] for i, rs in enumerate(reads) for r in rs]
        np.testing.assert_allclose(got, one_at_a_time(model, cut), atol=1e-4)
        assert len(got) == len(example)


# -- calibration


def test_ece_and_bins_by_hand():
    p = np.array([0.05, 0.15, 0.95, 0.95])
    y = np.array([0, 1, 1, 1])
    bins = reliability_bins(p, y, bins=10)
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    # |0 - .05| * 1/4 + |1 - .15| * 1/4 + |1 - .95| * 2/4
    assert expected_calibration_error(p, y, bins=10) == pytest.approx(0.05 / 4 + 0.85 / 4 + 0.05 / 2)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0
    assert expected_calibration_error(np.array([]), np.array([])) == 0.0


def test_reliability_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    p = rng.random(200)
    path = plot_reliability({"end": (p, rng.random(200) < p)}, tmp_path / "r.png", "test")
    assert path.read_bytes()[:4] == b"\x89PNG"


# -- false alarms


def test_check_positions_are_the_decoders():
    assert check_positions(0, 10) == []
    assert check_positions(4, 10) == [3]  # only the last step
    assert check_positions(12, 10) == [9, 10, 11]  # token t = j + 1 >= s, and the last


def test_firing_rate_and_max_safe_threshold():
    mins = np.array([0.1, 0.2, 0.3, 0.4] + [0.9] * 16)
    assert firing_rate(mins, 0.25) == 2 / 20
    assert firing_rate(mins, 0.1) == 0.0  # strictly below fires
    assert max_safe_threshold(mins, 0.05) == 0.2  # one answer (5% of 20) may fire: T up to the 2nd smallest
    assert firing_rate(mins, max_safe_threshold(mins, 0.05)) <= 0.05
    assert max_safe_threshold(mins, 0.0) == 0.1
    assert max_safe_threshold(np.array([0.5]), 1.0) == 1.0


def test_committed_false_alarm_set():
    pairs = load_pairs()
    assert len(pairs) >= 60 and len({q for q, _ in pairs}) == len(pairs)
    assert all(q.endswith("?") and a and len(a) < 80 for q, a in pairs)
    false = load_pairs(DEFAULT_SET.with_name("everyday_false.jsonl"))  # same questions, a false answer each
    assert [q for q, _ in false] == [q for q, _ in pairs] and all(f != t for (_, f), (_, t) in zip(false, pairs))


@pytest.fixture(scope="module")
def artifact_dir(tiny, tmp_path_factory):
    return write_synthetic_artifact(tiny[0], tmp_path_factory.mktemp("artifact"), heads=4, seed=3)


async def test_false_alarm_scores_equal_the_decoders_own(tiny_model_dir, tiny, artifact_dir):
    """Scoring an answer offline gives the scores the engine's monitor reported while generating it."""
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact_dir)], max_batch_size=2))
    await engine.start()
    try:
        ids = engine.encode_chat([{"role": "user", "content": "Is the earth flat?"}])
        replay = await collect(engine, ids, SteeringParams(mode="monitor", return_scores=True), max_tokens=12)
    finally:
        await engine.stop()
    scores = replay.finished.steering.scores
    assert len(scores) == len(replay.token_ids) > 0
    offline = monitor_scores(tiny[0], load_artifact(artifact_dir), [(ids + replay.token_ids, len(ids))],
                             progress=False)[0]
    np.testing.assert_allclose(offline, scores, atol=1e-4)


def test_score_answers_uses_the_chat_prompt(tiny, artifact_dir):
    model, tokenizer = tiny
    scored = score_answers(model, tokenizer, load_artifact(artifact_dir), [("Is it?", "Yes it is.")], 2,
                           progress=False)[0]
    assert scored.scores and all(0 <= p <= 1 for p in scored.scores)
    assert scored.checks == check_positions(len(scored.scores), 2)
    assert scored.min_check_score == min(scored.scores[j] for j in scored.checks)


# -- the builder with answer-prefix positions


def test_builder_answer_positions_report(tiny_model_dir, tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples()))
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"question": "Is snow white?", "answer": "Yes.", "label": 1, "group": "x1"}) + "\n"
                     + json.dumps({"question": "Is snow white?", "answer": "No.", "label": 0, "group": "x1"}) + "\n")
    argv = ["build", "--behavior", "tiny-pos", "--dataset", str(data), "--model", str(tiny_model_dir),
            "--out", str(tmp_path / "art"), "--num-heads", "4", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--answer-positions", "3", "--positions-from", "2", "--threshold", "0.4",
            "--extra-train", str(extra)]
    assert main(argv) == 0
    manifest = load_artifact(tmp_path / "art").manifest
    assert manifest["extra_train"]["num_examples"] == 2
    assert manifest["split"]["num_examples"]["train"] == len(examples()) + 2 - sum(
        manifest["split"]["num_examples"][k] for k in ("val", "test"))
    assert not any(i.startswith("x") for i in manifest["split"]["test_ids"] + manifest["split"]["val_ids"])
    by_position = manifest["accuracy"]["test_by_position"]
    assert by_position["all"]["rows"] > by_position["end"]["rows"] == manifest["split"]["num_examples"]["test"]
    assert all(0 <= v["ece"] <= 1 and 0 <= v["accuracy"] <= 1 for v in by_position.values())
    assert "answer-prefix positions" in manifest["activation_position"]
    fa = manifest["false_alarm"]
    assert fa["answers"] == len(load_pairs()) and fa["threshold"] == 0.4 and 0 <= fa["firing_rate"] <= 1


# -- bootstrap


def test_bootstrap_interval():
    constant = bootstrap_interval([1.0] * 30)
    assert constant == {"mean": 1.0, "low": 1.0, "high": 1.0}
    x = np.r_[np.ones(50), np.zeros(50)]
    i = bootstrap_interval(x, seed=1)
    assert i["mean"] == 0.5 and 0.38 < i["low"] < 0.45 and 0.55 < i["high"] < 0.62  # +-1.96 * 0.05
    assert bootstrap_interval(x, seed=1) == i  # seeded
    assert bootstrap_interval([])["mean"] is None
    assert format_interval(i).startswith("0.500 [")


def test_paired_difference():
    a = np.r_[np.ones(40), np.zeros(60)]
    assert paired_difference(a, a) == {"mean": 0.0, "low": 0.0, "high": 0.0}
    b = a.copy()
    b[:10] = 0  # b loses 10 questions a wins: a - b is 0.1 on every resample's share of them
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.1) and d["low"] > 0
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_generation_interval_report_pairs_rows_by_question():
    from eval.truthfulqa.gen import interval_report

    def records(truthful):
        return [{"truthful": t, "uninformative": False, "backtracks": 0, "discarded_tokens": 0, "completion_tokens": 9}
                for t in truthful]

    base = [True] * 20 + [False] * 20
    answers = {"baseline": records(base), "ITI": records(base), "FASB": records([True] * 25 + [False] * 15)}
    report = interval_report(answers)
    assert set(report["differences"]) == {"FASB - baseline", "FASB - ITI"}
    diff = report["differences"]["FASB - baseline"]["true_and_informative"]
    assert diff["mean"] == pytest.approx(5 / 40) and diff["low"] > 0  # FASB wins 5 questions and loses none
    assert report["rows"]["baseline"]["truthful"]["mean"] == 0.5
    assert report["rows"]["FASB"]["answer_tokens"] == {"mean": 9.0, "low": 9.0, "high": 9.0}


def test_auroc_and_separation():
    from steering_artifacts.builder.false_alarm import ScoredAnswer, auroc, separation_report

    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auroc([0.1], [0.9]) == 0.0 and auroc([0.5], [0.5]) == 0.5
    good = [ScoredAnswer("q1", "a", [0.9], [0]), ScoredAnswer("q2", "b", [0.4], [0])]
    bad = [ScoredAnswer("q1", "x", [0.2], [0]), ScoredAnswer("q2", "y", [0.6], [0])]
    report = separation_report(good, bad, 0.3, "f.jsonl")
    assert (report["caught"], report["detection_rate"], report["paired_correct_higher"]) == (1, 0.5, 1)
    assert report["auroc"] == 0.75
