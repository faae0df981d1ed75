"""Steering's plain value types, shared by the steering controllers, the engine and the HTTP layer.

They live here, not in server/engine/, so that server/steering never imports the engine
(docs/architecture.md "Steering controllers"). Nothing here imports torch.
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# The modes a request may ask for: "off", and one per file of server/steering/modes/, named after
# it (monitor.py is mode "monitor"), so adding a mode is adding one file. Read from the folder
# without importing it, so that this module stays free of torch and of the controllers.
STEERING_MODES: tuple[str, ...] = ("off",) + tuple(
    sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).with_name("modes"))]) if not m.name.startswith("_"))
)
SteeringMode = Literal[STEERING_MODES]  # type: ignore[valid-type]  # a Literal built from the folder
StreamMode = Literal["retract", "hold"]


@dataclass(frozen=True)
class SteeringParams:
    """What a request asked for; None fields fall back to server / artifact defaults."""

    mode: SteeringMode | None = None
    behavior: str | tuple[str, ...] | None = None  # one artifact, or several monitored at once
    alpha: float | None = None
    threshold: float | None = None
    backtrack_tokens: int | None = None
    num_heads: int | None = None
    adaptive: bool | None = None
    max_backtracks: int | None = None
    stream_mode: StreamMode | None = None
    return_scores: bool = False


@dataclass(frozen=True)
class Backtrack:
    token_index: int
    tokens_retracted: int
    probe_score: float  # of the first behaviour that fired (the lowest score)
    strength: float  # the strength that behaviour now steers with
    behaviors: tuple[str, ...] = ()  # every behaviour that fired, lowest score first


@dataclass(frozen=True)
class SteeringReport:
    mode: SteeringMode
    behaviors: tuple[str, ...]  # monitored or steered, in the request's order
    intervened: bool
    backtracks: list[Backtrack]
    scores: list[float] | None = None  # per final token, with return_scores: the lowest over behaviours
    behavior_scores: dict[str, list[float]] | None = None  # per behaviour, when more than one
    checks: int = 0  # probe checks made (for metrics)

    @property
    def behavior(self) -> str | None:
        return self.behaviors[0] if self.behaviors else None
