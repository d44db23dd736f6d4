"""Several signals, one fleet (policy/multi.py): each metric recommends, the largest wins, the
reason names the winner; scale from zero and back on an external backlog. Pure: no clock, no I/O."""

from __future__ import annotations

from controller_asg.policy import make_policy
from controller_asg.policy.base import Observation
from controller_asg.policy.multi import MultiMetric
from controller_asg.policy.predictive import Predictive
from shared.config import load_config


def cfg(**extra):
    env = {"HELIX_ENV_FILE": "", "HELIX_MIN_INSTANCES": "1", "HELIX_MAX_INSTANCES": "20", "HELIX_SCALE_IN_WINDOW": "60"}
    env.update({k: str(v) for k, v in extra.items()})
    return load_config(env)


def obs(t: float, n: int, cpu: float, rps: float = 0.0, mem: float = 0.0, external: float | None = None, pending=0):
    return Observation(
        now=t,
        capacity=n + pending,
        in_service=n,
        pending=pending,
        cpu_samples=(cpu,) * n,
        rps_samples=(rps,) * n,
        mem_samples=(mem,) * n,
        external=external,
    )


def test_cpu_alone_is_just_the_policy():
    assert isinstance(make_policy(cfg()), Predictive)


def test_the_largest_recommendation_wins_and_its_reason_names_it():
    policy = make_policy(cfg(HELIX_RPS_TARGET=50, HELIX_MEM_TARGET=0.7))
    assert isinstance(policy, MultiMetric) and policy.name == "predictive+requests/s+memory"
    d = None
    for t in range(5):  # CPU at target, but each instance serves twice its request target
        d = policy.decide(obs(t, 4, cpu=0.5, rps=100.0, mem=0.3))
    assert d is not None and d.desired == 8, d
    assert d.reason.startswith("requests/s wins (CPU 4, memory 4): mean requests/s 100.0 over 4"), d.reason
    assert "target 50.0" in d.reason
    policy = make_policy(cfg(HELIX_RPS_TARGET=50, HELIX_MEM_TARGET=0.5))
    for t in range(5):
        d = policy.decide(obs(t, 4, cpu=0.3, rps=20.0, mem=0.75))
    assert d.desired == 6 and d.reason.startswith("memory wins"), d


def test_one_metric_over_its_target_holds_the_fleet_however_idle_the_others_are():
    policy = make_policy(cfg(HELIX_RPS_TARGET=50))
    for t in range(0, 600, 1):
        d = policy.decide(obs(t, 6, cpu=0.05, rps=49.0))
    assert d.desired == 6, d  # CPU alone would have gone to 1


def test_scale_from_zero_on_the_backlog_and_back_to_zero_when_idle():
    c = cfg(HELIX_MIN_INSTANCES=0, HELIX_EXTERNAL_METRIC="file:/tmp/queue", HELIX_EXTERNAL_TARGET=100)
    policy = make_policy(c)
    assert isinstance(policy, MultiMetric)
    assert policy.decide(obs(0, 0, cpu=0.0, external=0.0)).desired == 0  # empty, idle: stays empty
    d = policy.decide(obs(1, 0, cpu=0.0, external=250.0))
    assert d.desired == 3 and d.reason.startswith("backlog wins"), d
    zero_at = None
    for t in range(2, 400):  # the work is worked off by t=52; the instances idle after
        backlog = max(0.0, 250.0 - 5 * (t - 2))
        d = policy.decide(obs(t, 3, cpu=0.4 if backlog else 0.02, external=backlog))
        if d.desired == 0:
            zero_at = t
            break
    assert zero_at is not None and "no backlog for" in d.reason, d
    assert 52 + 60 <= zero_at <= 52 + 62, "to zero once the backlog had been empty for a whole window"
    assert policy.decide(obs(zero_at + 1, 0, cpu=0.0, external=1.0)).desired == 1  # one message wakes it


def test_a_backlog_that_cannot_be_read_holds():
    policy = make_policy(cfg(HELIX_MIN_INSTANCES=0, HELIX_EXTERNAL_METRIC="file:/tmp/q", HELIX_EXTERNAL_TARGET=10))
    assert policy.decide(obs(0, 0, cpu=0.0, external=None)).desired == 0
    policy.decide(obs(1, 0, cpu=0.0, external=50.0))
    for t in range(2, 400):
        d = policy.decide(obs(t, 5, cpu=0.02, external=None))
    assert d.desired >= 1 and "no backlog" not in d.reason, d  # never scaled to zero on silence


def test_state_survives_a_restart_and_old_history_goes_to_cpu():
    c = cfg(HELIX_RPS_TARGET=50)
    policy = make_policy(c)
    for t in range(0, 3 * 86400, 3600):
        policy.decide(obs(t, 4, cpu=0.5, rps=40.0))
    state = policy.export_state()
    assert set(state["members"]) == {"CPU", "requests/s"}
    fresh = make_policy(c)
    fresh.import_state(state)
    assert fresh.export_state() == state
    legacy = make_policy(cfg()).export_state()  # a CPU-only controller's saved history
    again = make_policy(c)
    again.import_state(legacy)
    assert again.export_state()["members"]["CPU"] == legacy


def test_requests_keep_a_fleet_from_zero_but_cpu_does_not():
    """KEDA's rule: the backlog and requests are the work; CPU only says how hard instances work."""
    c = cfg(HELIX_MIN_INSTANCES=0, HELIX_EXTERNAL_METRIC="file:/tmp/q", HELIX_EXTERNAL_TARGET=10, HELIX_RPS_TARGET=50)
    policy = make_policy(c)
    for t in range(0, 300):
        d = policy.decide(obs(t, 2, cpu=0.02, rps=3.0, external=0.0))
    assert d.desired >= 1, d  # requests still arrive: not to zero
    for t in range(300, 420):
        d = policy.decide(obs(t, 2, cpu=0.02, rps=0.0, external=0.0))
        if d.desired == 0:
            break
    assert d.desired == 0 and "no backlog and no request for" in d.reason, d
    assert t >= 299 + 60
