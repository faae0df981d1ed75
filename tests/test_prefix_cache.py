"""Automatic prefix caching: the block store (exact keys, budget, least-recently-used eviction) and
the engine with it on (the same greedy tokens and backtracks as with it off, on both runners; a next
turn reuses the previous answer; steered positions are never cached)."""

import asyncio

import pytest
import torch

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.prefix_cache import PrefixCache
from server.engine.types import SteeringParams
from tests.engine_helpers import collect
from tests.synthetic_artifact import write_synthetic_artifact

LAYERS, HEADS, DIM, BLOCK = 2, 2, 4, 4
pytestmark = pytest.mark.usefixtures("one_thread")


def store(blocks: int) -> PrefixCache:
    per_block = LAYERS * 2 * HEADS * BLOCK * DIM * 4
    return PrefixCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), blocks * per_block, BLOCK)


def kv_for(tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values that depend on the token and its position, so a wrong block shows."""
    t = torch.tensor(tokens, dtype=torch.float32)
    pos = torch.arange(len(tokens), dtype=torch.float32)
    base = (t * 1000 + pos)[None, :, None].expand(HEADS, len(tokens), DIM)
    return [(base + layer, -(base + layer)) for layer in range(LAYERS)]


def test_a_prefix_comes_back_exactly_in_whole_blocks():
    cache = store(8)
    tokens = list(range(1, 12))  # 2 full blocks and 3 tokens
    cache.insert(tokens, kv_for(tokens))
    assert cache.blocks_used == 2
    hit = cache.lookup(tokens + [99, 98])
    assert len(hit) == 2
    for (k, v), (k_ref, v_ref) in zip(cache.read(hit), kv_for(tokens)):
        torch.testing.assert_close(k, k_ref[:, :8])
        torch.testing.assert_close(v, v_ref[:, :8])
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 0]) == hit[:1]  # the second block differs by one token
    assert cache.lookup([0] + tokens) == []  # keys name the whole prefix, not a block alone
    assert cache.lookup(tokens[:7]) == hit[:1]  # only whole blocks


def test_inserting_a_known_prefix_copies_only_its_new_blocks():
    cache = store(8)
    cache.insert(list(range(8)), kv_for(list(range(8))))
    before = cache.lookup(list(range(8)))
    longer = list(range(16))
    cache.insert(longer, kv_for(longer))
    assert cache.blocks_used == 4
    assert cache.lookup(longer)[:2] == before


def test_unique_prompts_never_grow_past_the_budget_and_the_oldest_go_first():
    cache = store(6)
    prompts = [[1000 + 10 * i + j for j in range(8)] for i in range(20)]  # each 2 blocks, all different
    for p in prompts:
        cache.insert(p, kv_for(p))
        assert cache.blocks_used <= cache.capacity == 6
    assert cache.evicted == 2 * 20 - 6
    assert len(cache.lookup(prompts[-1])) == 2 and len(cache.lookup(prompts[-3])) == 2
    assert cache.lookup(prompts[0]) == []
    for (k, _), (k_ref, _) in zip(cache.read(cache.lookup(prompts[-2])), kv_for(prompts[-2])):
        torch.testing.assert_close(k, k_ref)  # reused slots hold the new blocks, not the evicted ones


def test_a_used_prefix_outlives_newer_unused_ones_and_tails_go_before_heads():
    cache = store(4)
    shared = list(range(8))
    cache.insert(shared, kv_for(shared))
    cache.insert([50, 51, 52, 53], kv_for([50, 51, 52, 53]))
    cache.lookup(shared)  # used again: now the most recent
    cache.insert([60, 61, 62, 63, 64, 65, 66, 67], kv_for(list(range(60, 68))))  # needs 1 more block
    assert cache.lookup([50, 51, 52, 53]) == []  # the least recently used went
    assert len(cache.lookup(shared)) == 2
    cache.insert(list(range(70, 78)), kv_for(list(range(70, 78))))  # 2 more: takes [60..67]'s tail, then head
    assert len(cache.lookup(shared)) == 2


def test_a_prefix_longer_than_the_budget_keeps_its_head():
    cache = store(2)
    tokens = list(range(20))
    cache.insert(tokens, kv_for(tokens))
    assert len(cache.lookup(tokens)) == 2  # the first two blocks; the rest did not fit


def test_a_zero_budget_stores_nothing():
    cache = store(0)
    cache.insert(list(range(8)), kv_for(list(range(8))))
    assert cache.blocks_used == 0 and cache.lookup(list(range(8))) == []


# -- the engine with the cache on


def conversation_requests(engine):
    system = "You are a careful assistant who answers in short sentences. " * 3
    first = engine.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "Hello there"}])
    other = engine.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "What is rain?"}])
    return first, other


async def run_script(engine) -> list:
    """Requests one after another, as a chat client sends them: a first turn, its continuation
    (the first turn's prompt + answer + more), a request sharing only the system prompt, and a
    steered one; then the same again concurrently."""
    first, other = conversation_requests(engine)
    out = []
    a = await collect(engine, first, max_tokens=40, ignore_eos=True)
    out.append(a)
    follow = first + a.token_ids + engine.encode_prompt(" and then?", add_special_tokens=False)
    out.append(await collect(engine, follow, max_tokens=20, ignore_eos=True))
    out.append(await collect(engine, other, max_tokens=20, ignore_eos=True))
    fasb = SteeringParams(mode="fasb", threshold=0.6, backtrack_tokens=4, alpha=4.0)
    out.append(await collect(engine, first, fasb, max_tokens=30, ignore_eos=True))
    out += await asyncio.gather(*[collect(engine, p, fasb, request_id=str(i), max_tokens=16, ignore_eos=True)
                                  for i, p in enumerate([first, follow, other])])
    return out


@pytest.mark.parametrize("runner", ["hf", "static"])
async def test_greedy_tokens_and_backtracks_are_the_same_with_the_cache_on(tiny_model_dir, tmp_path, runner):
    artifact = write_synthetic_artifact(load_model(str(tiny_model_dir)).model, tmp_path, heads=4, seed=1)
    results = {}
    for budget in (0, 8):
        engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact)], max_batch_size=2,
                                 runner=runner, compile=False, prefix_cache_mb=budget))
        await engine.start()
        try:
            results[budget] = await run_script(engine)
        finally:
            await engine.stop()
    off, on = results[0], results[8]
    assert [(r.token_ids, r.backtracks) for r in on] == [(r.token_ids, r.backtracks) for r in off]
    assert all(r.finished.cached_tokens == 0 for r in off)
    first, follow, other = on[0], on[1], on[2]
    assert first.finished.cached_tokens == 0
    # the continuation reuses the first turn's prompt *and* its answer (unsteered: mode off)
    assert follow.finished.cached_tokens >= first.finished.prompt_tokens + 40 - 1  # the answer (its last token: if fed)
    assert 0 < other.finished.cached_tokens < first.finished.prompt_tokens  # the shared system prompt
    assert any(r.backtracks for r in on), "the script should include backtracking requests"


async def test_steered_positions_are_not_cached(tiny_model_dir, tmp_path):
    artifact = write_synthetic_artifact(load_model(str(tiny_model_dir)).model, tmp_path, heads=4, seed=1)
    engine = Engine(Settings(model=str(tiny_model_dir), artifacts=[str(artifact)], runner="static", compile=False,
                             prefix_cache_mb=8))
    await engine.start()
    try:
        first, _ = conversation_requests(engine)
        always = SteeringParams(mode="always", alpha=4.0)  # steered from the first generated position on
        a = await collect(engine, first, always, max_tokens=40, ignore_eos=True)
        follow = first + a.token_ids + engine.encode_prompt(" and then?", add_special_tokens=False)
        b = await collect(engine, follow, max_tokens=4)
        assert b.finished.cached_tokens == len(first) - 1  # the prompt only: its last token was fed steered
    finally:
        await engine.stop()


@pytest.mark.parametrize("interleaved", [1, 2, 70])  # one run of pool blocks (views), a few (copies), many (gather)
def test_a_prefix_spread_over_the_pool_reads_back_in_order(interleaved):
    cache = store(160)
    prefix = []
    for i in range(interleaved):
        prefix += [100 + 4 * i + j for j in range(4)]
        cache.insert(prefix, kv_for(prefix))  # one more block of the prefix...
        other = [900 + 4 * i + j for j in range(4)]
        cache.insert(other, kv_for(other))  # ...then an unrelated one between it and the next
    hit = cache.lookup(prefix)
    assert len(hit) == interleaved
    for (k, v), (k_ref, v_ref) in zip(cache.read(hit), kv_for(prefix)):
        torch.testing.assert_close(k, k_ref)
        torch.testing.assert_close(v, v_ref)
    shorter = cache.read(hit[:-1])  # a second read reuses the staging buffer
    torch.testing.assert_close(shorter[0][0], kv_for(prefix)[0][0][:, : 4 * (interleaved - 1)])


@torch.inference_mode()
def test_a_group_of_rows_each_in_pieces_of_the_pool_prefills_like_no_cache(tiny_model_dir):
    # Two newcomers whose cached prefixes each lie in two runs of the pool (read through the
    # staging buffer one after the other) get the keys/values a prefill without the cache computes.
    from types import SimpleNamespace

    from server.engine.runners.prefill import PrefillGroup

    model = load_model(str(tiny_model_dir)).model
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = PrefixCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, model.dtype, model.device,
                        2**20)

    def prefilled(prompts, prefix=None):
        group = PrefillGroup([SimpleNamespace(prompt=p) for p in prompts], model.device, 0, prefix)
        while not group.finished:
            group.run_chunk(model, None, 512)
        return group

    p1, p2 = list(range(10, 40)), list(range(50, 75))
    reference = prefilled([p1 + [7], p2 + [8]])
    kv1, kv2 = reference.row_kv(0), reference.row_kv(1)
    cache.insert(p1[:12], kv1)
    cache.insert(p2[:9], kv2)
    cache.insert(p1[:20], kv1)  # p1's blocks 12..19 land after p2's: two runs each
    cache.insert(p2[:18], kv2)
    group = prefilled([p1 + [7], p2 + [8]], cache)
    assert [s.cached_tokens for s in group.seqs] == [20, 18]
    for r, expected in enumerate((kv1, kv2)):
        for (k, v), (k_ref, v_ref) in zip(group.row_kv(r), expected):
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
