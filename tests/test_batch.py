"""The running batch's bookkeeping that does not need a model."""

from types import SimpleNamespace

import torch

from server.engine.batch import Batch
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
