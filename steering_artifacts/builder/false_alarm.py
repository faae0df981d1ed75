"""The false-alarm check: does the monitor fire on plainly correct answers?

Each (question, answer) pair is scored exactly as the decoder's monitor would score that answer
if the model had generated it: the question goes through the chat template as the user turn
(`Engine.encode_chat`), the answer's tokens follow it, and the monitor's score
p = mean_k sigmoid(w_k . a_k + b_k) (`BehaviorBank.head_probabilities`) is read at each answer
token's own position. The decoder checks token t (1-based) when t >= backtrack_tokens and at
the last token (`server.steering.policy.check_due`, `server/engine/sequence.py`), so an answer
*fires* at threshold T when any of those check positions scores below T; equivalently when the
minimum score over its check positions is below T. The committed set of correct answers is
`eval/data/everyday_correct.jsonl` (written for this project; see eval/data/README.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from server.engine.hf_compat import chat_token_ids
from server.steering.artifact import SteeringArtifact
from server.steering.bank import BehaviorBank, head_weights
from server.steering.layers import attention_output_projections
from server.steering.policy import check_due

DEFAULT_SET = Path(__file__).resolve().parents[2] / "eval" / "data" / "everyday_correct.jsonl"
REPORT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
MAX_FALSE_ALARM = 0.05  # the most a usable threshold may fire on plainly correct answers


@dataclass(frozen=True)
class ScoredAnswer:
    question: str
    answer: str
    scores: list[float]  # monitor score at each answer token
    checks: list[int]  # 0-based answer positions the decoder checks

    @property
    def min_check_score(self) -> float:
        return min(self.scores[j] for j in self.checks) if self.checks else float("inf")


def load_pairs(path: str | Path = DEFAULT_SET) -> list[tuple[str, str]]:
    """(question, answer) pairs from a JSONL file of {"question", "answer"} lines."""
    pairs = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            pairs.append((record["question"], record["answer"]))
    return pairs


def check_positions(num_answer_tokens: int, backtrack_tokens: int) -> list[int]:
    """0-based answer positions the decoder checks: token t = j + 1 when t >= s, and the last one."""
    last = num_answer_tokens - 1
    return [j for j in range(num_answer_tokens) if check_due(j + 1, backtrack_tokens, final=j == last)]


def fires(min_check_scores: np.ndarray, threshold: float) -> np.ndarray:
    """Per answer: does any check position score below the threshold?"""
    return np.asarray(min_check_scores) < threshold


def firing_rate(min_check_scores, threshold: float) -> float:
    scores = np.asarray(min_check_scores, dtype=np.float64)
    return float(fires(scores, threshold).mean()) if len(scores) else 0.0


def max_safe_threshold(min_check_scores, max_rate: float = MAX_FALSE_ALARM) -> float:
    """The largest threshold at which at most `max_rate` of the answers fire.

    An answer fires iff its min check score < T, so T may go up to the (k+1)-th smallest minimum,
    where k = floor(max_rate * n) answers are allowed to fire.
    """
    ordered = np.sort(np.asarray(min_check_scores, dtype=np.float64))
    allowed = int(np.floor(max_rate * len(ordered) + 1e-9))
    return float(ordered[allowed]) if allowed < len(ordered) else 1.0


def chat_answer_ids(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids as the engine encodes the chat, answer ids) for the answer appended to it."""
    prompt = chat_token_ids(tokenizer, [{"role": "user", "content": question}])
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False) + answer
    full = tokenizer(text, add_special_tokens=False).input_ids
    if full[: len(prompt)] != prompt:
        raise ValueError(f"the answer {answer!r} changes the tokens of the chat prompt; cannot score it in place")
    return prompt, full[len(prompt):]


@torch.inference_mode()
def monitor_scores(model, artifact: SteeringArtifact, sequences: list[tuple[list[int], int]],
                   num_heads: int | None = None, progress: bool = True) -> list[list[float]]:
    """The monitor's score at every position from `start` on, for each (ids, start), one sequence per forward."""
    o_projs = attention_output_projections(model)
    layers = sorted({int(layer) for layer in artifact.layers.tolist()})
    bank = BehaviorBank(artifact, o_projs, layers)
    k = num_heads or bank.num_heads
    weights = head_weights(k, bank.num_heads, bank.device)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}

    def hook(slot: int):
        def read(module, args):
            captured[slot] = args[0].detach()  # [1, S, H*D]

        return read

    handles = [o_projs[layer].register_forward_pre_hook(hook(slot)) for slot, layer in enumerate(layers)]
    out = []
    try:
        for ids, start in tqdm(sequences, desc="monitor", unit="answer", disable=not progress, leave=False):
            model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
            acts = torch.stack([captured[slot][0, start:] for slot in range(len(layers))])  # [n_layers, S', H*D]
            probs = bank.head_probabilities(acts)  # [S', K]
            out.append((probs @ weights).tolist())
    finally:
        for handle in handles:
            handle.remove()
    return out


def score_answers(model, tokenizer, artifact: SteeringArtifact, pairs: list[tuple[str, str]],
                  backtrack_tokens: int, num_heads: int | None = None, progress: bool = True) -> list[ScoredAnswer]:
    encoded = [chat_answer_ids(tokenizer, q, a) for q, a in pairs]
    scores = monitor_scores(model, artifact, [(p + a, len(p)) for p, a in encoded], num_heads, progress)
    return [ScoredAnswer(q, a, s, check_positions(len(ans), backtrack_tokens))
            for (q, a), (_, ans), s in zip(pairs, encoded, scores)]


def false_alarm_report(scored: list[ScoredAnswer], threshold: float, backtrack_tokens: int,
                       source: str | Path = DEFAULT_SET) -> dict:
    """Firing rate at `threshold` and at a few others, and the largest threshold meeting the 5% bar."""
    mins = np.array([s.min_check_score for s in scored])
    return {
        "set": _display(source),
        "answers": len(scored),
        "backtrack_tokens": backtrack_tokens,
        "threshold": threshold,
        "firing_rate": firing_rate(mins, threshold),
        "fired": int(fires(mins, threshold).sum()),
        "firing_rate_by_threshold": {str(t): firing_rate(mins, t) for t in REPORT_THRESHOLDS},
        f"max_threshold_at_{int(MAX_FALSE_ALARM * 100)}pct": max_safe_threshold(mins),
        "median_min_check_score": float(np.median(mins)) if len(mins) else None,
    }


def auroc(positive, negative) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    pos, neg = np.asarray(positive, dtype=np.float64)[:, None], np.asarray(negative, dtype=np.float64)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def separation_report(correct: list[ScoredAnswer], false: list[ScoredAnswer], threshold: float,
                      source: str | Path) -> dict:
    """How many false answers fire (are caught) at `threshold`, and how well min check scores separate
    correct from false answers; paired by question when both sets hold the same questions in order."""
    good = np.array([a.min_check_score for a in correct])
    bad = np.array([a.min_check_score for a in false])
    paired = [a.question for a in correct] == [a.question for a in false]
    return {
        "set": _display(source),
        "answers": len(false),
        "caught": int(fires(bad, threshold).sum()),
        "detection_rate": firing_rate(bad, threshold),
        "auroc": auroc(good, bad),
        "paired_correct_higher": int((good > bad).sum()) if paired else None,
    }


def _display(path: str | Path) -> str:
    path = Path(path).resolve()
    root = Path(__file__).resolve().parents[2]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
