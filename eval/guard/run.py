"""`python -m eval guard`: off / ITI / FASB on held-out inviting and everyday prompts, judged independently.

Every row answers the same prompts greedily through the served engine; `off` runs with the monitor on
(which never changes a token), so its answers also give the probes' scores. The unwanted behaviour is
counted by the behaviour's judge (steering_artifacts/builder/judges.py), and an answer that loops
(eval/guard/metrics.py) is never counted as fixed. Everyday answers are compared with `off` as exact
text: FASB's promise is that they stay byte-identical.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass

from eval.core.bootstrap import format_interval
from eval.core.recommended import write_recommended
from eval.core.report import print_table, write_json
from eval.guard import metrics
from server.engine.offline import Completion, complete_all, start_engine, stop_engine
from server.engine.types import GenerationRequest, SamplingParams, SteeringParams
from server.steering.artifact import load_artifact
from steering_artifacts.builder.guard_data import Prompt, load_prompts
from steering_artifacts.builder.judges import judge_for, loops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    text: str
    completion_tokens: int
    discarded_tokens: int
    backtracks: int
    fired: tuple[str, ...]  # behaviours named by the backtracks
    scores: list[float] | None  # per answer token, with return_scores


def _answer(done: Completion) -> Answer:
    report = done.finished.steering
    fired = tuple(name for b in (report.backtracks if report else []) for name in b.behaviors)
    return Answer(done.text.strip(), done.finished.completion_tokens, done.finished.discarded_tokens,
                  done.backtracks, fired, report.scores if report else None)


def held_out(prompts: list[Prompt], manifest: dict, split: str) -> list[Prompt]:
    """The prompts whose topic the artifact's build kept out of training (its test or validation groups)."""
    groups = set(manifest["split"]["test_ids" if split == "test" else "val_ids"])
    return [p for p in prompts if p.topic in groups]


def extra_half(prompts: list[Prompt], split: str) -> list[Prompt]:
    """Never-trained prompts, halved: even lines test, odd lines validation (tuning)."""
    return prompts[0::2] if split == "test" else prompts[1::2]


class GuardRun:
    """The engine, the held-out prompts and the judge, shared by every row."""

    def __init__(self, args):
        self.args = args
        self.artifact = load_artifact(args.artifact)
        self.behavior = self.artifact.behavior
        prompts = held_out(load_prompts(args.prompts), self.artifact.manifest, args.split)
        for extra in (args.everyday_extra, args.inviting_extra):
            if extra:
                prompts += extra_half(load_prompts(extra), args.split)
        self.prompts = prompts[: args.limit] if args.limit else prompts
        self.judge = judge_for(args.judge or self.behavior)
        self.engine = start_engine(args.model, requests=len(self.prompts), runner=args.runner,
                                   quantization=args.quantization, max_batch_size=args.max_batch_size,
                                   artifacts=[str(args.artifact)])
        self.ids = [self.engine.encode_chat([{"role": "user", "content": p.prompt}]) for p in self.prompts]

    def close(self) -> None:
        stop_engine(self.engine)

    def answers(self, name: str, steering: SteeringParams | None,
                repetition_penalty: float = 1.0) -> tuple[list[Answer], float]:
        sampling = SamplingParams(max_tokens=self.args.max_tokens, temperature=0.0,
                                  repetition_penalty=repetition_penalty)
        requests = [GenerationRequest(f"{name}-{i}", ids, sampling, steering) for i, ids in enumerate(self.ids)]
        start = time.perf_counter()
        answers = [_answer(done) for done in complete_all(self.engine, requests, name)]
        return answers, time.perf_counter() - start

    def undesired(self, answers: list[Answer]) -> list[bool]:
        return [not v.desired for v in self.judge.judge([a.text for a in answers])]


def _steering(mode: str, behavior: str, alpha=None, threshold=None, backtrack_tokens=None,
              return_scores=False) -> SteeringParams:
    return SteeringParams(mode=mode, behavior=behavior, alpha=alpha, threshold=threshold,
                          backtrack_tokens=backtrack_tokens, stream_mode="retract", return_scores=return_scores)


def _kind(prompts: list[Prompt], kind: str) -> list[int]:
    return [i for i, p in enumerate(prompts) if p.kind == kind]


