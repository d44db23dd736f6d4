"""Issue 14 on the fault-injection harness: two or three managers (a table and a real controller
each) on one simulated cloud, one lease and one state store (tests/faultsim.py's HAHarness, the
rules of controller_asg/lease.py's LeaseFence and statestore.py's epoch-fenced writes on the
simulated clock). Every call that changes the cloud is checked to come from the lease's holder,
under its epoch, before its lease ends; billable never above max; no launch token doubled."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller_asg.ctlserver import Caller, CtlError, validate
from tests.faultsim import FAULT_KINDS, HA_FAULT_KINDS, Fault, HAHarness, assert_clean

SETTLE = 900


def make(table_name: str, tmp: str, managers: int = 2, **config: object) -> HAHarness:
    settings_: dict[str, object] = {
        "HELIX_MIN_INSTANCES": 2,
        "HELIX_MAX_INSTANCES": 6,
        "HELIX_LEASE_TTL": 10,
        "HELIX_LEASE_CLOCK_MARGIN": 2,
    }
    settings_.update(config)
    return HAHarness(table_name, tmp, managers=managers, **settings_)


def test_one_leader_acts_and_a_standby_takes_over_when_it_dies(table_name, tmp_path):
    h = make(table_name, str(tmp_path))
    try:
        h.run_until(60)
        first = h.leader()
        assert first.name == "m1" and h.lease.epoch == 1 and len(h.cloud.billable()) == 2
        standby = h.managers[1]
        assert standby.controller is not None and standby.fence.may_act() != ""
        # The standby decides every step: its table is warm and its status follows the fleet.
        assert standby.table.snapshot().controller.desired == 2
        h.inject(Fault(int(h.now), "leader_dies", duration=300))
        victim = sorted(h.cloud.billable(), key=lambda i: i.instance_id)[0]
        victim.agent_dead = True  # and an instance dies with it: someone must replace it
        died = h.now
        while h.leader().name == "m1" or h.lease.epoch < 2:
            h.step()
            h.now += 1
            assert h.now - died < 30, "no takeover"
        assert h.now - died <= h.cfg.lease_ttl + 1
        h.run_until(h.now + 200)
        assert victim.state in ("terminating", "gone")
        assert h.converged() and len(h.cloud.billable()) == 2
        assert h.cloud.violations == []
    finally:
        h.close()


def test_a_paused_leader_that_wakes_after_its_lease_was_taken_acts_on_nothing(table_name, tmp_path):
    h = make(table_name, str(tmp_path), managers=3)
    try:
        h.run_until(60)
        old = h.leader()
        h.inject(Fault(int(h.now), "leader_paused", duration=40))
        h.monitor.load = 4.0  # demand rises while it sleeps: the new leader scales out
        h.run_until(h.now + 120)
        assert h.leader() is not old and h.lease.epoch == 2
        assert old.state == "up" and old.fence.may_act() != "", "woke up, and knows it is not the leader"
        assert len(h.cloud.billable()) > 2
        assert h.cloud.violations == [], h.cloud.violations[:3]
    finally:
        h.close()


def test_a_leader_cut_off_from_the_store_stops_acting_before_another_takes_over(table_name, tmp_path):
    h = make(table_name, str(tmp_path))
    try:
        h.run_until(60)
        old = h.leader()
        h.inject(Fault(int(h.now), "store_cut", duration=60))
        cut = h.now
        while old.fence.may_act() == "":
            h.step()
            h.now += 1
        assert h.now - cut <= h.cfg.lease_ttl - h.cfg.lease_clock_margin + 1
        h.monitor.load = 4.0
        h.run_until(h.now + 150)
        assert h.leader() is not old and len(h.cloud.billable()) > 2
        assert h.cloud.violations == []
    finally:
        h.close()


FAULTS_END = 900

fault_strategy = st.builds(
    Fault,
    at=st.integers(0, FAULTS_END - 1),
    kind=st.sampled_from(HA_FAULT_KINDS * 4 + FAULT_KINDS),
    duration=st.integers(1, 90),
    value=st.integers(1, 40),
)


@settings(
    max_examples=int(os.environ.get("HELIX_HA_FAULT_EXAMPLES", "10")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    faults=st.lists(fault_strategy, min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
    managers=st.sampled_from([2, 3]),
)
def test_random_fault_schedules_with_several_managers_keep_every_invariant(
    table_name, tmp_path_factory, faults, seed, managers
):
    h = make(table_name, str(tmp_path_factory.mktemp("ha")), managers=managers, seed=seed)
    try:
        report = h.run(faults, FAULTS_END, settle=SETTLE)
    finally:
        h.close()
    assert_clean(report)


def test_helix_ctl_changes_only_on_the_leader_and_they_move_with_it(table_name, tmp_path):
    h = make(table_name, str(tmp_path))
    try:
        h.run_until(30)
        standby = h.managers[1]
        assert standby.controller is not None
        op, args, reason = validate({"op": "suspend", "args": {"processes": ["scale-in"]}})
        with pytest.raises(CtlError, match="holds the lease"):
            standby.controller.handle_ctl(op, args, Caller(1, 0, "tester"), reason)
        assert standby.controller.ctl_status()["desired"] == 2, "a standby answers status"
        h.ctl("suspend", processes=["scale-in"], reason="incident")
        h.ctl("set-capacity", desired=3, reason="event")
        h.run_until(h.now + 5)
        h.inject(Fault(int(h.now), "leader_dies", duration=600))
        h.run_until(h.now + 30)
        assert h.leader() is standby
        status = h.ctl("status")
        assert status["suspended"] == ["scale-in"] and status["bounds"]["desired"] == 3, "restored from the store"
        assert h.cloud.violations == []
    finally:
        h.close()


def test_a_new_leader_resumes_the_old_ones_launch_in_doubt_under_its_token(table_name, tmp_path):
    h = make(table_name, str(tmp_path))
    try:
        h.run_until(60)
        h.inject(Fault(int(h.now), "lost_reply"))  # the next launch runs, its reply is lost
        h.monitor.load = 3.5  # a scale-out: the leader launches, and never hears back
        before = len(h.cloud.calls)
        while len(h.cloud.calls) == before:
            h.step()
            h.now += 1
            assert h.now < 200
        token = h.cloud.calls[-1][1]
        state = h.store.items["state"][1]
        assert token in state, "the intent was in the store before the call"
        h.inject(Fault(int(h.now), "leader_dies", duration=600))  # before it could retry
        h.run_until(h.now + 60)
        assert h.leader().name == "m2"
        assert [t for _, t in h.cloud.calls].count(token) >= 2, "resumed under the same token"
        assert len(h.cloud.by_token[token]) == h.cloud.first_count[token], "nothing launched twice"
        assert h.cloud.violations == []
    finally:
        h.close()


def test_a_leader_whose_lease_replies_are_lost_lets_another_take_over(table_name, tmp_path):
    """Found live: its renewals kept reaching the store and extending a lease it could no longer
    use (it never heard back), so nobody acted. It now renews only while its last answered
    renewal holds."""
    h = make(table_name, str(tmp_path))
    try:
        h.run_until(60)
        old = h.leader()
        h.inject(Fault(int(h.now), "replies_lost", duration=120))
        h.monitor.load = 4.0
        h.run_until(h.now + 60)
        assert h.leader() is not old and old.fence.may_act() != ""
        assert len(h.cloud.billable()) > 2, "the new leader scaled out"
        assert h.cloud.violations == []
    finally:
        h.close()


def test_a_launch_the_standby_saw_healthy_is_not_a_failure_after_a_failover(table_name, tmp_path):
    """Found live: the new leader restored the last saved state, in which a launch was still
    'watched' (its healthy verdict came after the old leader's last successful save), then judged
    it failed when it died: a back-off and a strike towards the breaker for a launch that worked."""
    # A lease long enough for the launch to come into service before it can be taken over.
    h = make(table_name, str(tmp_path), HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"), HELIX_LEASE_TTL=40)
    try:
        h.run_until(60)
        h.monitor.load = 3.5
        before = {i.instance_id for i in h.cloud.billable()}
        while not ({i.instance_id for i in h.cloud.billable()} - before):
            h.step()
            h.now += 1
            assert h.now < 120
        # The launch (and its intent) is in the store; from now on the leader's saves fail.
        h.inject(Fault(int(h.now), "store_cut", duration=600))
        new = sorted({i.instance_id for i in h.cloud.billable()} - before)
        # They come into service (every table sees them) while the old leader still leads…
        while h.now < h.lease.expires - 1:
            h.step()
            h.now += 1
        assert all(h.monitor.is_healthy(i) for i in new) and h.leader().name == "m1"
        h.cloud.instances[new[0]].state = "gone"  # … and one dies just as the standby takes over
        h.run_until(h.now + 30)
        assert h.leader().name == "m2"
        with open(tmp_path / "a.jsonl", encoding="utf-8") as fh:
            failed = [line for line in fh if '"launch-failed"' in line]
        assert failed == [], failed
        assert h.cloud.violations == []
    finally:
        h.close()
