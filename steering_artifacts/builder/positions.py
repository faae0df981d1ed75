"""Where in an answer the probes read activations: the answer-prefix positions the monitor checks.

The decoder's monitor scores every generated token t (1-based) once t >= backtrack_tokens, and the
last token of a shorter answer (`server.steering.policy.check_due`). Probes trained only at an
answer's last token are asked, at those earlier positions, a question they never saw. So the
builder can read, per answer of n tokens, the positions j (0-based) with j + 1 >= min(from, n), up
to `max_positions` of them evenly spaced and always including the last, each labelled with the
whole answer's label.
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from steering_artifacts.builder.datasets import Example
from steering_artifacts.builder.prompts import chat_text, qa_text

BUCKETS = ("early", "middle", "end")


def answer_positions(num_answer_tokens: int, first: int, max_positions: int) -> list[int]:
    """0-based answer positions to read: from token min(first, n) (1-based) to the last, subsampled.

    Evenly spaced over that range, the last always included; at most `max_positions` (>= 1).
    """
    n = num_answer_tokens
    if n <= 0:
        return []
    start = min(max(first, 1), n) - 1
    candidates = list(range(start, n))
    if len(candidates) <= max_positions:
        return candidates
    if max_positions <= 1:
        return [n - 1]
    picks = np.linspace(0, len(candidates) - 1, max_positions).round().astype(int)  # first and last included
    return sorted({candidates[i] for i in picks})


def bucket(position: int, num_answer_tokens: int) -> str:
    """`end`: the answer's last token; otherwise `early` in the first half of the answer, `middle` after."""
    if position == num_answer_tokens - 1:
        return "end"
    return "early" if position + 1 <= num_answer_tokens / 2 else "middle"


def answer_starts(examples: list[Example], token_ids: list[list[int]], prompt_format: str,
                  tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Index of each example's first answer token in its ids (the last token for prompt-only examples,
    or where the answer does not start on a token boundary)."""
    starts = []
    for example, ids in zip(examples, token_ids):
        if example.answer is None or example.question is None:
            starts.append(len(ids) - 1)
            continue
        empty = Example(example.group, example.label, example.question, "")
        if prompt_format == "chat":
            prefix = tokenizer(chat_text(empty, tokenizer), add_special_tokens=False).input_ids
        else:
            prefix = tokenizer(qa_text(empty).rstrip()).input_ids
        ok = len(prefix) < len(ids) and ids[: len(prefix)] == prefix
        starts.append(len(prefix) if ok else len(ids) - 1)
    return starts


def read_plan(token_ids: list[list[int]], starts: list[int], first: int, max_positions: int):
    """Per example, indices into its ids to read, and per read row (example index, position, answer length)."""
    reads, rows = [], []
    for index, (ids, start) in enumerate(zip(token_ids, starts)):
        n = len(ids) - start
        picks = answer_positions(n, first, max_positions)
        reads.append([start + j for j in picks])
        rows += [(index, j, n) for j in picks]
    example = np.array([r[0] for r in rows], dtype=np.int64)
    position = np.array([r[1] for r in rows], dtype=np.int64)
    length = np.array([r[2] for r in rows], dtype=np.int64)
    return reads, example, position, length