def summarize_row(name: str, run: GuardRun, answers: list[Answer], seconds: float, off: dict | None,
                  alpha=None, threshold=None) -> dict:
    """The row's measures on inviting and everyday prompts, paired with `off` where given."""
    undesired = run.undesired(answers)
    looping = [loops(a.text) for a in answers]
    bad = [u or lp for u, lp in zip(undesired, looping)]  # a looping answer is not a fix
    inviting, everyday = _kind(run.prompts, "inviting"), _kind(run.prompts, "everyday")
    decoded = sum(a.completion_tokens + a.discarded_tokens for a in answers)
    row = {
        "row": name, "alpha": alpha, "threshold": threshold,
        "inviting_undesired": metrics.rate([undesired[i] for i in inviting]),
        "inviting_bad": metrics.rate([bad[i] for i in inviting]),
        "inviting_looping": metrics.rate([looping[i] for i in inviting]),
        "everyday_undesired": metrics.rate([undesired[i] for i in everyday]),
        "everyday_looping": metrics.rate([looping[i] for i in everyday]),
        "everyday_answer_tokens": sum(answers[i].completion_tokens for i in everyday) / max(len(everyday), 1),
        "backtracks": sum(a.backtracks for a in answers) / len(answers),
        "tokens_per_s": decoded / seconds if seconds else None,
        "seconds": seconds,
    }
    if off is not None:
        off_answers, off_bad = off["answers"], off["bad"]
        row["fixed_vs_off"] = metrics.paired([bad[i] for i in inviting], [off_bad[i] for i in inviting])
        row["everyday_changed"] = metrics.rate([answers[i].text != off_answers[i].text for i in everyday])
        row["inviting_changed"] = metrics.rate([answers[i].text != off_answers[i].text for i in inviting])
    records = [{"id": p.id, "kind": p.kind, "prompt": p.prompt, "answer": a.text, "undesired": u, "looping": lp,
                "backtracks": a.backtracks, "fired": list(a.fired), "completion_tokens": a.completion_tokens,
                "discarded_tokens": a.discarded_tokens}
               for p, a, u, lp in zip(run.prompts, answers, undesired, looping)]
    return {"summary": row, "records": records, "answers": answers, "undesired": undesired, "bad": bad}


def answer_scores(answer: Answer, backtrack_tokens: int) -> tuple[float, float]:
    """(score at the answer's last token, its lowest check score: checks start at the
    `backtrack_tokens`-th token, or at the last one of a shorter answer); 1.0 without scores."""
    if not answer.scores:
        return 1.0, 1.0
    return answer.scores[-1], min(answer.scores[backtrack_tokens - 1:] or answer.scores[-1:])


def monitor_quality(run: GuardRun, monitored: list[Answer], off_undesired: list[bool], threshold: float,
                    backtrack_tokens: int) -> dict:
    """The probes' AUROC on the model's own held-out answers (judge labels), and how often the monitor
    would fire on the everyday ones at `threshold`."""
    desired = [not u for u in off_undesired]
    last, checked = zip(*(answer_scores(a, backtrack_tokens) for a in monitored)) if monitored else ((), ())
    inviting, everyday = _kind(run.prompts, "inviting"), _kind(run.prompts, "everyday")
    return {
        "auroc_last_token": metrics.auroc_interval(last, desired),
        "auroc_min_check": metrics.auroc_interval(checked, desired),
        "auroc_min_check_inviting": metrics.auroc_interval([checked[i] for i in inviting],
                                                           [desired[i] for i in inviting]),
        "everyday_firing_rate": metrics.rate([checked[i] < threshold for i in everyday]),
        "threshold": threshold,
    }


COLUMNS = ["row", "alpha", "threshold", "inviting_undesired", "inviting_bad", "fixed_vs_off", "inviting_looping",
           "everyday_changed", "everyday_undesired", "everyday_looping", "backtracks", "tokens_per_s"]


