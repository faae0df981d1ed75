"""Training data for a guard behaviour: the model's own answers to inviting and everyday prompts, judged.

`python -m steering_artifacts guard-data --behavior tone` reads the behaviour's prompts
(`steering_artifacts/data/<behavior>/prompts.jsonl`: `{"id", "kind", "topic", "prompt"}` per line,
kind `inviting` or `everyday`), has the served engine answer each one greedily and `--samples` times
sampled, labels every distinct answer with the behaviour's independent judge
(`steering_artifacts/builder/judges.py`) and writes `answers.jsonl` beside the prompts: one line per
answer with `group` = the prompt's topic, so the builder splits by topic and no topic is in two
splits. It also writes `prefixes.jsonl`: every answer cut after 10, 20, 32 and 48 tokens and whole,
the positions where the monitor checks an answer while it is being written. Each piece is labelled
with its whole answer's verdict (`--prefix-labels answer`, the default): a check must tell where the
answer is heading, early enough for FASB to back up. Its own verdict is kept in `prefix_label`;
`--prefix-labels own` trains on that instead (an answer that turns hostile at its end was calm at
its start). On `tone`, answer labels raised the monitor's held-out AUROC (lowest check 0.81 to 0.84)
and make it fire earlier, often at the first check, where FASB regenerates the whole answer: there
a strong alpha drags answers off the prompt's topic, so the alpha is chosen again with them
(eval/results/). `python -m steering_artifacts build --dataset <prefixes.jsonl>` trains the probes
on it (README of steering_artifacts/data/<behavior>).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from steering_artifacts.builder.judges import judge_for

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str  # "inviting" or "everyday"
    topic: str
    prompt: str


def load_prompts(path: str | Path) -> list[Prompt]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Prompt(r["id"], r["kind"], r["topic"], r["prompt"]) for r in rows]


def answer_all(engine, prompts: list[Prompt], samples: int, max_tokens: int, temperature: float,
               seed: int) -> list[tuple[Prompt, str, str]]:
    """(prompt, "greedy" | "sample", answer) for every prompt: one greedy answer and `samples` sampled ones."""
    from server.engine.offline import complete_all
    from server.engine.types import GenerationRequest, SamplingParams

    jobs = []
    for i, p in enumerate(prompts):
        ids = engine.encode_chat([{"role": "user", "content": p.prompt}])
        jobs.append((p, "greedy", GenerationRequest(f"{p.id}-g", ids, SamplingParams(max_tokens=max_tokens,
                                                                                     temperature=0.0), None)))
        for k in range(samples):
            sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + 1000 * i + k)
            jobs.append((p, "sample", GenerationRequest(f"{p.id}-s{k}", ids, sampling, None)))

    texts = [c.text for c in complete_all(engine, [job[2] for job in jobs])]
    return [(p, kind, text.strip()) for (p, kind, _), text in zip(jobs, texts)]


def label(behavior: str, answered: list[tuple[Prompt, str, str]]) -> list[dict]:
    """One record per distinct non-empty answer of a prompt, with the judge's label and score."""
    seen, kept = set(), []
    for p, kind, text in answered:
        if text and (p.id, text) not in seen:
            seen.add((p.id, text))
            kept.append((p, kind, text))
    verdicts = judge_for(behavior).judge([text for _, _, text in kept])
    return [{"id": f"{p.id}-{i}", "group": p.topic, "prompt_id": p.id, "kind": p.kind, "sample": kind,
             "question": p.prompt, "answer": text, "label": int(v.desired), "judge_score": round(v.score, 4)}
            for i, ((p, kind, text), v) in enumerate(zip(kept, verdicts))]


PREFIX_CUTS = (10, 20, 32, 48)  # answer tokens; the monitor's checks start at the 10th


