"""Arguments of `python -m eval truthfulqa {mc,gen,sweep} ...` (see eval/README.md)."""

from __future__ import annotations

import argparse

from eval.truthfulqa.data import DEFAULT_DATA_DIR
from steering_artifacts.builder.false_alarm import DEFAULT_SET as FALSE_ALARM_SET

DEFAULT_ALPHAS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0)
DEFAULT_THRESHOLDS = (0.4, 0.5, 0.6, 0.7)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _common(p: argparse.ArgumentParser, artifact: bool = True) -> None:
    if artifact:
        p.add_argument("--artifact", required=True, help="artifact folder (qa format for mc, chat for gen)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the artifact's held-out or validation questions")
    p.add_argument("--limit", type=int, help="first N questions of the split (quick runs)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="truthfulqa/ folder")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quantization", choices=("none", "int8", "int4"), default="none",
                   help="weights as the server's --quantization (quality of a quantized model)")
    p.add_argument("--out", help="JSON path (default eval/results/<name>.json)")


def _steering(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, help="FASB alpha (default: the manifest's recommended)")
    p.add_argument("--threshold", type=float, help="FASB threshold on mean P(true) (default: recommended)")
    p.add_argument("--backtrack-tokens", type=int, help="s (default: recommended)")
    p.add_argument("--iti-alpha", type=float, help="ITI row's alpha (default: recommended iti_alpha, else alpha)")


def add_parser(benchmarks) -> None:
    tqa = benchmarks.add_parser("truthfulqa").add_subparsers(dest="task", required=True)
    mc = tqa.add_parser("mc", help="MC1/MC2/MC3: baseline, ITI, FASB")
    _common(mc)
    _steering(mc)
    mc.set_defaults(run=_run_mc)
    mc.add_argument("--batch-rows", type=int, default=16, help="answers per forward pass")
    mc.add_argument("--rows", type=lambda t: tuple(x for x in t.split(",") if x), default=("baseline", "iti", "fasb"),
                    help="comma-separated subset of baseline,iti,fasb (e.g. baseline,fasb for a quantization check)")
    gen = tqa.add_parser("gen", help="greedy generation through the Engine, judged by embedding similarity")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="chat artifact folder")
    source.add_argument("--folds-dir", help="folder of fold artifacts (fold-0 ... built with --folds K --fold all): "
                        "each fold's test questions with its own artifact, pooled (--split is ignored)")
    _common(gen, artifact=False)
    _steering(gen)
    gen.set_defaults(run=_run_gen)
    gen.add_argument("--max-tokens", type=int, default=50)
    gen.add_argument("--max-batch-size", type=int, default=8)
    sweep = tqa.add_parser("sweep", help="alpha x threshold on validation questions (MC: qa artifact, gen: chat)")
    _common(sweep)
    sweep.set_defaults(split="val", run=_run_sweep)
    sweep.add_argument("--task", choices=("mc", "gen"), help="default: mc for a qa artifact, gen for a chat one")
    sweep.add_argument("--alphas", type=_floats, default=DEFAULT_ALPHAS)
    sweep.add_argument("--thresholds", type=_floats, default=DEFAULT_THRESHOLDS)
    sweep.add_argument("--iti-alphas", type=_floats, help="ITI alphas (default: --alphas)")
    sweep.add_argument("--backtrack-tokens", type=int, default=10)
    sweep.add_argument("--batch-rows", type=int, default=16)
    sweep.add_argument("--max-tokens", type=int, default=50)
    sweep.add_argument("--max-batch-size", type=int, default=8)
    sweep.add_argument("--max-false-alarm", type=float, default=0.05,
                       help="gen: only thresholds at which the monitor fires on at most this share of correct answers")
    sweep.add_argument("--false-alarm-set", default=str(FALSE_ALARM_SET), help="gen: JSONL of correct answers")
    sweep.add_argument("--write-recommended", action="store_true", help="write the chosen values into the manifest")


def _run_mc(args) -> None:
    from eval.truthfulqa.mc import run_mc

    run_mc(args)


def _run_gen(args) -> None:
    if args.folds_dir:
        from eval.truthfulqa.folds import run_gen_folds

        run_gen_folds(args)
    else:
        from eval.truthfulqa.gen import run_gen

        run_gen(args)


def _run_sweep(args) -> None:
    from server.steering.artifact import load_artifact

    if args.iti_alphas is None:
        args.iti_alphas = args.alphas
    task = args.task or ("mc" if load_artifact(args.artifact).prompt_format == "qa" else "gen")
    if task == "mc":
        from eval.truthfulqa.mc import run_mc_sweep

        run_mc_sweep(args)
    else:
        from eval.truthfulqa.gen import run_gen_sweep

        run_gen_sweep(args)
