"""The batched cache and grouped prefill: every row's logits equal a fresh full forward pass, through
joins of different lengths, rollback and re-feed, row removal and compaction."""

from types import SimpleNamespace

import pytest
import torch

from server.engine.loader import load_model
from server.engine.runners.hf.decode import decode_step
from server.engine.runners.hf.kv_cache import BatchKVCache
from server.engine.runners.prefill import PrefillGroup

PAD = 0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).model


def fresh_logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1]


def join(model, cache, prompts, chunk_tokens=512):
    """Prefill prompts[:-1] as one group and add it; returns (new rows' columns, shift)."""
    group = PrefillGroup([SimpleNamespace(prompt=p) for p in prompts], model.device, PAD)
    while not group.finished:
        group.run_chunk(model, None, chunk_tokens)
    return cache.add_rows(group.layers(), group.valid)


def step(model, cache, rows_cols, inputs):
    positions = torch.tensor([len(c) for c in rows_cols])
    column = cache.width
    logits = decode_step(model, cache, torch.tensor(inputs), positions)
    for cols in rows_cols:
        cols.append(column)
    return logits


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_rollback_then_redecode_equals_fresh_decode(tiny):
    prompt = [5, 9, 12, 7, 30]
    cache = BatchKVCache(tiny.device)
    (cols,), _ = join(tiny, cache, [prompt])
    rows = [cols]
    for token in (prompt[-1], 40, 41, 42):  # positions 4..7
        step(tiny, cache, rows, [token])
    cache.invalidate(0, rows[0][5:])  # back to prompt + [40]: drop 41, 42 and re-feed 40
    del rows[0][5:]
    assert_close(step(tiny, cache, rows, [40])[0], fresh_logits(tiny, prompt + [40]))
    assert_close(step(tiny, cache, rows, [50])[0], fresh_logits(tiny, prompt + [40, 50]))


@torch.inference_mode()
@pytest.mark.parametrize("chunk_tokens", [512, 6])
def test_grouped_prefill_of_different_lengths(tiny, chunk_tokens):
    prompts = [[5, 9, 12, 7, 30, 31, 32], [8, 3], [44]]  # the last has no context to prefill
    cache = BatchKVCache(tiny.device)
    rows, shift = join(tiny, cache, prompts, chunk_tokens)
    assert shift == 0 and [len(c) for c in rows] == [6, 1, 0]
    logits = step(tiny, cache, rows, [p[-1] for p in prompts])
    for b, prompt in enumerate(prompts):
        assert_close(logits[b], fresh_logits(tiny, prompt))


@torch.inference_mode()
def test_join_longer_rows_then_remove_and_compact(tiny):
    a, b = [5, 9, 12, 7, 30, 31, 32], [8, 3]
    cache = BatchKVCache(tiny.device)
    rows, _ = join(tiny, cache, [a, b])
    step(tiny, cache, rows, [a[-1], b[-1]])
    c = list(range(10, 22))  # longer than the batch: existing rows shift right
    width_before = cache.width
    (cols_c,), shift = join(tiny, cache, [c])
    assert shift == (len(c) - 1) - width_before > 0
    rows = [[x + shift for x in r] for r in rows] + [cols_c]
    logits = step(tiny, cache, rows, [60, 61, c[-1]])
    assert_close(logits[0], fresh_logits(tiny, a + [60]))
    assert_close(logits[1], fresh_logits(tiny, b + [61]))
    assert_close(logits[2], fresh_logits(tiny, c))
    cache.remove_rows([1, 2])
    rows = cache.compact(rows[1:])
    assert cache.width == max(len(r) for r in rows)
    logits = step(tiny, cache, rows, [70, 71])
    assert_close(logits[0], fresh_logits(tiny, b + [61, 70]))
    assert_close(logits[1], fresh_logits(tiny, c + [71]))
