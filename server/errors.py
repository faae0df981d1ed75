"""Exceptions the engine raises and the HTTP layer maps onto OpenAI's error envelope.

Kept free of FastAPI and torch so that both sides can import them.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base class: `status` and `type` say how the HTTP layer reports it; `retry_after` (seconds)
    becomes a Retry-After header, for errors that go away if the client waits."""

    status = 500
    type = "internal_error"
    retry_after: int | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(ServerError):
    status = 400
    type = "invalid_request_error"


class ModelNotFoundError(ServerError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", param="model", code="model_not_found")


class PayloadTooLargeError(ServerError):
    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int):
        super().__init__(
            f"The request body is larger than this server's limit of {limit} bytes (--max-body-bytes).",
            code="request_too_large",
        )


class QueueFullError(ServerError):
    status = 429
    type = "rate_limit_error"
    retry_after = 1

    def __init__(self, message: str = "The server's request queue is full; retry later."):
        super().__init__(message, code="queue_full")


class EngineNotReadyError(ServerError):
    status = 503
    type = "service_unavailable"
    retry_after = 5

    def __init__(self, message: str = "The model is still loading."):
        super().__init__(message, code="model_loading")


class EngineUnavailableError(ServerError):
    """The decode worker died or stopped making progress: the process needs a restart."""

    status = 503
    type = "service_unavailable"
    retry_after = 5

    def __init__(self, message: str = "The decode worker is not running; the server needs a restart."):
        super().__init__(message, code="engine_unhealthy")


class ShuttingDownError(ServerError):
    status = 503
    type = "service_unavailable"
    retry_after = 1

    def __init__(self, message: str = "The server is shutting down; retry on another replica."):
        super().__init__(message, code="shutting_down")


class QueueTimeoutError(ServerError):
    status = 503
    type = "service_unavailable"
    retry_after = 1

    def __init__(self) -> None:
        super().__init__("The request waited longer than --request-timeout for a slot.", code="queue_timeout")
