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


class ServiceUnavailableError(ServerError):
    """503: the server cannot take this request now; `message` and `code` say why. Subclasses only
    set the default wording, the code and how long to wait."""

    status = 503
    type = "service_unavailable"
    retry_after = 1
    default_message = "The server cannot take requests right now."
    default_code: str | None = None

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message, code=self.default_code)


class EngineNotReadyError(ServiceUnavailableError):
    retry_after = 5
    default_message = "The model is still loading."
    default_code = "model_loading"


class EngineUnavailableError(ServiceUnavailableError):
    """The decode worker died or stopped making progress: the process needs a restart."""

    retry_after = 5
    default_message = "The decode worker is not running; the server needs a restart."
    default_code = "engine_unhealthy"


class ShuttingDownError(ServiceUnavailableError):
    default_message = "The server is shutting down; retry on another replica."
    default_code = "shutting_down"


class QueueTimeoutError(ServiceUnavailableError):
    default_message = "The request waited longer than --request-timeout for a slot."
    default_code = "queue_timeout"
