"""The FastAPI application: wiring only (engine lifecycle, middleware, routers, error handlers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api.deps import require_api_key
from server.api.errors import install_error_handlers
from server.api.observe import RequestObserver
from server.api.routes import chat, completions, health, models
from server.api.serving import EngineClient
from server.config import Settings
from server.metrics import Metrics

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    engine: EngineClient | None = None,
    *,
    metrics: Metrics | None = None,
    on_engine_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """An app serving `engine` (by default the real Engine for `settings`).

    The engine starts loading when the app starts, in the background, so /health can answer 503
    meanwhile. If loading fails, /health answers 500 and `on_engine_failure` is called (the CLI
    uses it to shut the server down).
    """
    metrics = metrics or Metrics()
    if engine is None:
        # Imported here: the engine module pulls in torch, which the HTTP layer does not need.
        from server.engine.engine import Engine

        engine = Engine(settings, metrics)
    app = FastAPI(title="fasb-server", summary="OpenAI-compatible server with FASB steering", lifespan=_lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.engine_failed = False
    app.state.on_engine_failure = on_engine_failure
    install_error_handlers(app)
    app.add_middleware(RequestObserver, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    for router in (chat.router, completions.router, models.router):
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(health.router)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    loading = asyncio.create_task(_start_engine(app))
    try:
        yield
    finally:
        loading.cancel()  # stops waiting for a load still in progress; engine.stop() frees it
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await app.state.engine.stop()


async def _start_engine(app: FastAPI) -> None:
    try:
        await app.state.engine.start()
    except Exception:
        log.critical("the engine failed to start", exc_info=True)
        app.state.engine_failed = True
        if app.state.on_engine_failure is not None:
            app.state.on_engine_failure()
    else:
        log.info("engine ready: serving %s", app.state.engine.model_name)
