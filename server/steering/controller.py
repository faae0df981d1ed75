"""Steering controllers: what one steering mode decides for one sequence.

The engine's `Sequence` (server/engine/sequence.py) does the mechanics of a backtrack (drop
tokens, roll back the text and the processors, free cache columns); the controller decides: the
steering strength applied to every position fed from now on, whether the probes score each step,
when a check is due, whether a check backtracks and by how many tokens, how many tokens the stream
holds back, and what the response reports. One subclass per mode lives in server/steering/modes/,
one file each; `make_controller` finds it by the mode's name.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

from server.steering.policy import SteeringConfig
from server.steering.types import Backtrack, SteeringReport


class SteeringController:
    """A mode that never intervenes and never scores; subclasses override what their mode does."""

    mode: ClassVar[str]
    scores_every_step: ClassVar[bool] = False  # the probes score each forward pass
    intervenes_always: ClassVar[bool] = False  # reported as intervened even without a backtrack

    def __init__(self, config: SteeringConfig, discard_budget: int) -> None:
        self.config = config
        self.discard_budget = discard_budget  # tokens backtracks may throw away in all
        self.strengths = (0.0,) * len(config.behaviors)  # per behaviour, applied to every position fed from now on
        self.backtracks: list[Backtrack] = []
        self.discarded = 0
        self.checks = 0

    @property
    def can_backtrack(self) -> bool:
        return False

    def check_due(self, generated: int) -> bool:
        """Whether the token just generated (the `generated`-th) is checked by the probes."""
        return False

    def check(self, scores: tuple[float, ...], generated: int) -> Backtrack | None:
        """A due check with each behaviour's probe score: the backtrack to make, or None to keep going."""
        self.checks += 1
        return None

    def hold_tokens(self, generated: int) -> int:
        """Newest tokens a `hold` stream must not send yet (they may still be taken back)."""
        return 0

    def report(self, scores: list[tuple[float, ...]]) -> SteeringReport:
        """`scores`: per final token, each behaviour's probe score."""
        cfg = self.config
        names = cfg.names
        lowest = [min(s) for s in scores] if cfg.return_scores else None
        by_behavior = ({n: [s[i] for s in scores] for i, n in enumerate(names)}
                       if cfg.return_scores and len(names) > 1 else None)
        return SteeringReport(
            mode=cfg.mode,
            behaviors=names,
            intervened=bool(self.backtracks) or self.intervenes_always,
            backtracks=list(self.backtracks),
            scores=lowest,
            behavior_scores=by_behavior,
            checks=self.checks,
        )


def make_controller(config: SteeringConfig | None, discard_budget: int) -> SteeringController | None:
    """The controller of `config.mode` (server/steering/modes/<mode>.py); None when not steered."""
    if config is None or config.mode == "off":
        return None
    module = importlib.import_module(f"server.steering.modes.{config.mode}")
    return module.Controller(config, discard_budget)
