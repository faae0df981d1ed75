"""The engine in-process, without HTTP: what the builder and the evaluations run many requests on.

`start_engine` makes an engine as the server would (its runner, quantization and artifacts);
`complete_all` submits every request at once and returns each one's final answer as a client would
see it: retracted text removed, and the `Finished` event with its usage and steering report.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tqdm import tqdm

from server.config import Settings
from server.engine.engine import Engine
from server.engine.types import Finished, GenerationRequest, Retraction, TextDelta


@dataclass(frozen=True)
class Completion:
    text: str  # the answer, retractions applied
    finished: Finished

    @property
    def backtracks(self) -> int:
        return len(self.finished.steering.backtracks) if self.finished.steering else 0


def start_engine(model: str, *, requests: int, max_batch_size: int, runner: str = "hf",
                 quantization: str = "none", device: str = "auto", artifacts: list[str] | None = None) -> Engine:
    """A loaded engine with only `artifacts` (no default ones) and steering off unless a request asks;
    its queue holds `requests` at once."""
    settings = Settings(model=model, runner=runner, quantization=quantization, device=device,
                        max_batch_size=max_batch_size, max_queue=max(requests, 1) + 8, steering_mode="off",
                        artifacts=list(artifacts or []), no_default_artifacts=True)
    engine = Engine(settings)
    engine.load()
    return engine


def stop_engine(engine: Engine) -> None:
    asyncio.run(engine.stop())


async def complete(engine: Engine, request: GenerationRequest) -> Completion:
    """One request's final answer; an engine error is raised."""
    text = ""
    async for event in engine.submit(request):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Retraction):
            text = text[: len(text) - len(event.text)]
        elif isinstance(event, Finished):
            return Completion(text, event)
    raise RuntimeError(f"request {request.request_id} ended without finishing")


def complete_all(engine: Engine, requests: list[GenerationRequest], desc: str = "answers") -> list[Completion]:
    """Every request's final answer, in order; the engine batches them as it would a server's clients."""

    async def run() -> list[Completion]:
        with tqdm(total=len(requests), desc=desc, unit="answer", mininterval=5, leave=False) as bar:
            async def one(request: GenerationRequest) -> Completion:
                done = await complete(engine, request)
                bar.update()
                return done

            return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(run())
