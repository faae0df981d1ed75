"""A random but well-formed steering artifact for a given model, for mechanics tests."""

from __future__ import annotations

from pathlib import Path

import torch

from server.steering.artifact import SteeringArtifact, model_fingerprint, save_artifact


def synthetic_artifact(model, *, heads: int = 4, seed: int = 0, behavior: str = "synthetic",
                       alpha: float = 4.0, threshold: float = 0.5, backtrack_tokens: int = 4) -> SteeringArtifact:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(config.num_hidden_layers * config.num_attention_heads, generator=g)[:heads]
    layers, head_ids = pairs // config.num_attention_heads, pairs % config.num_attention_heads
    direction = torch.randn(heads, head_dim, generator=g)
    direction /= direction.norm(dim=1, keepdim=True)
    manifest = {
        "format_version": 1,
        "behavior": behavior,
        "model_id": "test-model",
        "fingerprint": model_fingerprint(model, layers.tolist()),
        "prompt_format": "chat",
        "recommended": {"alpha": alpha, "threshold": threshold, "backtrack_tokens": backtrack_tokens},
    }
    return SteeringArtifact(
        behavior=behavior,
        layers=layers.long(),
        heads=head_ids.long(),
        probe_weight=torch.randn(heads, head_dim, generator=g) * 0.5,
        probe_bias=torch.zeros(heads),
        direction=direction,
        sigma=torch.rand(heads, generator=g) + 0.5,
        val_accuracy=torch.linspace(0.9, 0.6, heads),
        manifest=manifest,
    )


def write_synthetic_artifact(model, folder: str | Path, **kwargs) -> Path:
    save_artifact(synthetic_artifact(model, **kwargs), folder)
    return Path(folder)
