"""The request queue and the worker loop that decodes the running batch.

`RequestQueue` owns admission: it bounds how many requests may wait or run (`--max-queue`) and
hands waiting ones to the worker. `Scheduler.run` is the worker thread's loop: each iteration
prefills one chunk of the newcomers that arrived together (so neither a burst of clients nor a
long prompt stalls the running streams for more than a chunk), then decodes one token for every
running row.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import nullcontext

import torch

from server.engine.batch import Batch
from server.engine.prefill import PrefillGroup
from server.engine.sequence import Sequence
from server.errors import QueueFullError

log = logging.getLogger(__name__)


class RequestQueue:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._waiting: deque[Sequence] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._closed = False

    def put(self, seq: Sequence) -> None:
        with self._cond:
            if len(self._waiting) + self._running >= self.max_queue:
                raise QueueFullError()
            self._waiting.append(seq)
            self._cond.notify()

    def take(self, limit: int, block: bool) -> list[Sequence]:
        """Up to `limit` waiting sequences (cancelled ones are dropped); blocks while idle."""
        with self._cond:
            while block and not self._waiting and not self._closed:
                self._cond.wait()
            taken = []
            while self._waiting and len(taken) < limit:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            self._running += len(taken)
            return taken

    def done(self, n: int) -> None:
        with self._cond:
            self._running -= n

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running}


class Scheduler:
    def __init__(self, batch: Batch, queue: RequestQueue, max_batch_size: int, pad_id: int,
                 prefill_chunk_tokens: int = 512, on_step=None):
        self.batch = batch
        self.queue = queue
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens  # prompt tokens, all newcomers together, per iteration
        self.pad_id = pad_id
        self._group: PrefillGroup | None = None  # newcomers being prefilled
        self._on_step = on_step or (lambda: None)

    def run(self) -> None:
        with torch.inference_mode():
            while not self.queue.closed:
                try:
                    self._iteration()
                except Exception:  # a bug must fail the requests it hit, not kill the worker
                    log.exception("decode step failed; failing the running requests")
                    self._fail_all()

    def _iteration(self) -> None:
        if self._group is None:
            idle = not self.batch.rows
            newcomers = self.queue.take(self.max_batch_size - len(self.batch), block=idle)
            if newcomers:
                self._group = PrefillGroup(newcomers, self.batch.model.device, self.pad_id)
                log.debug("prefilling %d newcomers (%d columns) beside %d running rows",
                          len(newcomers), self._group.width, len(self.batch))
        if self._group is not None:
            self._prefill_chunk()
        if self.batch.rows:
            self.batch.step()
        finished = self.batch.remove_finished()  # also drops rows whose client went away
        if finished:
            self.queue.done(len(finished))
        self._on_step()

    def _prefill_chunk(self) -> None:
        group = self._group
        if not group.finished:
            with self.batch.taps.paused() if self.batch.taps else nullcontext():
                group.run_chunk(self.batch.model, self.prefill_chunk_tokens)
        if group.finished:
            self.batch.add_group(group)
            self._group = None

    def _fail_all(self) -> None:
        failed = list(self.batch.rows) + (self._group.seqs if self._group else [])
        self._group = None
        for seq in failed:
            seq.fail()
        self.batch.remove_finished()
        self.queue.done(len(failed))
