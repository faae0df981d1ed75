"""Arguments of `python -m eval guard ...` (see eval/README.md, "Guard behaviours")."""

from __future__ import annotations

from pathlib import Path

from steering_artifacts.builder.guard_data import DATA_DIR

ARTIFACTS = Path(__file__).resolve().parents[2] / "steering_artifacts" / "huggingfacetb--smollm2-135m-instruct"
EVERYDAY_EXTRA = Path(__file__).resolve().parents[1] / "data" / "everyday_prompts.jsonl"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("guard", help="a guard behaviour (tone, ...): off / always (ITI) / fasb on held-out "
                              "inviting and everyday prompts, judged independently")
    p.add_argument("--behavior", default="tone", help="the behaviour (its artifact, prompts and judge)")
    p.add_argument("--artifact", help="artifact folder (default: the shipped one for --behavior)")
    p.add_argument("--prompts", help="JSONL of prompts (default steering_artifacts/data/<behavior>/prompts.jsonl)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the artifact's held-out (test) or validation topics")
    p.add_argument("--everyday-extra", default=str(EVERYDAY_EXTRA),
                   help="JSONL of everyday prompts never used in training, added to the held-out ones ('' for none)")
    p.add_argument("--inviting-extra", default="",
                   help="JSONL of inviting prompts never used in training, halved between val and test like "
                   "--everyday-extra (tone: eval/data/inviting_tone_prompts.jsonl)")
    p.add_argument("--judge", help="judge name (default: the behaviour's)")
    p.add_argument("--limit", type=int, help="first N prompts (quick runs)")
    p.add_argument("--alpha", type=float, help="FASB alpha (default: the manifest's recommended)")
    p.add_argument("--threshold", type=float, help="FASB threshold (default: recommended)")
    p.add_argument("--backtrack-tokens", type=int, help="s (default: recommended)")
    p.add_argument("--alphas", type=_floats, default=(), help="FASB alphas to sweep (default: --alpha)")
    p.add_argument("--thresholds", type=_floats, default=(), help="FASB thresholds to sweep (default: --threshold)")
    p.add_argument("--iti-alphas", type=_floats, default=(2.0, 4.0, 8.0), help="strengths of the always (ITI) rows")
    p.add_argument("--repetition-penalties", type=_floats, default=(),
                   help="rows decoded with this repetition_penalty and no steering: the always-on fix for loops "
                   "that a user would reach for first (e.g. 1.1,1.2)")
    p.add_argument("--max-changed", type=float, default=0.05,
                   help="--write-recommended: largest share of everyday answers FASB may change")
    p.add_argument("--write-recommended", action="store_true", help="write the chosen values into the manifest")
    p.add_argument("--max-tokens", type=int, default=64)
    # 1: each answer is computed alone, so it differs from `off` only where steering changed it. The
    # compiled int4 step's numbers depend on the batch bucket, which flips near-tied greedy choices.
    p.add_argument("--max-batch-size", type=int, default=1)
    p.add_argument("--model", default="default")
    p.add_argument("--runner", choices=("hf", "static"), default="static")
    p.add_argument("--quantization", choices=("none", "int8", "int4"), default="int4",
                   help="the default model's int4 is its shipped Q4_1 weights exactly")
    p.add_argument("--out", help="JSON path (default eval/results/guard_<behavior>_<split>.json)")
    p.set_defaults(run=_run)


def _run(args) -> None:
    from eval.guard.run import run_guard

    args.artifact = args.artifact or str(ARTIFACTS / args.behavior)
    args.prompts = args.prompts or str(DATA_DIR / args.behavior / "prompts.jsonl")
    run_guard(args)
