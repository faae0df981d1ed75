"""`always` (ITI): steer every generated token at the fixed strength alpha (each listed behaviour at its
own); no probes."""

from __future__ import annotations

from server.steering.controller import SteeringController


class Controller(SteeringController):
    mode = "always"
    intervenes_always = True

    def __init__(self, config, discard_budget: int) -> None:
        super().__init__(config, discard_budget)
        self.strengths = tuple(b.alpha for b in config.behaviors)
