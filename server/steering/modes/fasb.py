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

    def check(self, score: float, generated: int) -> Backtrack | None:
        self.checks += 1
        cfg = self.config
        if score >= cfg.threshold:
            return None
        drop = tokens_to_drop(generated, cfg.backtrack_tokens)
        self.strength = steering_strength(score, cfg.alpha, cfg.adaptive)
        self.backtracks.append(Backtrack(generated, drop, score, self.strength))
        self.discarded += drop
        return self.backtracks[-1]

    def hold_tokens(self, generated: int) -> int:
        if self.config.stream_mode == "hold" and self.can_backtrack:
            return min(generated, self.config.backtrack_tokens)
        return 0
