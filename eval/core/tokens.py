"""Token-prefix helpers for scoring answers appended to a shared prompt."""

from __future__ import annotations


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares (e.g. an instruction and primer)."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        i = 0
        while i < length and seq[i] == first[i]:
            i += 1
        length = i
    return length


def answer_start(full_ids: list[int], before_answer_ids: list[int]) -> int:
    """Index of the first answer token: where `full_ids` stops agreeing with the text before the answer.

    Normally the whole "...\\nA:" tokenisation is a prefix of the full one; if BPE merges across
    the boundary, the first differing token is counted as the answer's.
    """
    return common_prefix_length([full_ids, before_answer_ids])
