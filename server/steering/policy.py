"""Per-request steering settings and the FASB check schedule.

Defaults are layered: the artifact's manifest (calibrated per model and behaviour), then server
flags, then the request's `steering` object. Server flags and the request use the same
`SteeringParams` type: None means "not set here".
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import InvalidRequestError
from server.steering.types import SteeringMode, SteeringParams, StreamMode


@dataclass(frozen=True)
class BehaviorDefaults:
    """What an artifact recommends, and how many heads it has."""

    alpha: float
    threshold: float
    backtrack_tokens: int
    num_heads: int


@dataclass(frozen=True)
class SteeringConfig:
    mode: SteeringMode
    behavior: str
    alpha: float
    threshold: float
    backtrack_tokens: int
    num_heads: int
    adaptive: bool
    max_backtracks: int
    stream_mode: StreamMode
    return_scores: bool

    @property
    def monitors(self) -> bool:
        return self.mode in ("monitor", "fasb")


def _pick(*values):
    return next(v for v in values if v is not None)


def resolve_steering(
    request: SteeringParams | None,
    server: SteeringParams,
    behaviors: dict[str, BehaviorDefaults],
) -> SteeringConfig | None:
    """The request's effective settings, or None when it is not steered or monitored at all.

    `server` holds the server flags (None: use the artifact's recommendation); its `mode` is the
    default mode, "monitor" (scores only) unless the flags say otherwise (docs/steering.md).
    """
    asked = request or SteeringParams()
    mode = _pick(asked.mode, server.mode, "monitor")
    if mode == "off":
        return None
    if not behaviors:
        if request is None:
            return None  # the server default applies only where an artifact is loaded
        raise InvalidRequestError(
            f"steering mode '{mode}' needs a steering artifact, and this server has none loaded",
            param="steering.mode",
        )
    name = asked.behavior or server.behavior or next(iter(behaviors))
    if name not in behaviors:
        raise InvalidRequestError(
            f"unknown steering behavior '{name}'; loaded: {', '.join(sorted(behaviors))}",
            param="steering.behavior",
        )
    artifact = behaviors[name]
    num_heads = _pick(asked.num_heads, server.num_heads, artifact.num_heads)
    if num_heads > artifact.num_heads:
        raise InvalidRequestError(
            f"steering.num_heads is {num_heads}, but behavior '{name}' has {artifact.num_heads} heads",
            param="steering.num_heads",
        )
    return SteeringConfig(
        mode=mode,
        behavior=name,
        alpha=_pick(asked.alpha, server.alpha, artifact.alpha),
        threshold=_pick(asked.threshold, server.threshold, artifact.threshold),
        backtrack_tokens=_pick(asked.backtrack_tokens, server.backtrack_tokens, artifact.backtrack_tokens),
        num_heads=num_heads,
        adaptive=_pick(asked.adaptive, server.adaptive, True),
        max_backtracks=_pick(asked.max_backtracks, server.max_backtracks, 1),
        stream_mode=_pick(asked.stream_mode, "retract" if request is not None else "hold"),
        return_scores=asked.return_scores,
    )


def check_due(generated: int, backtrack_tokens: int, final: bool) -> bool:
    """Checks start once `backtrack_tokens` tokens exist, and are always made at the last step."""
    return final or generated >= backtrack_tokens


def tokens_to_drop(generated: int, backtrack_tokens: int) -> int:
    return min(generated, backtrack_tokens)


def steering_strength(p: float, alpha: float, adaptive: bool) -> float:
    """The paper's strength: grows as the probes' confidence in the desired behaviour falls."""
    return alpha * (1.0 - p) if adaptive else alpha
