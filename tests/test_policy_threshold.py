"""`threshold` policy, rule by rule: the [min, max] bounds, the strict CPU thresholds, the
cooldown (started by a scale-out *and* a scale-in, at any time, never by a no-op), missing metrics,
and the reason it gives. Time is in the observation: a fake clock, no sleeps."""

from __future__ import annotations

import pytest

from controller_asg.policy.base import Observation
from controller_asg.policy.threshold import Threshold, ThresholdSettings

T0 = 5_000.0  # decisions start well after t=0, so a cooldown that "works" only from 0 shows


def obs(now, cpus, *, capacity=None, missing=0, warming=0, pending=0):
    in_service = len(cpus) + missing + warming
    return Observation(
        now=float(now),
        capacity=in_service + pending if capacity is None else capacity,
        in_service=in_service,
        pending=pending,
        cpu_samples=tuple(cpus),
        missing=missing,
        warming=warming,
    )


def policy(**kw):
    base = dict(min_instances=2, max_instances=6, cpu_upper=0.75, cpu_lower=0.25, step=1, cooldown=60.0)
    base.update(kw)
    return Threshold(ThresholdSettings(**base))


# -- bounds -----------------------------------------------------------------------------------------


def test_scales_out_from_exactly_min():
    """Rule: capacity == min is inside [min, max]: a hot fleet at min grows (bounds are inclusive)."""
    d = policy().decide(obs(T0, [0.9, 0.9]))
    assert d.desired == 3 and "above 0.75" in d.reason


def test_scales_in_from_exactly_max():
    """Rule: capacity == max is inside [min, max]: an idle fleet at max shrinks."""
    d = policy().decide(obs(T0, [0.1] * 6))
    assert d.desired == 5 and "below 0.25" in d.reason


@pytest.mark.parametrize("capacity, expected", [(0, 2), (1, 2), (7, 6), (9, 6)])
def test_outside_the_bounds_it_returns_into_them_first(capacity, expected):
    """Rule: a capacity outside [min, max] is brought back to the nearest bound, whatever the CPU."""
    d = policy().decide(obs(T0, [0.5] * capacity, capacity=capacity))
    assert d.desired == expected
    assert d.reason == "keep within [2, 6]"


def test_a_step_never_crosses_a_bound():
    """Rule: step is clamped to [min, max]: 5 + 3 stops at 6, 3 - 3 stops at 2."""
    assert policy(step=3).decide(obs(T0, [0.9] * 5)).desired == 6
    assert policy(step=3).decide(obs(T0, [0.1] * 3)).desired == 2


# -- thresholds are strict ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpus, expected, why",
    [
        ([0.75, 0.75, 0.75], 3, "mean exactly at cpu_upper: not above it, no launch"),
        ([0.75, 0.75, 0.8125], 4, "mean just above cpu_upper: launch"),
        ([0.25, 0.25, 0.25], 3, "mean exactly at cpu_lower: not below it, no removal"),
        ([0.25, 0.25, 0.1875], 2, "mean just below cpu_lower: remove"),
        ([0.5, 0.5, 0.5], 3, "inside the band"),
    ],
)
def test_thresholds_are_strict(cpus, expected, why):
    """Rule: scale out when mean > cpu_upper, in when mean < cpu_lower; equality does nothing."""
    assert policy().decide(obs(T0, cpus)).desired == expected, why


# -- cooldown ---------------------------------------------------------------------------------------


def test_cooldown_after_a_scale_out_that_starts_late():
    """Rule: after an action, nothing for `cooldown` seconds counted from the action's own time
    (not from 0); at exactly `cooldown` seconds later the policy acts again."""
    p = policy(cooldown=60)
    assert p.decide(obs(T0, [0.9] * 3)).desired == 4
    d = p.decide(obs(T0 + 30, [0.9] * 4))
    assert d.desired == 4 and d.reason == "cooldown: 30 s left"
    d = p.decide(obs(T0 + 59.5, [0.9] * 4))
    assert d.desired == 4 and d.reason.startswith("cooldown: ")
    assert p.decide(obs(T0 + 60, [0.9] * 4)).desired == 5  # cooldown over at exactly 60 s


def test_a_scale_in_starts_the_cooldown_too():
    """Rule: a scale-in is an action: the next one waits `cooldown` seconds, so an idle fleet
    steps down one step per cooldown, not one per decision."""
    p = policy(cooldown=120)
    assert p.decide(obs(T0, [0.1] * 5)).desired == 4
    d = p.decide(obs(T0 + 1, [0.1] * 4))
    assert d.desired == 4 and d.reason == "cooldown: 119 s left"
    assert p.decide(obs(T0 + 119, [0.1] * 4)).desired == 4
    assert p.decide(obs(T0 + 120, [0.1] * 4)).desired == 3


def test_the_cooldown_also_holds_the_opposite_direction():
    """Rule: after a scale-out, a sudden idle fleet still waits the cooldown before scaling in."""
    p = policy(cooldown=60)
    assert p.decide(obs(T0, [0.9] * 3)).desired == 4
    assert p.decide(obs(T0 + 10, [0.0] * 4)).desired == 4
    assert p.decide(obs(T0 + 60, [0.0] * 4)).desired == 3


