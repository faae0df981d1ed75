"""The request queue and the worker loop that decodes the running batch.

`RequestQueue` owns admission: it bounds how many requests may wait or run (`--max-queue`) and
hands waiting ones to the worker. `Scheduler.run` is the worker thread's loop: each iteration
prefills one chunk of the newcomers that arrived together (so neither a burst of clients nor a
long prompt stalls the running streams for more than a chunk), then decodes one token for every
running row.

Failures stay where they belong: a row whose own step work fails (sampling, probe, its Python
bookkeeping) fails alone inside `Batch.step`; an exception from the batched forward pass fails the
rows of that step; a waiting request that passes its deadline fails alone. `heartbeat` lets the
engine tell a stuck or dead worker from a busy one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import torch

from server.engine.batch import Batch
from server.engine.runners.prefill import PrefillGroup
from server.engine.sequence import Sequence
from server.errors import QueueFullError, QueueTimeoutError, ServerError

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

    def discard(self, seq: Sequence) -> None:
        """Forget a waiting sequence (its client went away): its place is free at once."""
        with self._cond:
            try:
                self._waiting.remove(seq)
            except ValueError:  # already taken by the worker, which drops it after its step
                pass

    def take(self, limit: int, block: bool) -> list[Sequence]:
        """Up to `limit` waiting sequences; blocks while idle. Cancelled ones are dropped, and
        ones past their deadline fail with a 503 without running."""
        with self._cond:
            while block and not self._waiting and not self._closed:
                self._cond.wait()
            taken, expired, now = [], [], time.monotonic()
            while self._waiting and len(taken) < limit:
                seq = self._waiting.popleft()
                if seq.expired(now):
                    expired.append(seq)
                elif not seq.cancelled:
                    taken.append(seq)
            self._running += len(taken)
        for seq in expired:
            seq.fail(QueueTimeoutError())
        return taken

    def drain_waiting(self) -> list[Sequence]:
        """Remove and return every waiting sequence."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            return waiting

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
                 prefill_chunk_tokens: int = 512, on_step=None, on_retired=None):
        self.batch = batch
        self.queue = queue
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens  # prompt tokens, all newcomers together, per iteration
        self.pad_id = pad_id
        self._group: PrefillGroup | None = None  # newcomers being prefilled
        self._on_step = on_step or (lambda: None)
        self._on_retired = on_retired or (lambda seq: None)  # each sequence that left the batch
        self.heartbeat = time.monotonic()  # when the worker last started or ended an iteration
        self.waiting_for_work = False  # blocked in queue.take with nothing to run: idle, not stuck
        self._aborts: deque[ServerError] = deque()  # from other threads (deque ops are atomic): fail all with it

    def run(self) -> None:
        with torch.inference_mode():
            while not self.queue.closed:
                try:
                    self._iteration()
                except Exception:  # a bug must fail the requests it hit, not kill the worker
                    log.exception("decode step failed; failing the running requests")
                    self._fail_running()

    def stalled_for(self, now: float) -> float:
        """Seconds without progress; 0 while blocked waiting for work. A request that has just been
        queued wakes the worker, but until the thread runs the heartbeat is as old as the idle spell:
        without this, a burst arriving after a long idle spell would read as a stalled worker."""
        return 0.0 if self.waiting_for_work else now - self.heartbeat

    def abort(self, error: ServerError) -> None:
        """Fail every running and waiting request with `error` (thread-safe; used at shutdown)."""
        self._aborts.append(error)
        self.queue.wake()

    def _iteration(self) -> None:
        self.heartbeat = time.monotonic()
        while self._aborts:
            self.fail_outstanding(self._aborts.popleft())
        if self._group is None:
            idle = not self.batch.rows
            self.waiting_for_work = idle
            newcomers = self.queue.take(self.max_batch_size - len(self.batch), block=idle)
            self.waiting_for_work = False
            self.heartbeat = time.monotonic()  # waiting for work is not being stuck
            if newcomers:
                self._group = PrefillGroup(newcomers, self.batch.runner.device, self.pad_id, self.batch.prefix_cache)
                log.debug("prefilling %d newcomers (%d columns, %d from the prefix cache) beside %d running rows",
                          len(newcomers), self._group.width, self._group.cached_width, len(self.batch))
        if self._group is not None:
            self._prefill_chunk()
        if self.batch.rows:
            self._expire(time.monotonic())
            self._retire(self.batch.remove_finished())
        alone = len(self.batch.rows) == 1
        if self.batch.rows:
            self.batch.step()
        self._retire(self.batch.remove_finished())  # also drops rows whose client went away
        self._on_step()
        self.heartbeat = time.monotonic()
        if alone:
            # One stream: its token waits on the event loop's thread, and the next step would take both
            # cores first (emit -> loop 0.2-0.4 ms p50, 3.5 ms p90; with this yield 0.11 / 0.3 ms; TTFT
            # p50 -1 to -4 ms). Not for a batch: yielding every step there cost 3% tokens/s and 8 ms
            # of TTFT at 8 clients (bench/results/2026-12-07.md).
            os.sched_yield()

    def _retire(self, seqs: list[Sequence]) -> None:
        if seqs:
            self.queue.done(len(seqs))
            for seq in seqs:
                self._on_retired(seq)

    def _expire(self, now: float) -> None:
        for row in self.batch.rows:
            if row.expired(now) and not row.cancelled:
                log.info("request %s reached its deadline after %d tokens", row.request.request_id, row.decoded_tokens)
                row.expire()

    def _prefill_chunk(self) -> None:
        group = self._group
        if not group.finished:
            self.batch.runner.prefill(group, self.prefill_chunk_tokens)
        if group.finished:
            self.batch.add_group(group)
            self._group = None

    def _fail_running(self, error: ServerError | None = None) -> None:
        failed = list(self.batch.rows) + (self._group.seqs if self._group else [])
        self._group = None
        for seq in failed:
            seq.fail(error)
        self.batch.remove_finished()
        self.queue.done(len(failed))
        for seq in failed:
            self._on_retired(seq)

    def fail_outstanding(self, error: ServerError) -> None:
        """Fail the running rows, the group being prefilled and every waiting request."""
        self._fail_running(error)
        for seq in self.queue.drain_waiting():
            seq.fail(error)
