"""Steering controllers (server/steering/controller.py, one file per mode in server/steering/modes/)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from server.steering.controller import SteeringController, make_controller
from server.steering.policy import BehaviorSetting, SteeringConfig
from server.steering.types import STEERING_MODES

STEERING = Path(__file__).resolve().parents[1] / "server" / "steering"


def config(mode: str, behaviors=(BehaviorSetting("b", alpha=8.0, threshold=0.5, num_heads=2),),
           **overrides) -> SteeringConfig:
    values = dict(mode=mode, behaviors=behaviors, backtrack_tokens=4, adaptive=True, max_backtracks=2,
                  stream_mode="hold", return_scores=True)
    return SteeringConfig(**{**values, **overrides})


@pytest.mark.parametrize("mode", [m for m in STEERING_MODES if m != "off"])
def test_every_mode_file_defines_its_controller(mode):
    controller = importlib.import_module(f"server.steering.modes.{mode}").Controller
    assert issubclass(controller, SteeringController) and controller.mode == mode


def test_off_has_no_controller():
    assert make_controller(None, 100) is None and make_controller(config("off"), 100) is None


def test_steering_never_imports_the_engine():
    for path in STEERING.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith("server.engine") for n in names), path


def test_monitor_scores_and_never_intervenes():
    c = make_controller(config("monitor"), 100)
    assert c.scores_every_step and not c.can_backtrack and not c.check_due(10) and c.strengths == (0.0,)
    assert not c.report([(0.1,)]).intervened


def test_always_steers_from_the_start_without_scores():
    c = make_controller(config("always"), 100)
    assert c.strengths == (8.0,) and not c.scores_every_step and c.report([]).intervened


def test_fasb_schedule_strength_and_budget():
    c = make_controller(config("fasb"), discard_budget=6)
    assert not c.check_due(3) and c.check_due(4)  # checks start at backtrack_tokens
    assert c.hold_tokens(3) == 3 and c.hold_tokens(9) == 4
    assert c.check((0.9,), 5) is None and c.backtracks == []  # above the threshold: keep going
    assert c.check((0.25,), 5).tokens_retracted == 4 and c.strengths == pytest.approx((6.0,))  # alpha * (1 - p)
    assert c.discarded == 4 and not c.can_backtrack  # 4 + 4 > the budget of 6
    assert c.hold_tokens(9) == 0 and c.checks == 2
    report = c.report([(0.1,), (0.2,)])
    assert report.intervened and report.scores == [0.1, 0.2] and report.backtracks[0].tokens_retracted == 4
    assert report.backtracks[0].behaviors == ("b",) and report.behavior_scores is None


def test_fasb_backtracks_even_with_nothing_to_drop():
    """EOS as the first token, scored too low: nothing to drop, but regenerate with steering on."""
    c = make_controller(config("fasb"), discard_budget=100)
    decided = c.check((0.1,), 0)
    assert decided is not None and decided.tokens_retracted == 0 and c.strengths[0] > 0


def test_fasb_respects_max_backtracks():
    c = make_controller(config("fasb", max_backtracks=1, adaptive=False), discard_budget=100)
    assert c.check((0.1,), 2).tokens_retracted == 2 and c.strengths == (8.0,)  # drops all of a short answer
    assert not c.can_backtrack and not c.check_due(10)


TWO = (BehaviorSetting("truthfulness", alpha=10.0, threshold=0.25, num_heads=2),
       BehaviorSetting("tone", alpha=4.0, threshold=0.5, num_heads=3))


def test_fasb_with_two_behaviours_fires_when_either_does_and_steers_only_those():
    c = make_controller(config("fasb", behaviors=TWO), discard_budget=100)
    assert c.strengths == (0.0, 0.0)
    assert c.check((0.3, 0.6), 5) is None  # each above its own threshold
    decided = c.check((0.3, 0.2), 6)  # tone fired, truthfulness did not
    assert decided.behaviors == ("tone",) and decided.probe_score == 0.2
    assert c.strengths == pytest.approx((0.0, 4.0 * 0.8)) and decided.strength == pytest.approx(3.2)


def test_fasb_with_two_behaviours_firing_together_names_the_lowest_first():
    c = make_controller(config("fasb", behaviors=TWO), discard_budget=100)
    decided = c.check((0.2, 0.1), 6)
    assert decided.behaviors == ("tone", "truthfulness") and decided.probe_score == 0.1
    assert c.strengths == pytest.approx((10.0 * 0.8, 4.0 * 0.9))


def test_report_with_two_behaviours_gives_each_its_scores():
    c = make_controller(config("monitor", behaviors=TWO), discard_budget=100)
    report = c.report([(0.9, 0.4), (0.3, 0.7)])
    assert report.behaviors == ("truthfulness", "tone") and report.behavior == "truthfulness"
    assert report.scores == [0.4, 0.3]  # the lowest per token
    assert report.behavior_scores == {"truthfulness": [0.9, 0.3], "tone": [0.4, 0.7]}


def test_always_steers_every_listed_behaviour_at_its_alpha():
    assert make_controller(config("always", behaviors=TWO), 100).strengths == (10.0, 4.0)
