"""`target` and `threshold` policies: table-driven, with a fake clock (time is in the observation)."""

from __future__ import annotations

import pytest

from controller_asg.policy import build_policy, make_policy
from controller_asg.policy.base import Observation
from controller_asg.policy.target import TargetSettings, TargetTracking
from controller_asg.policy.threshold import Threshold, ThresholdSettings
from shared.config import load_config


def obs(now, cpus, *, pending=0, missing=0, warming=0):
    in_service = len(cpus) + missing + warming
    return Observation(
        now=float(now),
        capacity=in_service + pending,
        in_service=in_service,
        pending=pending,
        cpu_samples=tuple(cpus),
        missing=missing,
        warming=warming,
    )


def target(**kw):
    base = dict(min_instances=1, max_instances=10, cpu_target=0.5, tolerance=0.1, scale_in_window=300.0)
    base.update(kw)
    return TargetTracking(TargetSettings(**base))


@pytest.mark.parametrize(
    "cpus, expected, why",
    [
        ([0.52] * 4, 4, "inside the tolerance band (ratio 1.04)"),
        ([0.46] * 4, 4, "inside the band below target (ratio 0.92)"),
        ([0.56] * 4, 5, "just above the band: ceil(4 × 0.56 / 0.5) = 5"),
        ([0.9] * 4, 8, "scale out at once as far as the formula says"),
        ([1.0] * 8, 10, "clamped to max"),
        ([0.9], 2, "from min under a spike"),
    ],
)
def test_target_scale_out_table(cpus, expected, why):
    assert target().decide(obs(0, cpus)).desired == expected, why


def test_target_reason_names_the_cause():
    d = target().decide(obs(0, [0.83] * 4))
    assert "mean CPU 0.83 over 4 in-service instances, target 0.50" in d.reason


def test_pending_launches_count_as_capacity_so_a_spike_launches_once():
    p = target()
    assert p.decide(obs(0, [0.9] * 4)).desired == 8
    # the next intervals: 4 pending, the same hot 4 in service: nothing more
    for t in range(1, 10):
        assert p.decide(obs(t, [0.9] * 4, pending=4)).desired == 8


def test_scale_in_only_to_the_highest_recommendation_of_the_window():
    p = target(scale_in_window=300)
    assert p.decide(obs(0, [0.9] * 4)).desired == 8
    # load falls: 8 instances at 0.1 would want 2, but the window remembers 8
    for t in range(100, 300, 10):
        assert p.decide(obs(t, [0.1] * 8)).desired == 8
    # after the window, down to the highest recommendation of the last 300 s
    assert p.decide(obs(301, [0.1] * 8)).desired == 2


def test_stabilization_takes_the_highest_not_the_latest():
    p = target(scale_in_window=60)
    p.decide(obs(0, [0.5] * 6))  # in band: recommends 6
    p.decide(obs(10, [0.25] * 6))  # 3
    p.decide(obs(20, [0.33] * 6))  # 4
    assert p.decide(obs(65, [0.1] * 6)).desired == 4  # 6 has left the window; 4 is the highest left
    assert p.decide(obs(85, [0.1] * 6)).desired == 2


def test_warming_instances_count_as_capacity_but_their_cpu_is_left_out():
    # 2 warmed at 0.8, 2 warming: scaling out, the warming ones count as idle (their sample lags
    # the load they are about to take): mean 0.4 over 4, inside the band, no second launch.
    assert target().decide(obs(0, [0.8, 0.8], warming=2)).desired == 4
    # 3 warmed at 1.0, 1 warming: mean 0.75 over 4 → ceil(4×0.75/0.5) = 6.
    assert target().decide(obs(0, [1.0, 1.0, 1.0], warming=1)).desired == 6
    # Scaling in, they count as at target: (0.2 + 2×0.5)/4 = 0.3 → ceil(4×0.3/0.5) = 3, not 1.
    p = target()
    p.decide(obs(0, [0.1, 0.1], warming=2))
    assert p.decide(obs(400, [0.1, 0.1], warming=2)).desired == 3
    # only warming instances: no decision from nothing
    q = target()
    d = q.decide(obs(0, [], warming=3))
    assert d.desired == 3 and "no CPU metrics" in d.reason


