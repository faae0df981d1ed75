"""GET /health/live, the liveness probe's endpoint (deploy/k8s): 200 while loading and draining,
unlike /health, so Kubernetes restarts only a server whose decode worker is dead or stuck."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_engine import FakeEngine
from tests.test_api_app import serving, until_ready

pytestmark = pytest.mark.asyncio


async def test_live_while_loading_ready_and_draining():
    engine = FakeEngine(start_gate=asyncio.Event())
    async with serving(engine, api_key="secret") as client:  # probes send no key
        assert (await client.get("/health/live")).json() == {"status": "loading"}
        engine.start_gate.set()
        await until_ready(engine)
        assert (await client.get("/health/live")).json() == {"status": "ok"}
        engine.begin_drain()
        assert (await client.get("/health")).status_code == 503  # readiness: take me out of rotation
        live = await client.get("/health/live")
        assert live.status_code == 200 and live.json() == {"status": "draining"}  # liveness: do not restart


@pytest.mark.parametrize("state", ["dead", "stalled"])
async def test_live_is_503_when_the_worker_is_gone(state):
    engine = FakeEngine(state=state)
    async with serving(engine) as client:
        await until_ready(engine)
        response = await client.get("/health/live")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unhealthy"


async def test_live_is_500_when_loading_failed():
    class Broken(FakeEngine):
        async def start(self):
            raise OSError("no such model folder")

    async with serving(Broken()) as client:
        await asyncio.sleep(0.01)
        assert (await client.get("/health/live")).status_code == 500

