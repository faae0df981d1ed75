"""FastAPI dependencies: the engine, the settings and the request record live on app.state."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import InvalidAPIKeyError
from server.api.observe import RequestRecord
from server.api.serving import EngineClient
from server.config import Settings
from server.errors import EngineNotReadyError, ModelNotFoundError


def get_engine(request: Request) -> EngineClient:
    """The engine, once it has loaded the model (503 before)."""
    engine: EngineClient = request.app.state.engine
    if not engine.ready:
        raise EngineNotReadyError()
    return engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_record(request: Request) -> RequestRecord:
    return request.state.record


def require_api_key(request: Request) -> None:
    """With --api-key set, every /v1 request must send `Authorization: Bearer <key>`."""
    expected = get_settings(request).api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise InvalidAPIKeyError()


def check_model(engine: EngineClient, model: str) -> None:
    if model != engine.model_name:
        raise ModelNotFoundError(model)


EngineDep = Annotated[EngineClient, Depends(get_engine)]
RecordDep = Annotated[RequestRecord, Depends(get_record)]
