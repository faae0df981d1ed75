"""`python -m steering_artifacts report`: an existing artifact's held-out accuracy and calibration by
answer position, on its own test questions (the same numbers a build with --answer-positions logs).

Lets an older artifact (trained at the last token only) be compared with a rebuilt one on the same
rows; activations come from the builder's cache when present.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from server.engine.loader import load_model
from server.steering.artifact import check_compatible, load_artifact
from steering_artifacts.builder.build import (
    RELIABILITY_PNG,
    BuildConfig,
    _collect,
    _position_report,
    _row_split,
    make_split,
)
from steering_artifacts.builder.calibration import plot_reliability
from steering_artifacts.builder.datasets import load_dataset

log = logging.getLogger(__name__)


def report_artifact(artifact_dir: str, dataset: str, data_dir: str | None, answer_positions: int = 4,
                    positions_from: int | None = None, model: str = "default", threads: int | None = None,
                    png: str | None = None, cache_dir: str | None = None, progress: bool = True) -> dict:
    artifact = load_artifact(artifact_dir)
    recorded = artifact.manifest["split"]
    fractions = tuple(recorded["fractions"][k] for k in ("train", "val", "test"))
    config = BuildConfig(behavior=artifact.behavior, dataset=dataset, data_dir=data_dir, model=model,
                         prompt_format=artifact.prompt_format, split=fractions, seed=recorded["seed"],
                         folds=recorded.get("folds"), fold=recorded.get("fold"),
                         backtrack_tokens=artifact.backtrack_tokens, answer_positions=answer_positions,
                         positions_from=positions_from, threads=threads, cache_dir=cache_dir, progress=progress)
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model)
    check_compatible(artifact, loaded.model)
    data = load_dataset(dataset, data_dir, seed=recorded["seed"])
    split = make_split(config, data.groups())  # the default split, or the artifact's fold
    if split.test_groups != list(recorded["test_ids"]):
        raise ValueError("the dataset's seeded split does not reproduce the artifact's test ids")
    acts = _collect(config, loaded, data, artifact.prompt_format, answer_positions)
    labels = np.array(data.labels())[acts.example]
    top = list(zip(artifact.layers.tolist(), artifact.heads.tolist()))
    weights, biases = artifact.probe_weight.double().numpy(), artifact.probe_bias.double().numpy()
    report, curves = _position_report(acts, labels, _row_split(acts, split), top, weights, biases)
    out = {"artifact": str(artifact_dir), "answer_positions": answer_positions,
           "positions_from": config.first_position, "test_by_position": report}
    if png is not None:
        path = plot_reliability(curves, png or Path(artifact_dir) / RELIABILITY_PNG,
                                f"{artifact.behavior}: held-out test answers by position\n"
                                f"(answer tokens from the {config.first_position}th, up to {answer_positions} each)")
        out["reliability_png"] = str(path) if path else None
    return out


def add_parser(commands) -> None:
    p = commands.add_parser("report", help="held-out accuracy and calibration of an artifact by answer position")
    p.add_argument("--artifact", required=True)
    p.add_argument("--dataset", default="truthfulqa")
    p.add_argument("--data-dir")
    p.add_argument("--answer-positions", type=int, default=4)
    p.add_argument("--positions-from", type=int, help="default: the artifact's recommended backtrack_tokens")
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int)
    p.add_argument("--cache-dir")
    p.add_argument("--png", help="write a reliability diagram here")


def run(args) -> int:
    out = report_artifact(args.artifact, args.dataset, args.data_dir, args.answer_positions, args.positions_from,
                          args.model, args.threads, args.png, args.cache_dir)
    print(json.dumps(out, indent=2))
    return 0
