"""The batched cache: rollback then re-decode gives the logits of a fresh decode; rows stay independent."""

import pytest
import torch

from server.engine.decode import decode_step, prefill_chunk
from server.engine.kv_cache import BatchKVCache
from server.engine.loader import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).model


def fresh_logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1]


@torch.inference_mode()
def decode_tokens(model, cache, row_tokens, rows_cols, steps_inputs):
    """Feed steps_inputs[i] (a token per row) at each row's next position; returns last logits."""
    logits = None
    for inputs in steps_inputs:
        positions = torch.tensor([len(c) for c in rows_cols])
        column = cache.width
        logits = decode_step(model, cache, torch.tensor(inputs), positions)
        for cols in rows_cols:
            cols.append(column)
    return logits


@torch.inference_mode()
def test_rollback_then_redecode_equals_fresh_decode(tiny):
    prompt = [5, 9, 12, 7, 30]
    cache = BatchKVCache(tiny.device)
    row_cache = prefill_chunk(tiny, None, prompt[:-1], 0)
    cols, _ = cache.add_row(row_cache, len(prompt) - 1)
    rows_cols = [cols]
    decode_tokens(tiny, cache, None, rows_cols, [[prompt[-1]], [40], [41], [42]])  # positions 4..7
    # back to the prompt + [40]: drop 41, 42 and re-feed 40 at position 5
    dropped = rows_cols[0][5:]
    cache.invalidate(0, dropped)
    del rows_cols[0][5:]
    logits = decode_tokens(tiny, cache, None, rows_cols, [[40]])
    torch.testing.assert_close(logits[0], fresh_logits(tiny, prompt + [40]), rtol=1e-4, atol=1e-4)
    logits = decode_tokens(tiny, cache, None, rows_cols, [[50]])
    torch.testing.assert_close(logits[0], fresh_logits(tiny, prompt + [40, 50]), rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_rows_of_different_lengths_and_removal(tiny):
    a, b = [5, 9, 12, 7, 30, 31, 32], [8, 3]
    cache = BatchKVCache(tiny.device)
    cols_a, _ = cache.add_row(prefill_chunk(tiny, None, a[:-1], 0), len(a) - 1)
    cols_b, shift = cache.add_row(prefill_chunk(tiny, None, b[:-1], 0), len(b) - 1)
    assert shift == 0 and cache.width == len(a) - 1
    rows = [cols_a, cols_b]
    logits = decode_tokens(tiny, cache, None, rows, [[a[-1], b[-1]]])
    torch.testing.assert_close(logits[0], fresh_logits(tiny, a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], fresh_logits(tiny, b), rtol=1e-4, atol=1e-4)
    # a longer newcomer left-pads the batch; existing rows shift right
    c = list(range(10, 22))
    cols_c, shift = cache.add_row(prefill_chunk(tiny, None, c[:-1], 0), len(c) - 1)
    rows = [[x + shift for x in rows[0]], [x + shift for x in rows[1]], cols_c]
    logits = decode_tokens(tiny, cache, None, rows, [[60, 61, c[-1]]])
    torch.testing.assert_close(logits[0], fresh_logits(tiny, a + [60]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], fresh_logits(tiny, b + [61]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[2], fresh_logits(tiny, c), rtol=1e-4, atol=1e-4)
    # drop row 0, compact, keep decoding
    cache.remove_rows([1, 2])
    rows = cache.compact(rows[1:])
    assert cache.width == max(len(r) for r in rows)
    logits = decode_tokens(tiny, cache, None, rows, [[70, 71]])
    torch.testing.assert_close(logits[0], fresh_logits(tiny, b + [61, 70]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], fresh_logits(tiny, c + [71]), rtol=1e-4, atol=1e-4)
