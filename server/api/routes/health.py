"""GET /health and GET /metrics: for probes and scrapers, so no API key and no request log."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.errors import EngineNotReadyError, ServerError

router = APIRouter(tags=["operations"])


class EngineFailedError(ServerError):
    def __init__(self) -> None:
        super().__init__("The model failed to load; see the server log.", code="engine_failed")


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 once the model is loaded; 503 while it loads; 500 if loading failed."""
    if request.app.state.engine_failed:
        raise EngineFailedError()
    if not request.app.state.engine.ready:
        raise EngineNotReadyError()
    return {"status": "ok"}


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
