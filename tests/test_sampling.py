"""Unit tests for batched per-row sampling and logprobs (server/engine/sampling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.sampling import SamplingTensors, compute_logprobs, sample, top_k_top_p_mask
from server.engine.types import SamplingParams

VOCAB = 50


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=seeded(seed)) * 3


def tensors(*params: SamplingParams) -> SamplingTensors:
    return SamplingTensors.from_params(list(params), "cpu")


def test_from_params_builds_row_tensors_and_flags():
    st = tensors(SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9))
    assert st.temperature.tolist() == pytest.approx([0.0, 0.7])
    assert st.top_k.dtype == torch.long and st.top_k.tolist() == [0, 5]
    assert st.top_p.tolist() == pytest.approx([1.0, 0.9])
    assert (st.all_greedy, st.any_top_k, st.any_top_p) == (False, True, True)
    assert tensors(SamplingParams(temperature=0.0)).all_greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype):
    logits = random_logits(6).to(dtype)
    st = tensors(*[SamplingParams(temperature=0.0)] * 6)
    ids = sample(logits, st, [None] * 6)
    assert ids.dtype == torch.long
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_greedy_ties_pick_lowest_id():
    logits = torch.zeros(2, VOCAB)
    logits[0, [7, 3, 30]] = 5.0
    logits[1, [12, 40]] = 1.0
    ids = sample(logits, tensors(*[SamplingParams(temperature=0.0)] * 2), [None, None])
    assert ids.tolist() == [3, 12]


def test_all_greedy_fast_path_draws_no_noise():
    # Greedy rows must not consume their generator: a seeded request keeps its stream.
    gen = seeded(1)
    before = gen.get_state()
    sample(random_logits(1), tensors(SamplingParams(temperature=0.0)), [gen])
    assert torch.equal(gen.get_state(), before)


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = random_logits(4)
    st = tensors(
        SamplingParams(temperature=0.0), SamplingParams(temperature=1.5),
        SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_p=0.9),
    )
    for step in range(20):
        ids = sample(logits, st, [seeded(step), None, None, seeded(step + 100)])
        assert ids[[0, 2]].tolist() == logits.argmax(dim=-1)[[0, 2]].tolist()


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.7, top_k=1), SamplingParams(temperature=1.7, top_p=1e-6)]
)
def test_top_k_1_and_tiny_top_p_equal_greedy(params):
    logits = random_logits(8, seed=3)
    st = tensors(*[params] * 8)
    for seed in range(10):
        ids = sample(logits, st, [seeded(seed * 8 + row) for row in range(8)])
        assert torch.equal(ids, logits.argmax(dim=-1))


def test_top_k_only_samples_from_the_k_best():
    logits = random_logits(1, seed=5)
    allowed = set(logits[0].topk(3).indices.tolist())
    st = tensors(SamplingParams(temperature=5.0, top_k=3))  # hot, so all k get drawn
    drawn = {sample(logits, st, [seeded(s)]).item() for s in range(200)}
    assert drawn == allowed


def mask_for(probs: list[float], top_k: int = 0, top_p: float = 1.0) -> list[bool]:
    logits = torch.tensor([probs]).log()  # [1, V]
    return top_k_top_p_mask(logits, torch.tensor([top_k]), torch.tensor([top_p]))[0].tolist()


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.4, 1), (0.75, 2), (0.85, 3), (0.99, 4), (1.0, 4), (0.0, 1)],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    probs = [0.15, 0.5, 0.05, 0.3]  # best first: ids 1, 3, 0, 2 (cumulative .5, .8, .95, 1)
    removed = mask_for(probs, top_p=top_p)
    kept_ids = {i for i, r in enumerate(removed) if not r}
    assert kept_ids == set([1, 3, 0, 2][:kept])


def test_top_k_applies_before_top_p():
    # After top-k=2 the nucleus sees 0.4/0.7 = 0.57 >= 0.5, so only the best token survives.
    # Applying top-p to the unrestricted distribution would keep two tokens (0.4 < 0.5).
    removed = mask_for([0.4, 0.3, 0.2, 0.1], top_k=2, top_p=0.5)
    assert removed == [False, True, True, True]


def test_mask_rows_use_their_own_parameters():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3).log()
    removed = top_k_top_p_mask(logits, torch.tensor([0, 3, 0]), torch.tensor([1.0, 1.0, 0.6]))
    assert removed.tolist() == [[False] * 4, [False, False, False, True], [False, False, True, True]]


def run_row(logits_steps: list[torch.Tensor], row: int, params: list[SamplingParams], gens: list) -> list[int]:
    st = tensors(*params)
    return [sample(step, st, gens)[row].item() for step in logits_steps]


def test_seeded_row_is_reproducible_and_independent_of_batch():
    target = SamplingParams(temperature=1.3, top_k=20, top_p=0.95, seed=42)
    steps = [random_logits(1, seed=s) for s in range(25)]  # the target row's logits per step
    alone = run_row(steps, 0, [target], [seeded(42)])
    assert alone == run_row(steps, 0, [target], [seeded(42)])

    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.5), SamplingParams(seed=7)]
    noise = [random_logits(3, seed=100 + s) for s in range(25)]
    batch_first = [torch.cat([s, n]) for s, n in zip(steps, noise)]
    batch_last = [torch.cat([n, s]) for s, n in zip(steps, noise)]
    assert alone == run_row(batch_first, 0, [target, *others], [seeded(42), None, None, seeded(7)])
    assert alone == run_row(batch_last, 3, [*others, target], [None, None, seeded(7), seeded(42)])


def test_different_seeds_give_different_sequences():
    steps = [torch.zeros(1, VOCAB) for _ in range(20)]  # uniform: any seed dependence shows
    params = [SamplingParams(temperature=1.0)]
    assert run_row(steps, 0, params, [seeded(1)]) != run_row(steps, 0, params, [seeded(2)])


def draw_frequencies(probs: list[float], temperature: float, draws: int = 4000) -> torch.Tensor:
    logits = torch.tensor(probs).log().expand(draws, -1)  # [draws, V]: one draw per row
    st = tensors(*[SamplingParams(temperature=temperature)] * draws)
    ids = sample(logits, st, [seeded(i) for i in range(draws)])
    return torch.bincount(ids, minlength=len(probs)).float() / draws


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    probs = [0.1, 0.2, 0.3, 0.4]
    tempered = [p ** (1 / temperature) for p in probs]  # softmax(log p / T) ∝ p^(1/T)
    expected = torch.tensor(tempered) / sum(tempered)
    observed = draw_frequencies(probs, temperature)
    # 4000 draws: the standard error is at most ~0.008, so 0.035 is a > 4-sigma bound.
    assert torch.allclose(observed, expected, atol=0.035), (observed, expected)


def test_sample_rejects_wrong_number_of_generators():
    with pytest.raises(ValueError):
        sample(random_logits(2), tensors(*[SamplingParams()] * 2), [None])


def test_compute_logprobs_uses_raw_distribution():
    logits = random_logits(3).to(torch.bfloat16)
    tokens = torch.tensor([4, 0, 49])
    chosen, top_lp, top_ids = compute_logprobs(logits, tokens, top_n=5)
    expected = torch.log_softmax(logits.float(), dim=-1)  # [3, V]
    assert chosen.dtype == top_lp.dtype == torch.float32
    assert torch.allclose(chosen, expected[torch.arange(3), tokens])
    assert top_lp.shape == top_ids.shape == (3, 5)
    assert torch.equal(top_ids[:, 0], logits.float().argmax(dim=-1))
    assert torch.all(top_lp[:, :-1] >= top_lp[:, 1:])  # best first
    assert torch.allclose(top_lp, expected.gather(1, top_ids))
    assert torch.allclose(expected.exp().sum(-1), torch.ones(3))


def test_compute_logprobs_top_n_zero_and_over_vocab():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    chosen, top_lp, top_ids = compute_logprobs(logits, torch.tensor([1]), top_n=0)
    assert chosen.item() == pytest.approx(math.log(0.75)) and top_lp.shape == (1, 0)
    _, top_lp, top_ids = compute_logprobs(logits, torch.tensor([1]), top_n=10)
    assert top_ids.tolist() == [[1, 0]]
