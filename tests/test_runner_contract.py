"""The runner contract (server/engine/runners/__init__.py), the same tests against every runner:
through prefill in chunks, rows joining a running batch, backtracks, rows leaving and the prefix
cache's reads, each row's logits equal a fresh forward pass over its tokens, and what the runner
reports of its memory is its KV cache. A new runner passes these by adding its name to RUNNERS."""

from types import SimpleNamespace

import pytest
import torch

from server.engine.loader import load_model
from server.engine.prefix_cache import PrefixCache
from server.engine.runners import RUNNERS, make_runner
from server.engine.runners.prefill import PrefillGroup
from server.steering.layers import attention_output_projections
from server.steering.taps import HeadTaps

PAD = 0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).model


@pytest.fixture(params=RUNNERS)
def runner(request, tiny):
    # The static runner eagerly here: test_static_runner.py compiles it against this eager step.
    return make_runner(request.param, tiny, None, max_rows=4, max_len=192, compile=False)


class Rows:
    """Drives a runner as the batch does: token ids and positions in, logits out."""

    def __init__(self, model, runner, prefix=None):
        self.model, self.runner, self.prefix = model, runner, prefix
        self.tokens: list[list[int]] = []  # per row: prompt + generated, every position fed so far + the next input

    def join(self, prompts, chunk_tokens=512):
        group = PrefillGroup([SimpleNamespace(prompt=p) for p in prompts], self.model.device, PAD, self.prefix)
        while not group.finished:
            self.runner.prefill(group, chunk_tokens)
        self.runner.add_group(group)
        self.tokens.extend(list(p) for p in prompts)
        return group

    def step(self, next_tokens=None):
        """Feed each row's last token; returns logits [B, V]. next_tokens: appended afterwards."""
        inputs = [t[-1] for t in self.tokens]
        positions = [len(t) - 1 for t in self.tokens]
        self.runner.set_rows(None, False)
        logits, _ = self.runner.decode(inputs, positions)
        self.fed = [list(t) for t in self.tokens]  # what each row's logits continue
        for row, token in zip(self.tokens, next_tokens or []):
            row.append(token)
        return logits

    def rollback(self, row, keep_tokens):
        """Keep the row's first `keep_tokens` tokens; the last of them is fed again next."""
        del self.tokens[row][keep_tokens:]
        self.runner.rollback(row, keep_tokens - 1)

    def remove(self, keep):
        self.runner.remove_rows(keep)
        self.tokens = [self.tokens[i] for i in keep]


def fresh_logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1]


