"""One mapping from exceptions to OpenAI's error envelope, and the handlers that use it.

Every error the server answers with, from a bad field to an engine bug, goes through
`error_response`; clients never see a stack trace. Unexpected exceptions are logged where they
are caught: by Starlette's outermost middleware (it re-raises them to the server after answering)
or by the SSE stream when the response has already started.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.api.protocol import ErrorInfo, ErrorResponse
from server.errors import InvalidRequestError, ServerError

INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."


class InvalidAPIKeyError(ServerError):
    status = 401
    type = "invalid_request_error"  # what OpenAI answers for a bad key

    def __init__(self) -> None:
        super().__init__("Incorrect or missing API key; send `Authorization: Bearer <key>`.", code="invalid_api_key")


def error_response(exc: Exception) -> tuple[int, ErrorResponse]:
    """The HTTP status and envelope that report `exc`."""
    if isinstance(exc, RequestValidationError):
        exc = validation_error(exc)
    if isinstance(exc, ServerError):
        info = ErrorInfo(message=encodable(exc.message), type=exc.type, param=encodable(exc.param), code=exc.code)
        return exc.status, ErrorResponse(error=info)
    if isinstance(exc, HTTPException):
        info = ErrorInfo(message=str(exc.detail), type="invalid_request_error", code=_http_code(exc.status_code))
        return exc.status_code, ErrorResponse(error=info)
    return 500, ErrorResponse(error=ErrorInfo(message=INTERNAL_ERROR_MESSAGE, type="internal_error"))


def encodable(text: str | None) -> str | None:
    """`text` with anything UTF-8 cannot carry (a lone surrogate a client sent, echoed back in a
    message) written as a backslash escape, so the error itself can always be sent."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def retry_after_headers(exc: Exception) -> dict[str, str] | None:
    """Retry-After for errors that pass if the client waits (429 queue full, 503 loading/draining)."""
    seconds = getattr(exc, "retry_after", None) if isinstance(exc, ServerError) else None
    return None if seconds is None else {"Retry-After": str(seconds)}


def _http_code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed"}.get(status)


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """The first problem pydantic found, with `param` as the dotted path of the field."""
    first: dict[str, Any] = exc.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return InvalidRequestError(f"The request body is not valid JSON: {reason}".strip())
    param = field_path(first["loc"])
    if param is None:
        return InvalidRequestError(_BODY_MESSAGES.get(first["type"], f"Invalid request body: {first['msg']}"))
    return InvalidRequestError(f"Invalid value for `{param}`: {_readable(first)}", param=param)


_BODY_MESSAGES = {
    "missing": "The request body is empty; send a JSON object.",
    # e.g. curl -d without -H 'Content-Type: application/json' sends a form, not JSON
    "model_attributes_type": "The request body must be a JSON object sent as Content-Type: application/json.",
}


def field_path(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages.0.content"; None for the body as a whole."""
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts) or None


def _readable(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field."
    if error["type"] == "missing":
        return "this field is required."
    message = error["msg"]
    # Our own validators raise ValueError; pydantic prefixes its message with "Value error, ".
    return message.removeprefix("Value error, ") + ("" if message.endswith(".") else ".")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    status, body = error_response(exc)
    return JSONResponse(status_code=status, content=body.model_dump(), headers=retry_after_headers(exc))


def install_error_handlers(app: FastAPI) -> None:
    # `Exception` covers everything else: Starlette answers it from its outermost middleware,
    # then re-raises it so that uvicorn logs the traceback.
    for exc_type in (ServerError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, _handle)


# For the OpenAPI document: every /v1 route may answer with these.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)
}
