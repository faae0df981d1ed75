"""Exceptions the engine raises and the HTTP layer maps onto OpenAI's error envelope.

Kept free of FastAPI and torch so that both sides can import them.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base class: `status` and `type` say how the HTTP layer reports it."""

    status = 500
    type = "internal_error"

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


class QueueFullError(ServerError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str = "The server's request queue is full; retry later."):
        super().__init__(message, code="queue_full")


class EngineNotReadyError(ServerError):
    status = 503
    type = "service_unavailable"

    def __init__(self, message: str = "The model is still loading."):
        super().__init__(message, code="model_loading")
