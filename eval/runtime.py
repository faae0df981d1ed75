"""Load the model and an artifact for evaluation, refusing a mismatched pair as the server does."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from server.engine.loader import LoadedModel, load_model
from server.engine.quantize import quantize_weights
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
