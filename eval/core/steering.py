"""Which positions of a scored answer are steered, and how hard (ITI and FASB rows).

Two placements, one trigger. `REFERENCE` (TruthfulQA MC) follows the reference scoring code
(honest_llama / gjw185/FASB `tqa_run_probs`), where the intervention starts at the answer:
`start_edit_location = len(question prompt) + 4`, "to account for the '\\nA: '". Our tokenizer
splits "\\nA:" into 3 tokens and the answer's first token carries the space, so steering starts at
the first answer token's position (the reference's stated intent; on LLaMA's tokenizer its literal
+4 lands one token later). The first answer token's log-prob comes from the unsteered ":"
position in every row.

FASB (reference): one unsteered pass; walk the answer positions, skipping the first
`backtrack_tokens` unless it is the last one; at the first position j whose mean probe P(true) is
below `threshold`, steer every position from j - backtrack_tokens (not before the answer) with
c = alpha * (1 - p); re-score the whole answer with that steering. No trigger: the unsteered score.

This is the reference's 0-based rule, kept so MC numbers compare with the paper's: position j is
checked once j >= backtrack_tokens, i.e. after j + 1 tokens. The server's decoder checks one token
earlier (once t = j + 1 >= backtrack_tokens; server/steering/policy.py `check_due`) and keeps one
more token on a backtrack. eval/mc_tasks/README.md lists the difference.

`DECODER` (the multiple-choice tasks): their options are often one token ("True", "8", "Maria"),
so under the reference rule steering could never change their score. It follows the server's
decoder instead, which after a backtrack re-feeds the last kept token with steering on, "so the
next token comes from a steered forward pass": ITI steers from the last prompt token (the ":" of
" A:") through the whole option; FASB takes the same trigger, drops `min(j, s)` tokens and steers
from the last kept position with c = alpha * (1 - p).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from eval.core.scoring import ScoredSequence
from server.steering.policy import steering_strength


@dataclass(frozen=True)
class Trigger:
    index: int  # answer position (0-based) whose check fired
    probe_score: float  # mean P(desired) there


def iti_sequence(seq: ScoredSequence, alpha: float) -> ScoredSequence:
    """ITI (reference placement): fixed strength on every answer position."""
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


def iti_from_prompt_end(seq: ScoredSequence, alpha: float) -> ScoredSequence:
    """ITI (decoder placement): fixed strength from the last prompt token on."""
    return replace(seq, steer_from=seq.answer_start - 1, strength=steering_strength(0.0, alpha, adaptive=False))


def fasb_from_last_kept(seq: ScoredSequence, trigger: Trigger, alpha: float, backtrack_tokens: int) -> ScoredSequence:
    """FASB (decoder placement): the same backtrack as `fasb_sequence`, steered from the last kept token."""
    kept = max(trigger.index - backtrack_tokens, 0)
    strength = steering_strength(trigger.probe_score, alpha, adaptive=True)
    return replace(seq, steer_from=seq.answer_start + kept - 1, strength=strength)


@dataclass(frozen=True)
class Placement:
    """How the ITI row and a fired FASB check turn an unsteered sequence into a steered one."""

    iti: Callable[[ScoredSequence, float], ScoredSequence]
    fasb: Callable[[ScoredSequence, Trigger, float, int], ScoredSequence]


REFERENCE = Placement(iti=iti_sequence, fasb=fasb_sequence)
DECODER = Placement(iti=iti_from_prompt_end, fasb=fasb_from_last_kept)


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
        rescored = scorer.score(steered, desc=desc)
        for k, score in zip(fired, rescored):
            scores[k] = score
    return scores, steered
