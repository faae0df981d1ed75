"""One request's decoding state, and the mechanics of its steering controller's decisions.

What to steer, when to check and whether to backtrack are the controller's (server/steering/
controller.py, one class per mode); this class applies them: it drops tokens, rolls back the text
and every processor (server/engine/processors.py), and frees the cache columns.

Position bookkeeping: the first `length` positions of prompt+generated are in the runner's cache
(where, is the runner's business); `next_input` is the token the next forward pass feeds at
position `next_pos == length`. Normally that is the newest generated token; after a backtrack it
is the last kept token (or the last prompt token), re-fed so the next token comes from a steered
forward pass, and `rolled_back` tells the batch to have the runner drop the positions after it.

Every sequence ends (docs/operations.md "Reliability"): backtracks are capped by `max_backtracks`, the tokens it may
throw away by `discard_budget` (so kept + discarded <= DECODE_BUDGET_FACTOR * max_tokens), and an
optional `deadline` ends it with finish_reason "length", as llama.cpp's time limit does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.output import TextOutput
from server.engine.processors import DecodingState
from server.engine.types import (
    Backtrack,
    EngineEvent,
    Finished,
    FinishReason,
    GenerationRequest,
    SteeringReport,
    TokenLogprob,
)
from server.errors import ServerError
from server.steering.controller import SteeringController, make_controller
from server.steering.policy import SteeringConfig

# Tokens decoded per choice, kept and discarded together, are at most this many times max_tokens.
DECODE_BUDGET_FACTOR = 4


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    SCORE_LAST = "score_last"  # one more forward pass to score the final token before finishing
    DONE = "done"


@dataclass
class Sequence:
    request: GenerationRequest
    steering: SteeringConfig | None
    max_tokens: int
    eos_ids: frozenset[int]
    output: TextOutput
    emit: Callable[[EngineEvent], None]
    generator: torch.Generator | None = None
    deadline: float | None = None  # time.monotonic() after which the sequence is cut short
    decoding: DecodingState | None = None  # penalties, min_tokens, grammar: rolled back with the tokens
    phase: Phase = Phase.PREFILL
    generated: list[int] = field(default_factory=list)
    length: int = 0  # positions of prompt+generated in the runner's cache
    next_input: int = 0
    # each monitored behaviour's probe score after each generated token
    scores: list[tuple[float, ...]] = field(default_factory=list)
    eos_emitted: bool = False
    finish_reason: FinishReason | None = None
    refeeding: bool = False  # next_input is a kept token being fed again after a backtrack
    rolled_back: bool = False  # a backtrack dropped cached positions from next_pos on: the runner must too
    cancelled: bool = False
    reported: bool = False  # its Finished event was emitted
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    steered_from: int | None = None  # the first position fed with steering on: later keys/values depend on it

    def __post_init__(self):
        self.next_input = self.prompt[-1]
        if self.decoding is None:
            self.decoding = DecodingState(self.request.sampling)
        self.controller: SteeringController | None = make_controller(self.steering, self.discard_budget)
        self._update_hold()

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def next_pos(self) -> int:
        return self.length

    @property
    def strengths(self) -> tuple[float, ...]:
        """Per monitored behaviour, the steering strength c applied to every position fed from now on."""
        return self.controller.strengths if self.controller is not None else ()

    @property
    def backtracks(self) -> list[Backtrack]:
        return self.controller.backtracks if self.controller is not None else []

    @property
    def discarded(self) -> int:
        return self.controller.discarded if self.controller is not None else 0

    @property
    def scoring(self) -> bool:
        return self.controller is not None and self.controller.scores_every_step

    @property
    def discard_budget(self) -> int:
        return (DECODE_BUDGET_FACTOR - 1) * self.max_tokens

    @property
    def can_backtrack(self) -> bool:
        return self.controller is not None and self.controller.can_backtrack

    @property
    def unsteered_tokens(self) -> list[int]:
        """prompt+generated tokens whose cached keys/values no steering touched: a prefix cache may keep them."""
        fed = self.length if self.steered_from is None else min(self.length, self.steered_from)
        return (self.prompt + self.generated)[:fed]

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def decoded_tokens(self) -> int:
        """Tokens generated so far, kept or thrown away (for metrics of work that never finished)."""
        return len(self.generated) + self.discarded

    @property
    def wants_logprobs(self) -> bool:
        return self.request.sampling.logprobs

    def advance(self, score: tuple[float, ...] | None, token: int, logprob: TokenLogprob | None) -> None:
        """Apply one forward pass: the cache now holds `next_input` at `next_pos`; `token` was sampled
        from it; `score`: each monitored behaviour's probe score at that position."""
        if self.steered_from is None and any(self.strengths):  # the strengths this step ran with
            self.steered_from = self.length
        self.length += 1
        if score is not None and self.generated:
            del self.scores[len(self.generated) - 1 :]
            self.scores.append(score)  # the prefix ending at generated[-1] just got this score
        refed, self.refeeding = self.refeeding, False
        if self.phase is Phase.SCORE_LAST:
            self._final_check(score)
            return
        # A re-fed token is not checked again: checks follow newly generated tokens.
        checked = not refed and self.controller is not None and self.controller.check_due(len(self.generated))
        if checked:
            decided = self.controller.check(score, len(self.generated))
            if decided is not None:
                self._backtrack(decided)
                return
        self._accept(token, logprob, score, checked)

    def _accept(self, token: int, logprob: TokenLogprob | None, score: tuple[float, ...] | None,
                checked: bool) -> None:
        if token in self.eos_ids and not self.request.sampling.ignore_eos:
            self.eos_emitted = True
            self.finish_reason = "stop"
            self._final_check(score, already_checked=checked)
            return
        stopped = self.output.append(token, logprob)
        self.generated.append(token)
        self.decoding.accept(token)
        stopped = stopped or self.decoding.grammar_complete  # a finished grammar ends the answer
        self.next_input = token
        self._update_hold()
        if stopped or len(self.generated) >= self.max_tokens:
            self.finish_reason = "stop" if stopped else "length"
            if self.can_backtrack or self.scoring:
                self.phase = Phase.SCORE_LAST  # the final token's score needs one more forward
                return
            self._finish()
            return
        self.output.release()

    def _final_check(self, score: tuple[float, ...] | None, already_checked: bool = False) -> None:
        """The last step is always checked: backtrack if the finished answer scores too low."""
        if self.can_backtrack and not already_checked and score is not None:
            decided = self.controller.check(score, len(self.generated))
            if decided is not None:
                self.eos_emitted = False
                self._backtrack(decided)
                return
        self._finish()

    def _backtrack(self, decided: Backtrack) -> None:
        """Take back the newest tokens, as the controller just decided (possibly none of them: the
        last prompt token is then re-fed with steering on)."""
        drop, generated = decided.tokens_retracted, len(self.generated)
        announce = self.steering.stream_mode == "retract"
        self.output.rollback(drop, decided, announce=announce)
        kept = generated - drop
        del self.generated[kept:], self.scores[kept:]
        self.decoding.rollback(drop)
        refeed_pos = len(self.prompt) + kept - 1
        self.next_input = (self.prompt + self.generated)[refeed_pos]
        self.length = refeed_pos  # the batch has the runner drop the cached positions from here on
        self.rolled_back = True
        self.refeeding = True
        self.phase = Phase.DECODE
        self.finish_reason = None
        self._update_hold()

    def _update_hold(self) -> None:
        self.output.hold_tokens = self.controller.hold_tokens(len(self.generated)) if self.controller else 0

    def _finish(self) -> None:
        self.phase = Phase.DONE
        self.reported = True
        self.output.finish()
        self.emit(
            Finished(
                finish_reason=self.finish_reason or "stop",
                prompt_tokens=len(self.prompt),
                cached_tokens=self.cached_tokens,
                completion_tokens=len(self.generated) + int(self.eos_emitted),
                discarded_tokens=self.discarded,
                steering=self.report(),
            )
        )

    def expire(self) -> None:
        """The deadline passed: end now with what the answer has, as finish_reason "length"."""
        self.finish_reason = "length"
        self._finish()

    def fail(self, error: ServerError | None = None) -> None:
        self.phase = Phase.DONE
        self.emit(error or ServerError("generation failed inside the engine; see the server log"))

    def report(self) -> SteeringReport | None:
        return self.controller.report(self.scores) if self.controller is not None else None