def test_a_clamped_no_op_does_not_start_the_cooldown():
    """Rule: only a change starts the cooldown: hot at max or idle at min changes nothing, so the
    next decision may act at once in the other direction."""
    p = policy(cooldown=600)
    assert p.decide(obs(T0, [0.1, 0.1])).desired == 2  # idle at min: nothing to remove
    assert p.decide(obs(T0 + 1, [0.9, 0.9])).desired == 3  # not held by a cooldown
    q = policy(cooldown=600)
    assert q.decide(obs(T0, [0.9] * 6)).desired == 6  # hot at max: nothing to add
    assert q.decide(obs(T0 + 1, [0.1] * 6)).desired == 5


def test_no_cooldown_before_the_first_action():
    """Rule: a policy that never acted has no cooldown, even at time 0 or a negative clock."""
    assert policy().decide(obs(0, [0.9] * 3)).desired == 4
    assert policy().decide(obs(-100, [0.9] * 3)).desired == 4


def test_a_bounds_correction_is_not_held_by_the_cooldown():
    """Rule: [min, max] is enforced before the cooldown: a fleet below min regrows at once."""
    p = policy(cooldown=600)
    assert p.decide(obs(T0, [0.9] * 3)).desired == 4
    assert p.decide(obs(T0 + 1, [0.5], capacity=1)).desired == 2


# -- missing metrics ----------------------------------------------------------------------------------


def test_no_samples_at_all_holds_without_dividing_by_zero():
    """Rule: with no CPU sample and nothing missing (only warming instances, or none yet) the
    policy holds the capacity and says why; it never divides by zero."""
    d = policy().decide(obs(T0, [], warming=3))
    assert (d.desired, d.reason) == (3, "no CPU metrics yet")
    d = policy(min_instances=0).decide(obs(T0, [], capacity=0))
    assert (d.desired, d.reason) == (0, "no CPU metrics yet")


def test_only_missing_metrics_never_act():
    """Rule: instances without metrics alone never launch (they count as idle for scale-out, and
    nothing is known) nor terminate (they count at mid-band for scale-in)."""
    d = policy().decide(obs(T0, [], missing=4))
    assert d.desired == 4
    assert d.reason == "mean CPU 0.00 over 0 in-service instances, within [0.25, 0.75]"


def test_missing_count_as_idle_when_scaling_out():
    """Rule: scale-out divides the known CPU by known + missing: 3 at 0.9 and 1 silent is 0.675,
    not above 0.75 (dividing by known - missing would read 1.35 and launch)."""
    assert policy().decide(obs(T0, [0.9] * 3, missing=1)).desired == 4
    assert policy().decide(obs(T0, [1.0] * 4, missing=1)).desired == 6  # 4.0 / 5 = 0.8: launch


def test_missing_count_at_mid_band_when_scaling_in():
    """Rule: scale-in counts each silent instance at (upper + lower) / 2. With band [0.4, 0.8],
    one idle-ish (0.3) and one silent instance average (0.3 + 0.6) / 2 = 0.45: no removal."""
    p = policy(min_instances=1, cpu_upper=0.8, cpu_lower=0.4)
    assert p.decide(obs(T0, [0.3], missing=1)).desired == 2
    # one idle and one silent: (0.0 + 0.5) / 2 = 0.25 < 0.3: remove (as many known as missing)
    q = policy(min_instances=1, cpu_upper=0.7, cpu_lower=0.3)
    assert q.decide(obs(T0, [0.0], missing=1)).desired == 1
    # 3 idle + 1 silent: (0 + 0.5) / 4 = 0.125: remove; a silent one counted at 2.0 would hold
    assert policy(cpu_upper=0.7, cpu_lower=0.3).decide(obs(T0, [0.0] * 3, missing=1)).desired == 3


# -- the reason ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpus, missing, reason",
    [
        ([0.875, 0.875], 0, "mean CPU 0.88 over 2 in-service instances, above 0.75"),
        ([0.125], 0, "mean CPU 0.12 over 1 in-service instance, below 0.25"),
        ([0.125, 0.125, 0.125], 0, "mean CPU 0.12 over 3 in-service instances, below 0.25"),
        ([0.5, 0.5], 1, "mean CPU 0.50 over 2 in-service instances, within [0.25, 0.75]"),
    ],
)
def test_the_reason_names_the_mean_of_the_known_the_count_and_the_rule(cpus, missing, reason):
    """Rule: the reason shows the mean of the instances with metrics (not diluted by the silent
    ones), their count with the right plural, and which side of the band it is on."""
    assert policy(min_instances=1).decide(obs(T0, cpus, missing=missing)).reason == reason


def test_state_is_not_persisted():
    """Rule: threshold learns nothing worth keeping across a restart."""
    p = policy()
    assert p.export_state() == {}
    assert p.import_state({"anything": 1}) is None
