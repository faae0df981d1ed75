"""Servers for the reliability tier: the real server process on the tiny random model, with a
synthetic steering artifact so that every steering mode (and forced backtracks) can be sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.e2e.harness import ServerProcess, running_server
from tests.synthetic_artifact import write_synthetic_artifact


@pytest.fixture(scope="session")
def artifact_dir(long_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reliability-artifact")
    model = AutoModelForCausalLM.from_pretrained(long_model_dir)
    return write_synthetic_artifact(model, folder, behavior="synthetic", heads=4, seed=3)


def server_args(model_dir: Path, artifact: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--no-default-artifacts", "--artifact", str(artifact), *extra]


@pytest.fixture(scope="module")
def server(long_model_dir, artifact_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """Batches of 4, a queue of 8; everything else at its default."""
    log_path = tmp_path_factory.mktemp("reliability-logs") / "server.log"
    args = server_args(long_model_dir, artifact_dir, "--max-batch-size", "4", "--max-queue", "8")
    with running_server(args, log_path) as process:
        yield process
