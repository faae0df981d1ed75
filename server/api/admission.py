"""Admission before routing: the API key, then the body-size limit, before any body byte is parsed.

A plain ASGI middleware, so a request without a valid key gets its 401 without its body being read,
and a body larger than `--max-body-bytes` gets a 413 as soon as that is known: at once from its
Content-Length, or once that many bytes have arrived for a chunked body. Accepted bodies are
buffered (the JSON parser needs all of it anyway) and replayed to the app, after which `receive`
goes back to the server's, so a client disconnect still reaches the handlers.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import InvalidAPIKeyError, error_response
from server.api.routes.playground import OPEN_PATHS as _PLAYGROUND_PATHS
from server.errors import PayloadTooLargeError, ServerError

# Paths that answer without a key: probes, scrapers, the API's own description and the playground
# page (which asks for the key and sends it on its API calls).
_OPEN_PATHS = frozenset({
    "/health", "/health/live", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
    *_PLAYGROUND_PATHS,
})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A refused body is read and dropped up to this many bytes; past it the connection is just closed.
_DISCARD_CAP = 256 * 1024 * 1024


class Admission:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.api_key is not None and scope["path"] not in _OPEN_PATHS and not self._authorized(headers):
            await self._refuse(scope, headers, receive, send, InvalidAPIKeyError())
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, headers, receive, send, PayloadTooLargeError(self.max_body_bytes))
            return
        body = await self._read_body(receive)
        if body is None:
            await self._refuse(scope, headers, receive, send, PayloadTooLargeError(self.max_body_bytes))
            return
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, scope: Scope, headers: dict[bytes, bytes], receive: Receive, send: Send,
                      error: ServerError) -> None:
        """Answer without parsing anything. What the client is still uploading is read and dropped
        first (up to a cap; nothing is kept), because most clients send their whole body before they
        read: closing on them would reset the connection and lose the answer. A client that sent
        `Expect: 100-continue` is waiting for this answer and sends nothing: reading would ask it
        for the body, so it is answered at once."""
        has_body = scope["method"] in _BODY_METHODS
        if has_body and headers.get(b"expect", b"").lower() != b"100-continue":
            await _discard_body(receive, cap=max(_DISCARD_CAP, 4 * self.max_body_bytes))
        await _send_error(send, error, close=has_body)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key.encode())

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is never read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see an empty body
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", ())}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _discard_body(receive: Receive, cap: int) -> None:
    size = 0
    while size <= cap:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        size += len(message.get("body", b""))


async def _send_error(send: Send, error: ServerError, close: bool) -> None:
    """Answer with the error envelope. `close`: the body was not read, so the connection cannot be
    reused for another request."""
    status, envelope = error_response(error)
    headers = [(b"content-type", b"application/json")]
    if close:
        headers.append((b"connection", b"close"))
    payload = envelope.model_dump_json().encode()
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
