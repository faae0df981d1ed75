"""The running batch's bookkeeping that does not need a model."""

from types import SimpleNamespace

import torch

from server.engine.batch import Batch, finite_rows
from server.engine.sequence import Phase


class FlakyCancel(SimpleNamespace):
    """A row whose client hangs up between two reads of `cancelled`, as the event loop's thread can."""

    reads = 0

    @property
    def cancelled(self) -> bool:
        self.reads += 1
        return self.reads > 1


class Runner:
    def __init__(self):
        self.vocab_size, self.device, self.captures = 8, torch.device("cpu"), False
        self.kept: list[int] | None = None

    def remove_rows(self, keep: list[int]) -> None:
        self.kept = keep


def test_a_row_cancelled_while_the_batch_removes_finished_rows_is_returned_or_kept():
    runner = Runner()
    batch = Batch(runner, tokenizer=None, banks={})
    finished = SimpleNamespace(phase=Phase.DONE, cancelled=False, reported=True)
    flaky = FlakyCancel(phase=Phase.DECODE, reported=False)
    batch.rows = [finished, flaky]
    removed = batch.remove_finished()
    # Either way is right, as long as it is one: gone from the batch and returned (to be retired), or kept.
    assert (flaky in removed) != (flaky in batch.rows)
    assert finished in removed and finished not in batch.rows


def test_rows_with_a_nan_or_an_inf_anywhere_are_not_finite():
    logits = torch.randn(6, 50) * 30
    logits[1, 7] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, 49] = float("-inf")
    logits[4, 3], logits[4, 9] = float("inf"), float("-inf")
    assert finite_rows(logits).tolist() == [True, False, False, False, False, True]
    assert finite_rows(logits).tolist() == torch.isfinite(logits).all(dim=-1).tolist()
