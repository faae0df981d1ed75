"""What an evaluation runs on: the model and an artifact in process (refusing a mismatched pair as
the server does), or the real Engine in process, many chat requests at once (it batches them)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.engine import offline
from server.engine.engine import Engine
from server.engine.loader import LoadedModel, load_model
from server.engine.quantize import quantize_weights
from server.engine.types import GenerationRequest, SamplingParams, SteeringParams
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
    return offline.start_engine(model, requests=requests, max_batch_size=max_batch_size, device=device,
                                artifacts=[str(artifact_dir)])


def generate(engine: Engine, prompts: list[list[int]], steering: SteeringParams, max_tokens: int,
             desc: str) -> tuple[list[Generated], float]:
    """Greedy answers for every prompt, and the wall time they took together."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    requests = [GenerationRequest(f"{desc}-{i}", ids, sampling, steering) for i, ids in enumerate(prompts)]
    start = time.perf_counter()
    done = offline.complete_all(engine, requests, desc)
    seconds = time.perf_counter() - start
    return [Generated(c.text, c.finished.completion_tokens, c.finished.discarded_tokens, c.backtracks)
            for c in done], seconds


def stop_engine(engine: Engine) -> None:
    offline.stop_engine(engine)
