"""`fasb`: monitor, and when the probes' P(desired) falls below the threshold, backtrack and steer
(the schedule, the strength, the budget of backtracks and discarded tokens: docs/steering.md)."""

from __future__ import annotations

from server.steering.controller import SteeringController
from server.steering.policy import check_due, steering_strength, tokens_to_drop
from server.steering.types import Backtrack


class Controller(SteeringController):
    mode = "fasb"
    scores_every_step = True

    @property
    def can_backtrack(self) -> bool:
        cfg = self.config
        return (
            len(self.backtracks) < cfg.max_backtracks
            and self.discarded + cfg.backtrack_tokens <= self.discard_budget
        )

    def check_due(self, generated: int) -> bool:
        return self.can_backtrack and generated > 0 and check_due(generated, self.config.backtrack_tokens, final=False)

    def check(self, scores: tuple[float, ...], generated: int) -> Backtrack | None:
        """Backtrack when any behaviour's score is under its threshold; each that fired steers from
        then on at its own strength, the others keep theirs."""
        self.checks += 1
        cfg = self.config
        fired = sorted((p, i) for i, (p, b) in enumerate(zip(scores, cfg.behaviors)) if p < b.threshold)
        if not fired:
            return None
        drop = tokens_to_drop(generated, cfg.backtrack_tokens)
        strengths = list(self.strengths)
        for p, i in fired:
            strengths[i] = steering_strength(p, cfg.behaviors[i].alpha, cfg.adaptive)
        self.strengths = tuple(strengths)
        first = fired[0][1]
        names = tuple(cfg.behaviors[i].name for _, i in fired)
        self.backtracks.append(Backtrack(generated, drop, scores[first], strengths[first], names))
        self.discarded += drop
        return self.backtracks[-1]

    def hold_tokens(self, generated: int) -> int:
        if self.config.stream_mode == "hold" and self.can_backtrack:
            return min(generated, self.config.backtrack_tokens)
        return 0