def prefix_examples(behavior: str, records: list[dict], tokenizer, cuts=PREFIX_CUTS,
                    labels: str = "answer") -> list[dict]:
    """Each answer cut after each of `cuts` tokens it is longer than, and whole; each piece judged anew
    (`judge_score`) and labelled with its answer's verdict (`labels="answer"`; its own then in
    `prefix_label`) or with its own (`"own"`)."""
    if labels not in ("answer", "own"):
        raise ValueError(f"labels must be 'answer' or 'own'; got {labels!r}")
    pieces = []
    for r in records:
        ids = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        for n in sorted({c for c in cuts if c < len(ids)} | {len(ids)}):
            text = tokenizer.decode(ids[:n]).strip()
            if text:
                pieces.append({**r, "id": f"{r['id']}-t{n}", "answer": text, "prefix_tokens": n,
                               "whole": n == len(ids)})
    verdicts = judge_for(behavior).judge([p["answer"] for p in pieces])
    out = []
    for p, v in zip(pieces, verdicts):
        own = {"label": int(v.desired), "judge_score": round(v.score, 4)}
        if labels == "answer":  # the piece carries its answer's label; its own verdict goes beside it
            own = {**own, "label": p["label"], "prefix_label": own["label"]}
        out.append({**p, **own})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def summarize(records: list[dict]) -> dict:
    """Undesired answers per prompt kind, for the log and the docs."""
    out = {}
    for kind in sorted({r["kind"] for r in records}):
        members = [r for r in records if r["kind"] == kind]
        out[kind] = {"answers": len(members), "undesired": sum(1 - r["label"] for r in members),
                     "greedy_undesired": sum(1 - r["label"] for r in members if r["sample"] == "greedy"),
                     "greedy": sum(r["sample"] == "greedy" for r in members)}
    return out


def run(args) -> int:
    from server.engine.loader import load_model
    from server.engine.offline import start_engine, stop_engine

    folder = DATA_DIR / args.behavior
    out = Path(args.out or folder / "answers.jsonl")
    if args.reuse_answers:
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    else:
        prompts = load_prompts(args.prompts or folder / "prompts.jsonl")
        start = time.perf_counter()
        engine = start_engine(args.model, requests=len(prompts) * (1 + args.samples), runner=args.runner,
                              quantization=args.quantization, max_batch_size=args.max_batch_size)
        try:
            answered = answer_all(engine, prompts, args.samples, args.max_tokens, args.temperature, args.seed)
        finally:
            stop_engine(engine)
        records = label(args.behavior, answered)
        _write_jsonl(out, records)
        log.info("%d answers to %d prompts in %.0f s -> %s; undesired by kind: %s", len(records), len(prompts),
                 time.perf_counter() - start, out, json.dumps(summarize(records)))
    pieces = prefix_examples(args.behavior, records, load_model(args.model).tokenizer, labels=args.prefix_labels)
    _write_jsonl(out.with_name("prefixes.jsonl"), pieces)
    log.info("%d judged prefixes -> %s (%d undesired)", len(pieces), out.with_name("prefixes.jsonl"),
             sum(1 - p["label"] for p in pieces))
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser("guard-data", help="the model's own answers to a guard behaviour's prompts, judged")
    p.add_argument("--behavior", required=True,
                   help="tone, insults or repetition (a judge in steering_artifacts/builder/judges.py)")
    p.add_argument("--prompts", help="JSONL of prompts (default steering_artifacts/data/<behavior>/prompts.jsonl)")
    p.add_argument("--out", help="JSONL of judged answers (default: answers.jsonl beside the prompts)")
    p.add_argument("--model", default="default")
    p.add_argument("--runner", default="static", choices=("hf", "static"))
    p.add_argument("--quantization", default="int4", choices=("none", "int8", "int4"))
    p.add_argument("--samples", type=int, default=2, help="sampled answers per prompt, besides the greedy one")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--prefix-labels", choices=("answer", "own"), default="answer",
                   help="label each prefix with its whole answer's verdict (default) or with its own")
    p.add_argument("--reuse-answers", action="store_true",
                   help="read the judged answers already in --out and only rewrite prefixes.jsonl beside them")