@pytest.mark.parametrize(
    "cpus, missing, expected, why",
    [
        ([0.9, 0.9], 2, 4, "scale-out: missing count as 0: mean 0.45 → ratio 0.9 → in band, hold 4"),
        ([1.0, 1.0], 2, 4, "scale-out: mean 0.5 → at target"),
        ([1.0, 1.0, 1.0], 1, 6, "scale-out: mean 0.75 over 4 → 6"),
        ([0.05, 0.05], 2, 4, "scale-in: missing count at target: mean 0.275 → 3 at most, window holds 4"),
    ],
)
def test_missing_metrics_are_treated_conservatively(cpus, missing, expected, why):
    assert target().decide(obs(0, cpus, missing=missing)).desired == expected, why


def test_missing_metrics_at_target_when_scaling_in():
    p = target(scale_in_window=0)
    # 2 idle + 2 silent: HPA's rule counts the silent ones at target: ceil(4 × 0.25 / 0.5) = 2
    assert p.decide(obs(0, [0.0, 0.0], missing=2)).desired == 2
    # all silent: nothing known, nothing changes
    assert target(scale_in_window=0).decide(obs(0, [], missing=4)).desired == 4


@pytest.mark.parametrize(
    "cpus, lo, hi, expected",
    [
        ([0.0] * 5, 3, 10, 3),
        ([0.5] * 12, 1, 10, 10),
        ([0.5], 2, 10, 2),
    ],
)
def test_min_max_clamping(cpus, lo, hi, expected):
    assert target(min_instances=lo, max_instances=hi, scale_in_window=0).decide(obs(0, cpus)).desired == expected


def test_no_flapping_on_a_noisy_constant_load():
    import random

    rnd = random.Random(7)
    p = target()
    n, changes = 6, 0
    for t in range(3600):
        mean = 0.5 * (1 + rnd.uniform(-0.08, 0.08))  # ±8% around target, inside the 10% band
        d = p.decide(obs(t, [mean * 6 / n] * n))
        if d.desired != n:
            changes += 1
            n = d.desired
    assert changes == 0


# --- threshold -------------------------------------------------------------------------------


def threshold(**kw):
    base = dict(min_instances=1, max_instances=10, cpu_upper=0.7, cpu_lower=0.3, step=1, cooldown=60.0)
    base.update(kw)
    return Threshold(ThresholdSettings(**base))


@pytest.mark.parametrize(
    "cpus, step, expected",
    [
        ([0.8] * 3, 1, 4),
        ([0.8] * 3, 2, 5),
        ([0.5] * 3, 1, 3),
        ([0.2] * 3, 1, 2),
        ([0.2] * 3, 2, 1),
        ([0.2], 1, 1),  # min
        ([0.9] * 10, 1, 10),  # max
    ],
)
def test_threshold_table(cpus, step, expected):
    assert threshold(step=step).decide(obs(0, cpus)).desired == expected


def test_threshold_waits_the_cooldown_after_an_action():
    p = threshold(cooldown=60)
    assert p.decide(obs(0, [0.9] * 2)).desired == 3
    assert p.decide(obs(30, [0.9] * 2, pending=1)).desired == 3  # in cooldown: no second launch
    assert p.decide(obs(59, [0.9] * 3)).desired == 3
    assert p.decide(obs(61, [0.9] * 3)).desired == 4


def test_threshold_missing_metrics_never_launch_nor_terminate():
    assert threshold().decide(obs(0, [0.8], missing=3)).desired == 4  # mean_out 0.2: no launch
    assert threshold().decide(obs(0, [0.1], missing=3)).desired == 4  # silent ones at mid-band: no removal


def test_make_policy_builds_what_the_config_names():
    for name, cls in (("target", TargetTracking), ("threshold", Threshold)):
        cfg = load_config({"HELIX_POLICY": name, "HELIX_MIN_INSTANCES": "2", "HELIX_MAX_INSTANCES": "7"}, env_file="")
        p = make_policy(cfg)
        assert isinstance(p, cls) and p.s.min_instances == 2 and p.s.max_instances == 7
    cfg = load_config(
        {"HELIX_CPU_UPPER": "0.8", "HELIX_CPU_LOWER": "0.2", "HELIX_STEP": "2", "HELIX_COOLDOWN": "5"}, env_file=""
    )
    t = build_policy("threshold", cfg)
    assert (t.s.cpu_upper, t.s.cpu_lower, t.s.step, t.s.cooldown) == (0.8, 0.2, 2, 5)
    with pytest.raises(ValueError, match="policy=nope"):
        build_policy("nope", cfg)
