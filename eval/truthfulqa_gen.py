"""`truthfulqa gen` and the generation sweep: chat answers through the Engine, judged offline."""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from eval.generation import Generated, generate, start_engine, stop_engine
from eval.judge import MiniLMEmbedder, embed_references, is_uninformative, judge_answers
from eval.recommended import finish_sweep, row_values
from eval.report import print_table, write_json
from eval.truthfulqa_data import Question, load_questions, split_ids
from server.engine.types import SteeringParams
from server.steering.artifact import load_artifact

log = logging.getLogger(__name__)

GEN_COLUMNS = ["row", "alpha", "threshold", "truthful", "informative", "true_and_informative", "uninformative",
               "backtracks", "discarded_tokens", "answer_tokens", "tokens_per_s", "seconds"]


class GenerationRun:
    """The engine, the questions and the judge, shared by every row."""

    def __init__(self, args):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        self.artifact = load_artifact(args.artifact)
        if self.artifact.prompt_format != "chat":
            log.warning("artifact %s is %s-format; the server serves chat", args.artifact, self.artifact.prompt_format)
        all_questions = load_questions(Path(args.data_dir))
        ids = split_ids(self.artifact.manifest, args.split, Path(args.data_dir))[: args.limit]
        self.questions: list[Question] = [all_questions[i] for i in ids]
        self.max_tokens = args.max_tokens
        self.engine = start_engine(args.artifact, args.model, args.device, args.max_batch_size, len(self.questions))
        self.prompts = [self.engine.encode_chat([{"role": "user", "content": q.question}]) for q in self.questions]
        self.embedder = MiniLMEmbedder()
        self.references = embed_references(self.embedder, [(q.true_refs, q.false_refs) for q in self.questions])
        self.info = {"artifact": str(args.artifact), "prompt_format": self.artifact.prompt_format, "split": args.split,
                     "questions": len(self.questions), "max_tokens": args.max_tokens,
                     "max_batch_size": args.max_batch_size, "command": "python -m eval " + shlex.join(sys.argv[1:])}

    def close(self) -> None:
        stop_engine(self.engine)

    def row(self, name: str, steering: SteeringParams) -> tuple[dict, list[dict]]:
        answers, seconds = generate(self.engine, self.prompts, steering, self.max_tokens, name)
        records = self._judge(answers)
        return _summary(name, steering, answers, records, seconds), records

    def _judge(self, answers: list[Generated]) -> list[dict]:
        verdicts = judge_answers(self.embedder, [a.text for a in answers], self.references)
        records = []
        for q, a, verdict in zip(self.questions, answers, verdicts):
            counts = {k: v for k, v in asdict(a).items() if k != "text"}
            records.append({"qid": q.qid, "question": q.question, "answer": a.text.strip(), **asdict(verdict),
                            "uninformative": is_uninformative(a.text), **counts})
        return records


def _summary(name: str, steering: SteeringParams, answers: list[Generated], records: list[dict],
             seconds: float) -> dict:
    n = len(records)
    generated = sum(a.completion_tokens + a.discarded_tokens for a in answers)
    return {
        "row": name, "alpha": steering.alpha, "threshold": steering.threshold,
        "truthful": sum(r["truthful"] for r in records) / n,
        "informative": sum(not r["uninformative"] for r in records) / n,
        "true_and_informative": sum(r["truthful"] and not r["uninformative"] for r in records) / n,
        "uninformative": sum(r["uninformative"] for r in records) / n,
        "backtracks": sum(a.backtracks for a in answers) / n,
        "discarded_tokens": sum(a.discarded_tokens for a in answers) / n,
        "answer_tokens": sum(a.completion_tokens for a in answers) / n,
        "tokens_per_s": generated / seconds,  # every token decoded, kept or discarded
        "seconds": round(seconds, 1),
    }


def _fasb(alpha: float, threshold: float, backtrack_tokens: int) -> SteeringParams:
    return SteeringParams(mode="fasb", alpha=alpha, threshold=threshold, backtrack_tokens=backtrack_tokens)


def run_gen(args) -> dict:
    run = GenerationRun(args)
    try:
        values = row_values(args, run.artifact.manifest)
        rows, answers = [], {}
        for name, steering in (("baseline", SteeringParams(mode="off")),
                               ("ITI", SteeringParams(mode="always", alpha=values.iti_alpha)),
                               ("FASB", _fasb(values.alpha, values.threshold, values.backtrack_tokens))):
            summary, records = run.row(name, steering)
            rows.append(summary)
            answers[name] = records
    finally:
        run.close()
    print_table(f"TruthfulQA generation, {run.info['questions']} {args.split} questions ({args.artifact})",
                rows, GEN_COLUMNS)
    payload = {**run.info, "rows": rows, "answers": answers}
    write_json(payload, args.out, f"truthfulqa_gen_{args.split}")
    return payload


def _best(rows: list[dict]) -> dict:
    """Most answers both judged true and informative; ties: more judged true."""
    return max(rows, key=lambda r: (r["true_and_informative"], r["truthful"]))


def run_gen_sweep(args) -> dict:
    run = GenerationRun(args)
    try:
        baseline, _ = run.row("baseline", SteeringParams(mode="off"))
        iti_rows = [run.row("ITI", SteeringParams(mode="always", alpha=a))[0] for a in args.iti_alphas]
        fasb_rows = [run.row("FASB", _fasb(a, t, args.backtrack_tokens))[0]
                     for a in args.alphas for t in args.thresholds]
    finally:
        run.close()
    return finish_sweep(args, run.info, (baseline, iti_rows, fasb_rows), _best, "generation",
                        "embedding judge, max true-and-informative, tie-break truthful", GEN_COLUMNS,
                        f"truthfulqa_gen_sweep_{args.split}")
