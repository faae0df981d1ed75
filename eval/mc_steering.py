"""Which positions of a multiple-choice answer are steered, and how hard (ITI and FASB rows).

Both follow the reference scoring code (honest_llama / gjw185/FASB `tqa_run_probs`), where the
intervention starts at the answer: `start_edit_location = len(question prompt) + 4`, "to account
for the '\\nA: '". Our tokenizer splits "\\nA:" into 3 tokens and the answer's first token carries
the space, so steering starts at the first answer token's position (the reference's stated
intent; on LLaMA's tokenizer its literal +4 lands one token later). The first answer token's
log-prob comes from the unsteered ":" position in every row.

FASB (reference): one unsteered pass; walk the answer positions, skipping the first
`backtrack_tokens` unless it is the last one; at the first position j whose mean probe P(true) is
below `threshold`, steer every position from j - backtrack_tokens (not before the answer) with
c = alpha * (1 - p); re-score the whole answer with that steering. No trigger: the unsteered score.

This is the reference's 0-based rule, kept so MC numbers compare with the paper's: position j is
checked once j >= backtrack_tokens, i.e. after j + 1 tokens. The server's decoder checks one token
earlier (once t = j + 1 >= backtrack_tokens; server/steering/policy.py `check_due`) and keeps one
more token on a backtrack. eval/mc_tasks.md lists the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from eval.mc_scoring import ScoredSequence
from server.steering.policy import steering_strength


@dataclass(frozen=True)
class Trigger:
    index: int  # answer position (0-based) whose check fired
    probe_score: float  # mean P(desired) there


def iti_sequence(seq: ScoredSequence, alpha: float) -> ScoredSequence:
    """ITI: fixed strength on every answer position."""
    return replace(seq, steer_from=seq.answer_start, strength=steering_strength(0.0, alpha, adaptive=False))


def fasb_trigger(answer_probs: list[float], threshold: float, backtrack_tokens: int) -> Trigger | None:
    last = len(answer_probs) - 1
    for j, p in enumerate(answer_probs):
        if (j >= backtrack_tokens or j == last) and p < threshold:
            return Trigger(j, p)
    return None


def fasb_sequence(seq: ScoredSequence, trigger: Trigger, alpha: float, backtrack_tokens: int) -> ScoredSequence:
    """Steer from `backtrack_tokens` before the trigger (the backtrack) at the adaptive strength."""
    kept = max(trigger.index - backtrack_tokens, 0)
    strength = steering_strength(trigger.probe_score, alpha, adaptive=True)
    return replace(seq, steer_from=seq.answer_start + kept, strength=strength)


def rescore_fired(scorer, baseline: list, seqs: list[ScoredSequence], make_steered, threshold: float,
                  backtrack_tokens: int, desc: str | None = None) -> tuple[list, list[ScoredSequence]]:
    """FASB scoring: re-score with steering only the sequences whose monitor check fires; the rest
    keep their unsteered score. `make_steered(seq, trigger)` builds the steered sequence.
    Returns (scores, the steered sequences)."""
    triggers = [fasb_trigger(s.answer_probs, threshold, backtrack_tokens) for s in baseline]
    fired = [k for k, t in enumerate(triggers) if t is not None]
    steered = [make_steered(seqs[k], triggers[k]) for k in fired]
    scores = list(baseline)
    if steered:
        rescored = scorer.score(steered, desc=desc) if desc else scorer.score(steered)
        for k, score in zip(fired, rescored):
            scores[k] = score
    return scores, steered
