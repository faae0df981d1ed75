"""Arguments of `python -m eval mc` (multiple-choice tasks: COPA, SNLI, MMLU, WinoGrande, or a JSONL set)."""

from __future__ import annotations

import argparse

import torch

from eval.mc_tasks.data import DEFAULT_DATA_ROOT

DEFAULT_ALPHAS = (2.0, 5.0, 10.0, 20.0)
DEFAULT_THRESHOLDS = (0.4, 0.5, 0.6)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("mc", help="multiple-choice tasks: baseline / ITI / FASB accuracy on held-out items")
    p.set_defaults(run=run)
    p.add_argument("--task", required=True, help="copa, snli, mmlu, winogrande or all (a JSONL-built artifact: "
                                                 "any name, with --behavior)")
    p.add_argument("--behavior", help="artifact folder name under --artifact-root (default: the task's)")
    p.add_argument("--artifact-root", help="folder of per-behaviour artifacts (default steering_artifacts/<model>)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder holding copa/ snli/ mmlu/ winogrande/")
    p.add_argument("--limit", type=int, help="first N items of the validation and of the test split (quick runs)")
    p.add_argument("--val-limit", type=int, default=100, help="validation items swept per task (0: all)")
    p.add_argument("--alphas", type=_floats, default=DEFAULT_ALPHAS, help="ITI and FASB alphas swept on validation")
    p.add_argument("--thresholds", type=_floats, default=DEFAULT_THRESHOLDS, help="FASB thresholds swept")
    p.add_argument("--backtrack-tokens", type=int, default=10)
    p.add_argument("--batch-rows", type=int, default=64, help="options per forward pass")
    p.add_argument("--write-recommended", action="store_true", help="write the chosen values into each manifest")
    p.add_argument("--resume", action="store_true", help="reuse saved per-task results (same settings and artifact)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="JSON path (default eval/results/mc_<task>.json)")


def run(args: argparse.Namespace) -> dict:
    from eval.mc_tasks.run import TASK_BEHAVIORS, run_mc_tasks

    if args.task not in (*TASK_BEHAVIORS, "all") and not args.behavior:
        raise SystemExit(f"--task {args.task}: not a built-in task; name its artifact with --behavior")
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_mc_tasks(args)
