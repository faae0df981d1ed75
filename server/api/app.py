"""The FastAPI application: wiring only (engine lifecycle, middleware, routers, error handlers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api.admission import Admission
from server.api.errors import install_error_handlers
from server.api.observe import RequestObserver
from server.api.openapi import describe_streams
from server.api.routes import chat, completions, health, models, playground, responses, tokenize
from server.api.serving import EngineClient
from server.config import Settings
from server.errors import ShuttingDownError
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
    app.state.drain_task = None
    install_error_handlers(app)
    # Outermost last: CORS answers preflights, the observer logs every answer (401/413 included),
    # admission checks the key and the body size before routing reads anything.
    app.add_middleware(Admission, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestObserver, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    routers = (chat, responses, completions, models, tokenize, health, playground)
    for module in routers:
        app.include_router(module.router)
    describe_streams(app)
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Start draining (from the SIGTERM handler, on the event loop's thread): refuse new requests,
    give the ones in flight `--shutdown-timeout` seconds, then end the rest with an error event."""
    if app.state.drain_task is not None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # the signal came before the server started serving: nothing to drain
        return
    # A signal handler interrupts the loop wherever it is: schedule the task, do not run it here.
    loop.call_soon_threadsafe(_start_drain, app)


def _start_drain(app: FastAPI) -> None:
    if app.state.drain_task is None:
        app.state.drain_task = asyncio.ensure_future(drain(app, app.state.settings.shutdown_timeout))


async def drain(app: FastAPI, timeout_s: float) -> None:
    engine = app.state.engine
    engine.begin_drain()
    log.info("shutting down: new requests get 503; waiting up to %.0fs for %s", timeout_s, engine.stats())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not engine.idle() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not engine.idle():
        log.warning("shutdown timeout: ending %s requests with an error", engine.stats())
        engine.abort_all(ShuttingDownError("The server shut down before this request finished."))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    loading = asyncio.create_task(_start_engine(app))
    try:
        yield
    finally:
        loading.cancel()  # stops waiting for a load still in progress; engine.stop() frees it
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        if app.state.drain_task is not None:
            app.state.drain_task.cancel()
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
