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
    iti_alpha: float | None = None  # `always` mode's strength (None: alpha)


@dataclass(frozen=True)
class BehaviorSetting:
    """One monitored behaviour's effective values within a request."""

    name: str
    alpha: float
    threshold: float
    num_heads: int


@dataclass(frozen=True)
class SteeringConfig:
    mode: SteeringMode
    behaviors: tuple[BehaviorSetting, ...]  # monitored (and steered) together, in the request's order
    backtrack_tokens: int
    adaptive: bool
    max_backtracks: int
    stream_mode: StreamMode
    return_scores: bool

    @property
    def monitors(self) -> bool:
        return self.mode in ("monitor", "fasb")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.behaviors)


def _pick(*values):
    return next(v for v in values if v is not None)


def _names(behavior: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if behavior is None:
        return ()
    return (behavior,) if isinstance(behavior, str) else tuple(behavior)


def resolve_steering(
    request: SteeringParams | None,
    server: SteeringParams,
    behaviors: dict[str, BehaviorDefaults],
) -> SteeringConfig | None:
    """The request's effective settings, or None when it is not steered or monitored at all.

    `server` holds the server flags (None: use the artifact's recommendation); its `mode` is the
    default mode, "monitor" (scores only) unless the flags say otherwise (docs/steering.md).
    `behavior` may name several artifacts: each keeps its own recommended alpha and threshold unless
    the request sets one for all; the check interval is the longest recommended one. In `always`
    mode the recommended alpha is the artifact's ITI one.
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
    names = _names(asked.behavior) or _names(server.behavior) or (next(iter(behaviors)),)
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"steering.behavior names a behavior twice: {list(names)}", param="steering.behavior")
    settings = tuple(_setting(name, mode, asked, server, behaviors) for name in names)
    return SteeringConfig(
        mode=mode,
        behaviors=settings,
        backtrack_tokens=_pick(asked.backtrack_tokens, server.backtrack_tokens,
                               max(behaviors[n].backtrack_tokens for n in names)),
        adaptive=_pick(asked.adaptive, server.adaptive, True),
        max_backtracks=_pick(asked.max_backtracks, server.max_backtracks, 1),
        stream_mode=_pick(asked.stream_mode, "retract" if request is not None else "hold"),
        return_scores=asked.return_scores,
    )


def _setting(name: str, mode: SteeringMode, asked: SteeringParams, server: SteeringParams,
             behaviors: dict[str, BehaviorDefaults]) -> BehaviorSetting:
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
    return BehaviorSetting(
        name=name,
        alpha=_pick(asked.alpha, server.alpha, artifact.iti_alpha if mode == "always" else None, artifact.alpha),
        threshold=_pick(asked.threshold, server.threshold, artifact.threshold),
        num_heads=num_heads,
    )


def check_due(generated: int, backtrack_tokens: int, final: bool) -> bool:
    """Checks start once `backtrack_tokens` tokens exist, and are always made at the last step."""
    return final or generated >= backtrack_tokens


def tokens_to_drop(generated: int, backtrack_tokens: int) -> int:
    return min(generated, backtrack_tokens)


def steering_strength(p: float, alpha: float, adaptive: bool) -> float:
    """The paper's strength: grows as the probes' confidence in the desired behaviour falls."""
    return alpha * (1.0 - p) if adaptive else alpha
