"""Per-request accounting: one log line and the request metrics, written when the response ends.

`RequestObserver` is a plain ASGI middleware, so "ends" means after the last byte of a stream,
not when the handler returns. Handlers fill the `RequestRecord` it puts on `request.state.record`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from uuid import uuid4

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.types import EngineEvent, Finished, TextDelta
from server.metrics import Metrics

log = logging.getLogger("server.api.requests")

# Probes and scrapes would drown the request log.
_QUIET_PATHS = frozenset({"/health", "/health/live", "/metrics"})


@dataclass
class RequestRecord:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    streamed: bool = False
    first_text_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    discarded_tokens: int = 0
    backtracks: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def observe(self, event: EngineEvent) -> None:
        if isinstance(event, TextDelta) and event.text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        elif isinstance(event, Finished):
            self.prompt_tokens = event.prompt_tokens
            self.cached_tokens = event.cached_tokens
            self.completion_tokens += event.completion_tokens
            self.discarded_tokens += event.discarded_tokens
            self.backtracks += len(event.steering.backtracks) if event.steering else 0
            self.finish_reasons.append(event.finish_reason)


def printable(text: str | None) -> str | None:
    """`text` with control characters, non-ASCII and lone surrogates backslash-escaped: a client
    can then never start a forged line in the request log (a `%0a` in the path is decoded to a
    newline before we see it)."""
    return None if text is None else text.encode("unicode_escape").decode("ascii")


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id=uuid4().hex)
        scope.setdefault("state", {})["record"] = record
        status = 500  # what the client gets if the app raises before answering

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", record.request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            self._finish(scope, record, status)

    def _finish(self, scope: Scope, record: RequestRecord, status: int) -> None:
        now = time.perf_counter()
        route = scope.get("route")
        # The route template, not the raw path, keeps the label set small.
        endpoint = getattr(route, "path", "other")
        self.metrics.observe_request(endpoint, status, now - record.started)
        if record.streamed and record.first_text_at is not None:
            self.metrics.observe_time_to_first_token(record.first_text_at - record.started)
        if scope["path"] in _QUIET_PATHS:
            return
        log.info(
            "%s %s %s model=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d discarded_tokens=%d "
            "backtracks=%d finish=%s latency_ms=%.0f status=%d",
            record.request_id, scope["method"], printable(scope["path"]), printable(record.model), record.prompt_tokens,
            record.cached_tokens, record.completion_tokens, record.discarded_tokens, record.backtracks,
            ",".join(record.finish_reasons) or "-", (now - record.started) * 1000, status,
        )
