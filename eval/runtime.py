"""Load the model and an artifact for evaluation, refusing a mismatched pair as the server does."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from server.engine.loader import LoadedModel, load_model
from server.steering.artifact import SteeringArtifact, check_compatible, load_artifact

log = logging.getLogger(__name__)


def load_model_and_artifact(model: str, artifact_dir: str | Path, device: str = "auto",
                            threads: int | None = None) -> tuple[LoadedModel, SteeringArtifact]:
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model, device=device)
    artifact = load_artifact(artifact_dir)
    check_compatible(artifact, loaded.model)
    log.info("artifact %s (%s format, %d heads) on %s", artifact.behavior, artifact.prompt_format,
             artifact.num_heads, loaded.model_id)
    return loaded, artifact