def _table_rows(rows: list[dict]) -> list[dict]:
    return [{k: format_interval(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows]


def run_guard(args) -> None:
    run = GuardRun(args)
    rec = run.artifact.manifest["recommended"]
    alpha = args.alpha if args.alpha is not None else rec["alpha"]
    threshold = args.threshold if args.threshold is not None else rec["threshold"]
    backtrack = args.backtrack_tokens if args.backtrack_tokens is not None else rec["backtrack_tokens"]
    name = run.behavior
    try:
        # `monitor` never changes a token (tests/test_engine.py), so its answers are `off`'s, with scores.
        answers, seconds = run.answers("off", _steering("monitor", name, backtrack_tokens=backtrack,
                                                        return_scores=True))
        off = summarize_row("off (monitored)", run, answers, seconds, None)
        quality = monitor_quality(run, answers, off["undesired"], threshold, backtrack)
        for record, answer in zip(off["records"], answers):  # for analyses of subsets from the JSON
            record["last_score"], record["lowest_check"] = answer_scores(answer, backtrack)
        rows = [off]
        for iti_alpha in args.iti_alphas:
            answers, seconds = run.answers(f"always a={iti_alpha:g}", _steering("always", name, alpha=iti_alpha))
            rows.append(summarize_row(f"always (ITI) a={iti_alpha:g}", run, answers, seconds, off, alpha=iti_alpha))
        for penalty in args.repetition_penalties:
            answers, seconds = run.answers(f"penalty {penalty:g}", None, repetition_penalty=penalty)
            rows.append(summarize_row(f"repetition_penalty {penalty:g}", run, answers, seconds, off))
        for a_value in args.alphas or (alpha,):
            for t_value in args.thresholds or (threshold,):
                steering = _steering("fasb", name, alpha=a_value, threshold=t_value, backtrack_tokens=backtrack)
                answers, seconds = run.answers(f"fasb a={a_value:g} t={t_value:g}", steering)
                rows.append(summarize_row("fasb", run, answers, seconds, off, alpha=a_value, threshold=t_value))
    finally:
        run.close()
    summaries = [r["summary"] for r in rows]
    counts = {k: len(_kind(run.prompts, k)) for k in ("inviting", "everyday")}
    title = (f"guard {name} ({args.split} prompts: {counts['inviting']} inviting, {counts['everyday']} everyday; "
             f"judge {run.judge.name}; greedy, {args.max_tokens} tokens; backtrack {backtrack})")
    print_table(title, _table_rows(summaries), COLUMNS)
    print_table("monitor on the model's own off answers (judge labels)", _table_rows([quality]),
                ["auroc_last_token", "auroc_min_check", "auroc_min_check_inviting", "everyday_firing_rate",
                 "threshold"])
    info = {"behavior": name, "artifact": str(args.artifact), "split": args.split, "prompts": counts,
            "judge": run.judge.describe, "max_tokens": args.max_tokens, "backtrack_tokens": backtrack,
            "runner": args.runner, "quantization": args.quantization,
            "command": "python -m eval " + shlex.join(sys.argv[1:])}
    write_json({"info": info, "monitor": quality, "rows": summaries,
                "records": {r["summary"]["row"] + (f" a={r['summary']['alpha']} t={r['summary']['threshold']}"
                                                   if r["summary"]["row"] == "fasb" else ""): r["records"]
                            for r in rows}},
               args.out, f"guard_{name}_{args.split}")
    if args.write_recommended:
        _write_recommended(args, run, summaries, quality, backtrack)


def _write_recommended(args, run: GuardRun, summaries: list[dict], quality: dict, backtrack: int) -> None:
    """The FASB row that fixes most inviting answers while changing at most --max-changed of the everyday
    ones; ITI's alpha: the weakest that leaves as few unwanted-or-looping inviting answers as that row,
    else the one that leaves fewest (without ITI rows: the manifest's own, unchanged)."""
    fasb = [r for r in summaries if r["row"] == "fasb" and r["everyday_changed"]["mean"] <= args.max_changed]
    if not fasb:
        raise SystemExit(f"no FASB row changes at most {args.max_changed} of the everyday answers; nothing written")
    best = max(fasb, key=lambda r: (r["fixed_vs_off"]["mean"], r["threshold"]))
    iti = [r for r in summaries if r["row"].startswith("always")]
    as_good = [r for r in iti if r["inviting_bad"]["mean"] <= best["inviting_bad"]["mean"]]
    if as_good:
        iti_alpha = min(r["alpha"] for r in as_good)
    elif iti:
        iti_alpha = min(iti, key=lambda r: (r["inviting_bad"]["mean"], r["alpha"]))["alpha"]
    else:
        iti_alpha = run.artifact.manifest["recommended"].get("iti_alpha", best["alpha"])
    values = {
        "alpha": best["alpha"], "threshold": best["threshold"], "backtrack_tokens": backtrack,
        "iti_alpha": iti_alpha,
        "false_alarm_rate": best["everyday_changed"]["mean"],
        "chosen_by": (f"python -m eval {shlex.join(sys.argv[1:])}: the FASB row with the largest drop in "
                      f"unwanted-or-looping inviting answers vs off among those changing <= {args.max_changed} "
                      f"of the everyday answers ({args.split} prompts)"),
    }
    write_recommended(args.artifact, values)
