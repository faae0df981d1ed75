"""What an evaluation runs on: the model and an artifact in process (refusing a mismatched pair as
the server does), or the real Engine in process, many chat requests at once (it batches them)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loader import LoadedModel, load_model
from server.engine.quantize import quantize_weights
from server.engine.types import Finished, GenerationRequest, Retraction, SamplingParams, SteeringParams, TextDelta
from server.steering.artifact import SteeringArtifact, check_compatible, load_artifact

log = logging.getLogger(__name__)


def load_model_and_artifact(model: str, artifact_dir: str | Path, device: str = "auto",
                            threads: int | None = None, quantization: str = "none",
                            ) -> tuple[LoadedModel, SteeringArtifact]:
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model, device=device)
    artifact = load_artifact(artifact_dir)
    check_compatible(artifact, loaded.model)
    # As the server does (server/engine/engine.py): o_proj stays as it is, so the artifact's
    # steering vectors and probes see the same weights and activations as in fp32.
    quantize_weights(loaded.model, quantization)
    log.info("artifact %s (%s format, %d heads) on %s", artifact.behavior, artifact.prompt_format,
             artifact.num_heads, loaded.model_id)
    return loaded, artifact


@dataclass(frozen=True)
class Generated:
    text: str  # the final answer, retractions applied as a client would
    completion_tokens: int
    discarded_tokens: int
    backtracks: int


def start_engine(artifact_dir: str | Path, model: str, device: str, max_batch_size: int, requests: int) -> Engine:
    """An in-process engine with only this artifact loaded; the queue holds every request at once."""
    settings = Settings(model=model, device=device, artifacts=[str(artifact_dir)], no_default_artifacts=True,
                        max_batch_size=max_batch_size, max_queue=max(requests, 1) + 8, steering_mode="off")
    engine = Engine(settings)
    engine.load()
    return engine


async def _generate_one(engine: Engine, request: GenerationRequest, progress: tqdm) -> Generated:
    text = ""
    finished: Finished | None = None
    async for event in engine.submit(request):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Retraction):
            text = text[: len(text) - len(event.text)]
        else:
            finished = event
    progress.update()
    backtracks = len(finished.steering.backtracks) if finished.steering else 0
    return Generated(text, finished.completion_tokens, finished.discarded_tokens, backtracks)


async def _generate_all(engine, prompts, steering, max_tokens, desc) -> list[Generated]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with tqdm(total=len(prompts), desc=desc, leave=False) as progress:
        requests = [GenerationRequest(f"{desc}-{i}", ids, sampling, steering) for i, ids in enumerate(prompts)]
        return await asyncio.gather(*(_generate_one(engine, r, progress) for r in requests))


def generate(engine: Engine, prompts: list[list[int]], steering: SteeringParams, max_tokens: int,
             desc: str) -> tuple[list[Generated], float]:
    """Greedy answers for every prompt, and the wall time they took together."""
    start = time.perf_counter()
    results = asyncio.run(_generate_all(engine, prompts, steering, max_tokens, desc))
    return results, time.perf_counter() - start


def stop_engine(engine: Engine) -> None:
    asyncio.run(engine.stop())
