"""BoundedPolicy (controller_asg/bounds.py): run-time min/max/desired around a policy built with
fixed ones: rebuilt on a change with its learned state, a pinned desired, clamping and its reasons."""

from __future__ import annotations

from typing import Any

import pytest

from controller_asg.bounds import CONFIGURED, BoundedPolicy
from controller_asg.policy import make_policy
from controller_asg.policy.base import Decision, Observation
from shared.config import load_config


def obs(now: float, capacity: int, cpu: float = 0.5) -> Observation:
    return Observation(now=now, capacity=capacity, in_service=capacity, pending=0, cpu_samples=(cpu,) * capacity)


class Fixed:
    """Asks for `want`, clamped to its own bounds as every policy does; remembers what it saw."""

    name = "fixed"

    def __init__(self, lo: int, hi: int, want: int):
        self.lo, self.hi, self.want = lo, hi, want
        self.seen: list[float] = []
        self.state: dict[str, Any] = {"learned": []}

    def decide(self, o: Observation) -> Decision:
        self.seen.append(o.now)
        self.state["learned"].append(o.now)
        return Decision(max(self.lo, min(self.hi, self.want)), f"fixed wants {self.want}")

    def export_state(self) -> dict[str, Any]:
        return {"learned": list(self.state["learned"])}

    def import_state(self, state: dict[str, Any]) -> None:
        self.state = {"learned": list(state["learned"])}


def fixed(want: int) -> tuple[BoundedPolicy, list[Fixed]]:
    built: list[Fixed] = []

    def factory(lo: int, hi: int) -> Fixed:
        built.append(Fixed(lo, hi, want))
        return built[-1]

    return BoundedPolicy(factory, 1, 10), built


def test_within_bounds_the_inner_decision_is_unchanged():
    policy, built = fixed(5)
    assert policy.name == "fixed"
    assert policy.bounds == (1, 10, None, CONFIGURED)
    d = policy.decide(obs(0, 3))
    assert d == Decision(5, "fixed wants 5")


def test_a_bound_change_rebuilds_the_policy_and_keeps_what_it_learned():
    policy, built = fixed(5)
    policy.decide(obs(0, 3))
    policy.decide(obs(1, 5))
    policy.set_bounds(1, 10, None, "same bounds")  # nothing to rebuild
    policy.set_bounds(1, 10, 4, "a pin")  # nor for a pin
    assert len(built) == 1
    policy.set_bounds(6, 10, None, 'scheduled action "business"')
    assert [(b.lo, b.hi) for b in built] == [(1, 10), (6, 10)]
    assert policy.export_state() == {"learned": [0, 1]}
    policy.decide(obs(2, 5))
    assert policy.export_state() == {"learned": [0, 1, 2]}
    assert built[1].seen == [2]
    policy.import_state({"learned": [9]})
    assert built[1].state == {"learned": [9]}


def test_a_raised_min_names_itself_in_the_reason():
    policy, built = fixed(2)
    policy.set_bounds(4, 10, None, 'scheduled action "business"')
    # The rebuilt policy already keeps within [4, 10]; the fleet below min is brought to it.
    d = policy.decide(obs(0, 2))
    assert d.desired == 4
    assert d.reason == 'fixed wants 2; min 4 set by scheduled action "business"'
    # Once there, the policy's own words again.
    assert policy.decide(obs(1, 4)) == Decision(4, "fixed wants 2")


def test_a_lowered_max_names_itself_in_the_reason():
    policy, built = fixed(8)
    policy.set_bounds(1, 2, None, 'scheduled action "night"')
    d = policy.decide(obs(0, 8))
    assert d == Decision(2, 'fixed wants 8; max 2 set by scheduled action "night"')


def test_clamps_a_policy_that_leaves_its_bounds():
    class Wild(Fixed):
        def decide(self, o: Observation) -> Decision:
            return Decision(self.want, "wild")

    policy = BoundedPolicy(lambda lo, hi: Wild(lo, hi, 50), 1, 10)
    assert policy.decide(obs(0, 10)) == Decision(10, f"wild; max 10 set by {CONFIGURED}")
    policy = BoundedPolicy(lambda lo, hi: Wild(lo, hi, 0), 2, 10)
    assert policy.decide(obs(0, 2)) == Decision(2, f"wild; min 2 set by {CONFIGURED}")


def test_a_pinned_desired_wins_and_the_policy_still_sees_every_observation():
    policy, built = fixed(5)
    policy.set_bounds(1, 10, 7, 'scheduled action "launch-day"')
    d = policy.decide(obs(0, 3))
    assert d == Decision(7, 'desired 7 set by scheduled action "launch-day" (the policy would choose 5)')
    assert built[0].seen == [0]
    # A pin outside the bounds is held within them.
    policy.set_bounds(1, 6, 9, "operator override")
    assert policy.decide(obs(1, 7)).desired == 6
    policy.set_bounds(1, 10, None, CONFIGURED)
    assert policy.decide(obs(2, 6)) == Decision(5, "fixed wants 5")
    assert policy.bounds == (1, 10, None, CONFIGURED)


@pytest.mark.parametrize("lo, hi, desired", [(5, 4, None), (-1, 4, None), (1, 4, -1)])
def test_refuses_bad_bounds(lo, hi, desired):
    policy, built = fixed(5)
    with pytest.raises(ValueError):
        policy.set_bounds(lo, hi, desired, "bad")
    assert policy.bounds == (1, 10, None, CONFIGURED)
    with pytest.raises(ValueError):
        BoundedPolicy(lambda lo, hi: Fixed(lo, hi, 1), 3, 2)


def test_the_predictive_policy_keeps_its_recent_days_across_a_rebuild():
    cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_POLICY": "predictive"})
    policy = BoundedPolicy(
        lambda lo, hi: make_policy(cfg.replace(min_instances=lo, max_instances=hi)),
        cfg.min_instances,
        cfg.max_instances,
    )
    assert policy.name == "predictive"
    capacity = 3
    for t in range(0, 1800, 5):  # a load that keeps 3 instances at the 0.5 target
        capacity = policy.decide(obs(float(t), capacity, cpu=min(1.0, 1.5 / capacity))).desired
    assert capacity == 3
    learned = policy.export_state()
    assert learned["days"], "the policy learned nothing to carry over"
    policy.set_bounds(6, 20, None, 'scheduled action "business"')
    assert policy.export_state() == learned
    d = policy.decide(obs(1800.0, capacity, cpu=0.5))
    assert d.desired == 6 and d.reason.endswith('; min 6 set by scheduled action "business"')
    # Back to the configured bounds: the history still there, the fleet handed back after the window.
    policy.set_bounds(cfg.min_instances, cfg.max_instances, None, CONFIGURED)
    assert policy.export_state()["days"].keys() == learned["days"].keys()
    capacity = 6
    for t in range(1805, 1805 + int(cfg.scale_in_window) + 600, 5):
        capacity = policy.decide(obs(float(t), capacity, cpu=min(1.0, 1.5 / capacity))).desired
    assert capacity < 6  # the scheduled min is gone, the scale-in window has passed
