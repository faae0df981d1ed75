"""Request output processing: a sequence's events, from the worker thread to the request's stream.

Each `Sequence` turns its tokens into events itself (output.py: text deltas, retractions, the final
`Finished`); this module carries them across threads — the worker hands each event to the
request's asyncio queue with `call_soon_threadsafe` — and counts what finished requests did in the
metrics. `GenerationStream` is what the HTTP layer iterates.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from server.engine.scheduler import RequestQueue
from server.engine.sequence import Sequence
from server.engine.types import EngineEvent, Finished
from server.metrics import Metrics


class GenerationStream:
    """Async iterator over one request's events; `cancel()` stops its generation."""

    def __init__(self, seq: Sequence, queue: asyncio.Queue, requests: RequestQueue):
        self._seq = seq
        self._queue = queue
        self._requests = requests
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, Exception):
            self._done = True
            raise event
        if isinstance(event, Finished):
            self._done = True
        return event

    def cancel(self) -> None:
        if not self._done:
            self._seq.cancelled = True
            self._requests.discard(self._seq)  # a request still waiting frees its place at once
            self._requests.wake()
        self._done = True


class OutputProcessor:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def emitter(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[EngineEvent], None]:
        """The function a sequence emits its events with (on the worker thread)."""

        def emit(event: EngineEvent) -> None:
            if isinstance(event, Finished):
                self.finished(event)
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        return emit

    def finished(self, event: Finished) -> None:
        m = self.metrics
        m.observe_tokens(event.prompt_tokens, event.completion_tokens + event.discarded_tokens, event.discarded_tokens,
                         event.cached_tokens)
        if event.steering is not None:
            m.observe_check(event.steering.checks)
            for backtrack in event.steering.backtracks:
                m.observe_backtrack(backtrack.tokens_retracted)

    def retired(self, seq: Sequence) -> None:
        """Count the work of a sequence that left without a Finished event (cancelled or failed)."""
        if not seq.reported:
            self.metrics.observe_tokens(len(seq.prompt), seq.decoded_tokens, seq.discarded)
