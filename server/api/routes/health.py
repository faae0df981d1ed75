"""GET /health (readiness), GET /health/live (liveness) and GET /metrics: for probes and scrapers,
so no API key and no request log."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.errors import EngineNotReadyError, EngineUnavailableError, ServerError, ShuttingDownError

router = APIRouter(tags=["operations"])


class EngineFailedError(ServerError):
    def __init__(self) -> None:
        super().__init__("The model failed to load; see the server log.", code="engine_failed")


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 while the server can take requests. 503 while the model loads, while it drains on
    SIGTERM, and when the decode worker is dead or stuck (restart the process); 500 if loading failed.
    A liveness probe should restart the server on 500 and on a 503 with code `engine_unhealthy`."""
    if request.app.state.engine_failed:
        raise EngineFailedError()
    state = request.app.state.engine.health()
    if state == "loading":
        raise EngineNotReadyError()
    if state == "draining":
        raise ShuttingDownError()
    if state != "ok":
        raise EngineUnavailableError(f"The decode worker is {state}; the server needs a restart.")
    return {"status": "ok"}


@router.get("/health/live")
async def live(request: Request) -> dict[str, str]:
    """Liveness: 200 while the process can still serve, loading and draining included (a liveness
    probe must not restart a server that loads its model or finishes its streams); 503
    `engine_unhealthy` when the decode worker is dead or stuck, 500 if loading failed."""
    if request.app.state.engine_failed:
        raise EngineFailedError()
    state = request.app.state.engine.health()
    if state in ("dead", "stalled"):
        raise EngineUnavailableError(f"The decode worker is {state}; the server needs a restart.")
    return {"status": state}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    engine = request.app.state.engine
    if engine.ready:
        # The engine updates the queue gauges as it schedules; reading them at scrape time as
        # well keeps them exact between scheduler steps.
        request.app.state.metrics.set_queue(**engine.stats())
    body, content_type = request.app.state.metrics.render()
    return Response(content=body, media_type=content_type)
