"""Unit tests for the steering math: probe scores, strength, steering vectors, hooks, policy."""

import numpy as np
import pytest
import torch

from server.engine.loader import load_model
from server.engine.types import SteeringParams
from server.errors import InvalidRequestError
from server.steering.bank import BehaviorBank, head_weights, probe_probabilities
from server.steering.layers import attention_output_projections
from server.steering.policy import BehaviorDefaults, check_due, resolve_steering, steering_strength, tokens_to_drop
from server.steering.taps import HeadTaps
from tests.synthetic_artifact import synthetic_artifact


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).model


def test_probe_probabilities_match_numpy():
    acts = np.array([[[0.5, -1.0], [2.0, 0.0]], [[1.0, 1.0], [-0.5, 0.25]]], dtype=np.float32)  # [K=2, B=2, D=2]
    w = np.array([[1.0, 2.0], [-1.0, 0.5]], dtype=np.float32)
    b = np.array([0.1, -0.2], dtype=np.float32)
    expected = 1 / (1 + np.exp(-(np.einsum("kbd,kd->bk", acts, w) + b)))
    got = probe_probabilities(torch.tensor(acts), torch.tensor(w), torch.tensor(b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # b=0, k=0: 0.5*1 + -1*2 + 0.1 = -1.4
    assert got[0, 0].item() == pytest.approx(1 / (1 + np.exp(1.4)))


def test_strength_adaptive_and_fixed():
    assert steering_strength(0.25, alpha=8.0, adaptive=True) == pytest.approx(6.0)
    assert steering_strength(1.0, alpha=8.0, adaptive=True) == 0.0
    assert steering_strength(0.25, alpha=8.0, adaptive=False) == 8.0


def test_schedule_and_rollback_sizes():
    assert not check_due(3, 10, final=False)
    assert check_due(3, 10, final=True)
    assert check_due(10, 10, final=False)
    assert tokens_to_drop(3, 10) == 3  # all of them when fewer than s exist
    assert tokens_to_drop(25, 10) == 10


def test_head_weights_average_top_n():
    w = head_weights(2, 4, torch.device("cpu"))
    assert w.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_layer_vector_equals_per_head_input_shift(tiny):
    """Adding the precomputed vector to o_proj's output == adding c*sigma*u to each head slice of its input."""
    artifact = synthetic_artifact(tiny, heads=6, seed=3)
    o_projs = attention_output_projections(tiny)
    layers = sorted(set(artifact.layers.tolist()))
    bank = BehaviorBank(artifact, o_projs, layers)
    c, d = 3.0, artifact.head_dim
    x = torch.randn(2, 5, tiny.config.hidden_size)
    for slot, layer in enumerate(layers):
        shifted = x.clone()
        for k in range(artifact.num_heads):
            if int(artifact.layers[k]) == layer:
                h = int(artifact.heads[k])
                shifted[..., h * d : (h + 1) * d] += c * artifact.sigma[k] * artifact.direction[k]
        expected = o_projs[layer](shifted)
        got = o_projs[layer](x) + c * bank.unit_vectors(artifact.num_heads)[slot]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bank_scores_equal_probe_on_captured_heads(tiny):
    artifact = synthetic_artifact(tiny, heads=5, seed=4)
    o_projs = attention_output_projections(tiny)
    layers = sorted(set(artifact.layers.tolist()))
    bank = BehaviorBank(artifact, o_projs, layers)
    captured = torch.randn(len(layers), 3, tiny.config.hidden_size)  # [L, B, H*D]
    got = bank.head_probabilities(captured)
    d = artifact.head_dim
    for k in range(artifact.num_heads):
        h, slot = int(artifact.heads[k]), layers.index(int(artifact.layers[k]))
        a = captured[slot, :, h * d : (h + 1) * d]
        expected = torch.sigmoid(a @ artifact.probe_weight[k] + artifact.probe_bias[k])
        torch.testing.assert_close(got[:, k], expected)


def test_taps_install_and_remove_cleanly(tiny):
    o_projs = attention_output_projections(tiny)
    taps = HeadTaps(o_projs, [0, 1]).install()
    assert all(len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1 for m in o_projs)
    ids = torch.tensor([[1, 2, 3]])
    base = tiny(ids).logits
    taps.capture = True
    hooked = tiny(ids).logits
    torch.testing.assert_close(hooked, base)  # capturing never changes the output
    assert taps.captured().shape == (2, 1, tiny.config.hidden_size)
    taps.steer = {0: torch.zeros(1, tiny.config.hidden_size)}
    torch.testing.assert_close(tiny(ids).logits, base)  # a zero vector is the identity
    taps.remove()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in o_projs)


BEHAVIORS = {"truthfulness": BehaviorDefaults(alpha=5.0, threshold=0.5, backtrack_tokens=10, num_heads=24)}


def test_policy_layers_defaults_artifact_then_server_then_request():
    cfg = resolve_steering(None, SteeringParams(), BEHAVIORS)
    (b,) = cfg.behaviors
    assert (cfg.mode, b.alpha, b.threshold, cfg.stream_mode) == ("monitor", 5.0, 0.5, "hold")
    cfg = resolve_steering(None, SteeringParams(mode="fasb"), BEHAVIORS)  # --steering-mode fasb
    assert (cfg.mode, cfg.stream_mode) == ("fasb", "hold")
    server = SteeringParams(alpha=7.0)
    cfg = resolve_steering(SteeringParams(threshold=0.4), server, BEHAVIORS)
    (b,) = cfg.behaviors
    assert (b.alpha, b.threshold, cfg.stream_mode, cfg.max_backtracks) == (7.0, 0.4, "retract", 1)
    assert resolve_steering(SteeringParams(mode="off"), server, BEHAVIORS) is None


def test_policy_rejects_bad_values_naming_the_field():
    with pytest.raises(InvalidRequestError) as err:
        resolve_steering(SteeringParams(behavior="tone"), SteeringParams(), BEHAVIORS)
    assert err.value.param == "steering.behavior" and "truthfulness" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        resolve_steering(SteeringParams(num_heads=25), SteeringParams(), BEHAVIORS)
    assert err.value.param == "steering.num_heads"
    with pytest.raises(InvalidRequestError) as err:
        resolve_steering(SteeringParams(mode="fasb"), SteeringParams(), {})
    assert err.value.param == "steering.mode"
    assert resolve_steering(None, SteeringParams(), {}) is None  # no artifact: plain decoding


def test_policy_resolves_a_list_of_behaviours_each_with_its_own_defaults():
    behaviors = {**BEHAVIORS, "tone": BehaviorDefaults(alpha=16.0, threshold=0.4, backtrack_tokens=12, num_heads=24)}
    cfg = resolve_steering(SteeringParams(mode="fasb", behavior=("truthfulness", "tone")), SteeringParams(), behaviors)
    assert [(b.name, b.alpha, b.threshold) for b in cfg.behaviors] == [("truthfulness", 5.0, 0.5), ("tone", 16.0, 0.4)]
    assert cfg.backtrack_tokens == 12  # the longest recommended interval
    asked = SteeringParams(behavior=("tone", "truthfulness"), threshold=0.3)
    cfg = resolve_steering(asked, SteeringParams(), behaviors)
    assert [b.threshold for b in cfg.behaviors] == [0.3, 0.3]  # a request value applies to every behaviour
    with pytest.raises(InvalidRequestError) as err:
        resolve_steering(SteeringParams(behavior=("tone", "tone")), SteeringParams(), behaviors)
    assert err.value.param == "steering.behavior"


def test_always_mode_defaults_to_each_artifacts_iti_strength():
    behaviors = {"truthfulness": BehaviorDefaults(alpha=10.0, threshold=0.25, backtrack_tokens=10, num_heads=24,
                                                  iti_alpha=5.0),
                 "tone": BehaviorDefaults(alpha=16.0, threshold=0.4, backtrack_tokens=10, num_heads=24)}
    both = ("truthfulness", "tone")
    cfg = resolve_steering(SteeringParams(mode="always", behavior=both), SteeringParams(), behaviors)
    assert [b.alpha for b in cfg.behaviors] == [5.0, 16.0]  # no ITI strength recommended: alpha
    cfg = resolve_steering(SteeringParams(mode="fasb", behavior=both), SteeringParams(), behaviors)
    assert [b.alpha for b in cfg.behaviors] == [10.0, 16.0]
    cfg = resolve_steering(SteeringParams(mode="always", behavior=both), SteeringParams(alpha=3.0), behaviors)
    assert [b.alpha for b in cfg.behaviors] == [3.0, 3.0]  # a server flag (or a request value) wins
