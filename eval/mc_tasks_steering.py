"""Which positions of an appended option are steered (ITI and FASB rows of `python -m eval mc`).

TruthfulQA's reference scoring (eval/mc_steering.py) starts steering at the first answer token's
position, so the first answer token's log-prob comes from an unsteered position. Our options are
often one token ("True", "8", "Maria"): under that rule steering could never change their score.
For these tasks we therefore follow the server's decoder instead (DESIGN.md §2, step 3): after a
backtrack it re-feeds the last kept token with steering on, "so the next token comes from a
steered forward pass". Here that is the position just before the first re-generated token:

- ITI: steer from the last prompt token (the ":" of " A:") through the whole option;
- FASB: the same unsteered monitor pass and trigger as eval/mc_steering.fasb_trigger (checks from
  the `s`-th option token and at the last one; the first check with mean P(correct) < threshold
  fires), drop `min(j, s)` tokens, and steer from the last kept position with c = alpha * (1 - p).
"""

from __future__ import annotations

from dataclasses import replace

from eval.mc_scoring import ScoredSequence
from eval.mc_steering import Trigger
from server.steering.policy import steering_strength


def iti_from_prompt_end(seq: ScoredSequence, alpha: float) -> ScoredSequence:
    return replace(seq, steer_from=seq.answer_start - 1, strength=steering_strength(0.0, alpha, adaptive=False))


def fasb_from_last_kept(seq: ScoredSequence, trigger: Trigger, alpha: float, backtrack_tokens: int) -> ScoredSequence:
    kept = max(trigger.index - backtrack_tokens, 0)  # the trigger's 0-based schedule (eval/mc_steering.py)
    strength = steering_strength(trigger.probe_score, alpha, adaptive=True)
    return replace(seq, steer_from=seq.answer_start + kept - 1, strength=strength)