def assert_rows_fresh(model, rows, logits):
    for b, ids in enumerate(rows.fed):
        torch.testing.assert_close(logits[b], fresh_logits(model, ids), rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_chunked_prefill_then_decode_equals_a_fresh_forward(tiny, runner):
    rows = Rows(tiny, runner)
    rows.join([[5, 9, 12, 7, 30, 2, 8, 44], [8, 3]], chunk_tokens=6)  # 3 columns per chunk
    for n in range(3):
        assert_rows_fresh(tiny, rows, rows.step([50 + n, 60 + n]))
    rows.join([list(range(10, 40))], chunk_tokens=8)  # one newcomer, a prompt longer than a chunk
    for n in range(3):
        assert_rows_fresh(tiny, rows, rows.step([50 + n, 60 + n, 70 + n]))


@torch.inference_mode()
def test_rows_joining_and_leaving_leave_every_other_row_exact(tiny, runner):
    rows = Rows(tiny, runner)
    rows.join([[5, 9, 12], [8, 3, 4, 6]])
    rows.step([20, 21])
    rows.join([list(range(10, 40))])  # wider than the running rows
    assert_rows_fresh(tiny, rows, rows.step([22, 23, 24]))
    rows.remove([1, 2])
    assert_rows_fresh(tiny, rows, rows.step([25, 26]))
    rows.join([[7, 7, 7]])  # into the place the first row left
    for _ in range(2):
        assert_rows_fresh(tiny, rows, rows.step([27, 28, 29]))


@torch.inference_mode()
def test_rollback_replays_exactly(tiny, runner):
    rows = Rows(tiny, runner)
    prompt = [5, 9, 12, 7, 30]
    rows.join([prompt, [8, 3]])
    first = None
    for token in (40, 41, 42):
        logits = rows.step([token, token])
        first = logits[0].clone() if first is None else first
    rows.rollback(0, len(prompt))  # back to the prompt: its last token is fed again
    again = rows.step([40, 43])
    torch.testing.assert_close(again[0], first)
    assert_rows_fresh(tiny, rows, rows.step([50, 51]))


@torch.inference_mode()
def test_long_backtracks_and_leaving_rows_keep_rows_exact(tiny, runner):
    # Many dropped positions: the hf runner squeezes the holes out of its cache on the way.
    rows = Rows(tiny, runner)
    rows.join([[5, 9, 12], [8, 3, 4, 6], [1, 2]])
    for n in range(80):
        rows.step([60 + n % 50] * 3)
    rows.rollback(0, 5)
    rows.rollback(2, 10)
    rows.remove([0, 2])
    for _ in range(3):
        assert_rows_fresh(tiny, rows, rows.step([70, 71]))


@torch.inference_mode()
def test_row_kv_is_what_a_prefill_of_those_tokens_computes(tiny, runner):
    rows = Rows(tiny, runner)
    rows.join([[4, 4, 4, 4, 4, 4], [5, 9, 12, 7, 30]])
    for token in (40, 41, 42):
        rows.step([token, token])
    rows.rollback(1, 6)  # prompt + [40]; position 5 (40) is fed again
    rows.step([1, 2])
    n = len(rows.tokens[1]) - 1  # positions in the cache
    reference = Rows(tiny, make_runner("hf", tiny, None, 1, 64, False)).join([rows.tokens[1]])
    for (k, v), (k_ref, v_ref) in zip(runner.row_kv(1, n), reference.row_kv(0)):
        torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_prompt_read_from_the_prefix_cache_decodes_like_one_prefilled(tiny, runner):
    config = tiny.config
    prefix = PrefixCache(config.num_hidden_layers, config.num_key_value_heads,
                         config.hidden_size // config.num_attention_heads, tiny.dtype, tiny.device, 2**20)
    rows = Rows(tiny, runner, prefix)
    system, turn = list(range(10, 30)), [5, 9, 12]
    first = rows.join([system + turn])
    prefix.insert(first.seqs[0].prompt[:-1], runner.row_kv(0, len(system + turn) - 1))
    rows.step([40])
    second = rows.join([system + [7, 7], system + turn + [40, 41, 42]])
    assert [s.cached_tokens for s in second.seqs] == [len(system), len(system + turn) - 1]  # as offered
    for _ in range(2):
        assert_rows_fresh(tiny, rows, rows.step([43, 44, 45]))
    third = rows.join([system + turn + [6, 6, 6, 6]])  # one newcomer: its cached prefix, then its own tokens
    assert third.seqs[0].cached_tokens == len(system + turn) - 1
    for _ in range(2):
        assert_rows_fresh(tiny, rows, rows.step([46, 47, 48, 49]))


@torch.inference_mode()
def test_steering_one_row_changes_only_its_logits_and_capture_reads_every_row(tiny, runner, request):
    layers = [0, 1]
    taps = HeadTaps(attention_output_projections(tiny), layers).install()
    request.addfinalizer(taps.remove)
    steered = make_runner(request.node.callspec.params["runner"], tiny, taps, 4, 64, False)
    rows = Rows(tiny, steered)
    rows.join([[5, 9, 12, 7, 30], [8, 3]])
    steer = torch.zeros(2, len(layers), tiny.config.hidden_size)  # [B, taps, hidden]
    steer[0] = 0.5
    steered.set_rows(steer, True)
    logits, captured = steered.decode([30, 3], [4, 1])
    assert captured.shape == (len(layers), 2, tiny.config.hidden_size)  # [taps, B, H*D]
    with taps.paused():  # the references unsteered
        unsteered = fresh_logits(tiny, [5, 9, 12, 7, 30]), fresh_logits(tiny, [8, 3])
    assert not torch.allclose(logits[0], unsteered[0], atol=1e-3)
    torch.testing.assert_close(logits[1], unsteered[1], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_memory_reports_the_kv_cache(tiny, runner):
    rows = Rows(tiny, runner)
    rows.join([[5, 9, 12, 7, 30], [8, 3]])
    rows.step([1, 2])
    memory = runner.memory()
    config = tiny.config
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * tiny.dtype.itemsize
    assert memory["kv_cache_positions"] >= 5 + 2  # at least every position of both rows
    assert memory["kv_cache_bytes"] == memory["kv_cache_positions"] * per_position
