"""`monitor`: the probes score every token; never intervenes (a hallucination detector)."""

from __future__ import annotations

from server.steering.controller import SteeringController


class Controller(SteeringController):
    mode = "monitor"
    scores_every_step = True
