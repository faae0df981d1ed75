"""The request queue and the worker loop that decodes the running batch.

`RequestQueue` owns admission: it bounds how many requests may wait or run (`--max-queue`) and
hands waiting ones to the worker. `Scheduler.run` is the worker thread's loop: each iteration
prefills at most one chunk of one newcomer (so a long prompt never stalls running streams for more
than a chunk), then decodes one token for every running row.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import nullcontext

import torch

from server.engine.batch import Batch
from server.engine.decode import prefill_chunk
from server.engine.sequence import Phase, Sequence
from server.errors import QueueFullError

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per worker iteration


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
    def __init__(self, batch: Batch, queue: RequestQueue, max_batch_size: int, on_step=None):
        self.batch = batch
        self.queue = queue
        self.max_batch_size = max_batch_size
        self._prefilling: deque[tuple[Sequence, object]] = deque()  # (sequence, its row cache)
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
        idle = not self.batch.rows and not self._prefilling
        room = self.max_batch_size - len(self.batch) - len(self._prefilling)
        for seq in self.queue.take(room, block=idle):
            self._prefilling.append((seq, None))
        self._prefill_one_chunk()
        if self.batch.rows:
            self.batch.step()
        finished = self.batch.remove_finished()
        if finished:
            self.queue.done(len(finished))
        self._on_step()

    def _prefill_one_chunk(self) -> None:
        while self._prefilling and self._prefilling[0][0].cancelled:
            self._prefilling.popleft()
            self.queue.done(1)
        if not self._prefilling:
            return
        seq, cache = self._prefilling[0]
        context = seq.prompt[:-1]  # the last prompt token is fed by the first decode step
        chunk = context[seq.prefilled : seq.prefilled + PREFILL_CHUNK]
        if chunk:
            with self.batch.taps.paused() if self.batch.taps else nullcontext():
                cache = prefill_chunk(self.batch.model, cache, chunk, seq.prefilled)
            seq.prefilled += len(chunk)
        if seq.prefilled >= len(context):
            self._prefilling.popleft()
            self.batch.add(seq, cache)
        else:
            self._prefilling[0] = (seq, cache)

    def _fail_all(self) -> None:
        failed = [s for s in self.batch.rows] + [s for s, _ in self._prefilling]
        self._prefilling.clear()
        for seq in failed:
            seq.phase = Phase.DONE
            seq.fail()
        self.batch.remove_finished()
        self.queue.done(len(failed))
