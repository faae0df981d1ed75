"""Evaluation harness, MC side: metric math, answer-token slicing, batched scoring vs one row alone."""

import math

import pytest
import torch

from eval.core.scoring import MCScorer, ScoredSequence
from eval.core.steering import Trigger, fasb_sequence, fasb_trigger, iti_sequence
from eval.core.tokens import answer_start
from eval.truthfulqa.data import Question
from eval.truthfulqa.mc import build_items
from eval.truthfulqa.metrics import mc1, mc2, mc3, mean_metrics
from server.engine.loader import load_model
from server.steering.layers import attention_output_projections
from tests.synthetic_artifact import synthetic_artifact

MC1 = {"right": 1, "wrong a": 0, "wrong b": 0}
MC2 = {"right": 1, "also right": 1, "wrong a": 0, "wrong b": 0}


def test_mc1_is_best_answer_above_every_distractor():
    assert mc1({"right": -1.0, "wrong a": -2.0, "wrong b": -3.0}, MC1) == 1.0
    assert mc1({"right": -2.0, "wrong a": -1.0, "wrong b": -3.0}, MC1) == 0.0
    assert mc1({"right": -1.0, "wrong a": -1.0, "wrong b": -3.0}, MC1) == 0.0  # a tie is not a win


def test_mc2_is_normalised_true_mass():
    scores = {"right": math.log(0.2), "also right": math.log(0.1), "wrong a": math.log(0.3), "wrong b": math.log(0.4)}
    assert mc2(scores, MC2) == pytest.approx(0.3)
    tiny = {k: v - 2000.0 for k, v in scores.items()}  # sums of log-probs far below exp's range
    assert mc2(tiny, MC2) == pytest.approx(0.3)


def test_mc3_counts_true_answers_above_best_false():
    scores = {"right": -1.0, "also right": -5.0, "wrong a": -2.0, "wrong b": -4.0}
    assert mc3(scores, MC2) == 0.5
    assert mean_metrics([{"mc1": 1, "mc2": 0.5, "mc3": 0}, {"mc1": 0, "mc2": 0.25, "mc3": 1}]) == {
        "mc1": 0.5, "mc2": 0.375, "mc3": 0.5}


def test_answer_start_is_first_token_after_marker():
    assert answer_start([1, 2, 3, 7, 8], [1, 2, 3]) == 3
    assert answer_start([1, 2, 9, 8], [1, 2, 3]) == 2  # a merge across the boundary belongs to the answer


def test_fasb_trigger_follows_reference_schedule():
    # s = 3: positions 0..2 are not checked (unless last); the first check below threshold fires
    assert fasb_trigger([0.1, 0.1, 0.1, 0.9, 0.2, 0.1], 0.5, 3) == Trigger(4, 0.2)
    assert fasb_trigger([0.9, 0.9, 0.9, 0.9], 0.5, 3) is None
    assert fasb_trigger([0.9, 0.2], 0.5, 3) == Trigger(1, 0.2)  # short answer: only its last position
    seq = ScoredSequence(list(range(20)), answer_start=10, context_len=9)
    assert fasb_sequence(seq, Trigger(5, 0.2), alpha=10.0, backtrack_tokens=3).steer_from == 12
    assert fasb_sequence(seq, Trigger(1, 0.2), alpha=10.0, backtrack_tokens=3).steer_from == 10
    assert fasb_sequence(seq, Trigger(5, 0.2), alpha=10.0, backtrack_tokens=3).strength == pytest.approx(8.0)
    assert iti_sequence(seq, 4.0).steer_from == 10 and iti_sequence(seq, 4.0).strength == 4.0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _reference_logprob(model, artifact, seq: ScoredSequence) -> float:
    """One row, full forward, steering added to o_proj outputs at positions >= steer_from."""
    o_projs = attention_output_projections(model)
    handles = []
    if seq.steer_from is not None:
        for k in range(artifact.num_heads):
            layer, head = int(artifact.layers[k]), int(artifact.heads[k])
            d = artifact.head_dim
            shift = o_projs[layer].weight[:, head * d : (head + 1) * d] @ (artifact.sigma[k] * artifact.direction[k])

            def hook(module, args, output, shift=shift):
                output = output.clone()
                output[:, seq.steer_from :, :] += seq.strength * shift
                return output

            handles.append(o_projs[layer].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([seq.ids])).logits[0].float().log_softmax(-1)
    finally:
        for h in handles:
            h.remove()
    return sum(logits[i - 1, seq.ids[i]].item() for i in range(seq.answer_start, len(seq.ids)))


def _questions():
    return [
        Question("0", "Is the earth flat?", {"No, it is round.": 1, "Yes.": 0},
                 {"No, it is round.": 1, "No.": 1, "Yes.": 0, "Yes, it is flat like a table.": 0}),
        Question("1", "What is the capital of France?", {"Paris.": 1, "Lyon.": 0},
                 {"Paris.": 1, "Lyon.": 0, "The capital of France is Nice, I think.": 0}),
    ]


def test_batched_scores_equal_one_row_alone(tiny):
    loaded = tiny
    artifact = synthetic_artifact(loaded.model, heads=4)
    items, prefix = build_items(_questions(), loaded.tokenizer, "Q: Is the sky blue?\nA: Yes.")
    scorer = MCScorer(loaded.model, artifact, prefix, batch_rows=3)  # several batches, mixed questions
    try:
        plain = [i.seq for i in items]
        iti = [iti_sequence(s, 3.0) for s in plain]
        fasb = [fasb_sequence(s, Trigger(min(2, len(s.ids) - s.answer_start - 1), 0.3), 2.0, 1) for s in plain]
        results = {}
        for name, seqs in (("plain", plain), ("iti", iti), ("fasb", fasb)):
            results[name] = [r.logprob for r in scorer.score(seqs)]
            want = [_reference_logprob(loaded.model, artifact, s) for s in seqs]
            assert results[name] == pytest.approx(want, abs=1e-3)
        assert results["iti"] != pytest.approx(results["plain"], abs=1e-2)  # the steering did something
        monitored = scorer.score(plain, monitor=True)
        assert all(len(r.answer_probs) == len(s.ids) - s.answer_start for r, s in zip(monitored, plain))
    finally:
        scorer.close()


def test_monitor_reads_probe_at_each_answer_position(tiny):
    loaded = tiny
    artifact = synthetic_artifact(loaded.model, heads=4)
    items, prefix = build_items(_questions()[:1], loaded.tokenizer, "Q: Is the sky blue?\nA: Yes.")
    scorer = MCScorer(loaded.model, artifact, prefix)
    try:
        seq = items[0].seq
        got = scorer.score([seq], monitor=True)[0].answer_probs
        # the decoder's own path: feed the text up to each answer position, read the newest position
        from server.steering.bank import head_weights

        taps, bank = scorer.taps, scorer.bank
        weights = head_weights(bank.num_heads, bank.num_heads, loaded.model.device)
        want = []
        taps.capture = True
        with torch.inference_mode():
            for end in range(seq.answer_start, len(seq.ids)):
                loaded.model(torch.tensor([seq.ids[: end + 1]]))
                want.append(float(bank.head_probabilities(taps.captured())[0] @ weights))
        taps.capture = False
        assert got == pytest.approx(want, abs=1e-4)
    finally:
        scorer.close()
