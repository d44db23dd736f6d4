"""Drain before terminate, and target groups: the real controller in the fault-injection harness
(tests/faultsim.py), on a simulated clock, with FakeTraffic standing in for ELBv2 target groups
(the real ELBv2 client is tested against moto in tests/test_elb.py).

Every harness run also checks, at each terminate call, that the instance had left its target
groups, that its target had drained (or the timeout passed), and that an instance in service had
its terminate hook's chance: a violation there fails `assert_clean`."""

from __future__ import annotations

import json

import pytest

from controller_asg.drain import Drain, hook_verdict, start_drain, traffic_verdict
from controller_asg.traffic import TargetState
from shared.table import HookResult, InstanceRow, Lifecycle, Notice, State
from tests.faultsim import Fault, Harness, activities, assert_clean

# The controller's loggers quiet in here (thousands of simulated steps); restored after each test.
pytestmark = pytest.mark.usefixtures("quiet_controller_logs")

DRAIN = 30.0


def scaled_in(h: Harness, *, load_high: int = 40, load_low: int = 5) -> list[str]:
    """Grow the fleet under load, then drop the load until it scales in; the ids it let go."""
    h.run([Fault(0, "load", value=load_high), Fault(200, "load", value=load_low)], faults_end=500, settle=600)
    return [i for a in activities(h) if a["action"] == "terminate" for i in a["instance_ids"]]


def test_scale_in_drains_each_instance_before_terminating_it(harness, tmp_path):
    h = harness(traffic=True, HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"), HELIX_MAX_INSTANCES=6)
    victims = scaled_in(h)
    assert victims, "the load drop scaled nothing in"
    drained = [a for a in activities(h) if a["action"] == "drained"]
    assert sorted(i for a in drained for i in a["instance_ids"]) == sorted(victims)
    assert all(
        "terminate hook continue" in a["reason"] and "drained from its target groups" in a["reason"] for a in drained
    )
    assert_clean(h.report)
    # Everyone serving is in the target groups; no one gone is.
    serving = {i.instance_id for i in h.cloud.billable()}
    assert h.traffic is not None and h.traffic.registered == serving


def test_a_new_instance_joins_its_target_groups_only_once_prepared(harness):
    h = harness(traffic=True, HELIX_MIN_INSTANCES=1, HELIX_MAX_INSTANCES=2)
    assert h.traffic is not None
    seen_unprepared_in_traffic = []
    for _ in range(60):
        h.step()
        for instance_id in h.traffic.registered:
            row = h.monitor.rows.get(instance_id)
            if row is None or row.lifecycle != Lifecycle.IN_SERVICE:
                seen_unprepared_in_traffic.append(instance_id)
        h.now += 1
    assert not seen_unprepared_in_traffic
    assert len(h.traffic.registered) >= 1
    assert h.table.snapshot().controller.in_service == len(h.traffic.registered)


def test_the_load_balancer_failing_holds_the_terminate_past_the_timeout(harness, tmp_path):
    """Never terminate an instance still registered: the terminate waits for the API, however long."""
    h = harness(traffic=True, HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"), HELIX_MAX_INSTANCES=6)
    report = h.run(
        [Fault(0, "load", value=40), Fault(200, "load", value=5), Fault(200, "lb_down", duration=300)],
        faults_end=700,
        settle=600,
    )
    assert_clean(report)
    drained = [a for a in activities(h) if a["action"] == "drained"]
    assert drained and all(a["time"] >= 500 for a in drained), "terminated while the load balancer was down"


def test_a_slow_drain_is_waited_for_until_the_timeout_and_no_longer(harness, tmp_path):
    h = harness(traffic=True, HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"), HELIX_MAX_INSTANCES=6)
    report = h.run(
        [Fault(0, "load", value=40), Fault(190, "lb_slow_drain", value=10), Fault(200, "load", value=5)],
        faults_end=500,
        settle=600,
    )
    assert_clean(report)  # the checker fails any terminate of an undrained target before the timeout
    drained = [a for a in activities(h) if a["action"] == "drained"]
    slow = [a for a in drained if "at the drain timeout" in a["reason"]]
    assert slow, [a["reason"] for a in drained]
    assert all(drain_seconds(a) <= DRAIN + 3 for a in slow)


def drain_seconds(activity: dict) -> float:
    return float(activity["reason"].split("drained in ")[1].split("s ")[0])


def test_a_hook_that_hangs_ends_at_the_deadline(harness, tmp_path):
    h = harness(HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"), HELIX_MAX_INSTANCES=6)
    report = h.run(
        [Fault(0, "hook_hangs", value=20), Fault(0, "load", value=40), Fault(200, "load", value=5)],
        faults_end=500,
        settle=600,
    )
    assert_clean(report)
    drained = [a for a in activities(h) if a["action"] == "drained"]
    assert drained and all("terminate hook timeout" in a["reason"] for a in drained), [a["reason"] for a in drained]
    assert all(DRAIN - 1 <= drain_seconds(a) <= DRAIN + 2 for a in drained)


def test_an_instance_that_dies_while_draining_is_not_waited_for(harness, tmp_path):
    h = harness(HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"), HELIX_MAX_INSTANCES=6)
    report = h.run(
        [
            Fault(0, "hook_hangs", value=20),
            Fault(0, "load", value=40),
            Fault(200, "load", value=5),
            *[Fault(t, "dies_draining") for t in range(200, 500, 2)],
        ],
        faults_end=500,
        settle=600,
    )
    assert_clean(report)
    died = [a for a in activities(h) if a["action"] == "drained" and "terminate hook failed" in a["reason"]]
    assert died and all(drain_seconds(a) < DRAIN / 2 for a in died), [a["reason"] for a in died]


def test_a_launch_hook_that_abandons_is_a_failed_launch_terminated_without_drain(harness, tmp_path):
    h = harness(HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"))
    report = h.run([Fault(0, "hook_abandons", value=2)], faults_end=120, settle=600)
    assert_clean(report)
    acts = activities(h)
    replaced = [a for a in acts if a["action"] == "replace" and "launch hook ended abandon" in a["reason"]]
    assert len(replaced) == 2
    failed = [a for a in acts if a["action"] == "launch-failed"]
    assert len(failed) == 2, "each abandoned launch counts once against the churn breaker"
    assert not any(
        a["action"] == "drained" and set(a["instance_ids"]) & {i for r in replaced for i in r["instance_ids"]}
        for a in acts
    )


def test_an_interruption_notice_replaces_the_instance_and_drains_it_before_it_goes(harness, tmp_path):
    h = harness(traffic=True, HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"))
    h.run_until(120)
    victim = sorted(h.monitor.rows)[0]
    row = h.monitor.rows[victim]
    row.notice, row.notice_at = Notice.INTERRUPTION, h.now + 120  # EC2's two-minute warning
    h.monitor.tick(h.now)
    h.run_until(h.now + 200)
    acts = activities(h)
    [replace] = [a for a in acts if a["action"] == "replace" and victim in a["instance_ids"]]
    assert "interruption notice" in replace["reason"]
    [drained] = [a for a in acts if a["action"] == "drained" and victim in a["instance_ids"]]
    assert drained["time"] <= row.notice_at - 15 + 1, "drained before EC2 takes it, with its margin"
    launch = [a for a in acts if a["action"] == "launch" and victim in a["reason"]]
    assert launch and launch[0]["time"] < drained["time"], "the replacement launched while it drained"
    assert_clean(h.report, converge=False)


def test_a_restart_mid_drain_resumes_it(harness, tmp_path):
    h = harness(traffic=True, HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"), HELIX_MAX_INSTANCES=6)
    h.inject(Fault(0, "load", value=40))
    h.run_until(200)
    h.inject(Fault(200, "lb_slow_drain", value=1))
    h.inject(Fault(200, "load", value=5))
    while h.now < 600 and not (h.controller and h.controller._drains):  # noqa: SLF001 - what the test is about
        h.step()
        h.now += 1
    assert h.controller is not None and h.controller._drains, "no drain started"  # noqa: SLF001
    draining = set(h.controller._drains)  # noqa: SLF001
    for _ in range(8):  # killed and restarted every few seconds while they drain
        h.run_until(h.now + 5)
        h.restart_controller()
    h.run_until(h.now + 120)
    drained = {i for a in activities(h) if a["action"] == "drained" for i in a["instance_ids"]}
    assert draining <= drained
    h.report.violations += h.cloud.violations
    assert_clean(h.report, converge=False)


def test_an_instance_the_target_group_fails_is_replaced_with_elb_health(harness, tmp_path):
    h = harness(traffic=True, HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"), HELIX_HEALTH_SOURCES="agent,elb")
    h.run_until(120)
    assert h.traffic is not None
    victim = sorted(h.traffic.registered)[0]
    h.traffic.unhealthy.add(victim)
    h.run_until(h.now + 60)
    replaced = [a for a in activities(h) if a["action"] == "replace" and victim in a["instance_ids"]]
    assert replaced and "target group's health check" in replaced[0]["reason"]


# -- the pure verdicts ------------------------------------------------------------------------------


def row(lifecycle: Lifecycle, state: State = State.HEALTHY, result: HookResult = HookResult.NONE) -> InstanceRow:
    return InstanceRow("i-1", "127.0.0.1:1", state, lifecycle=lifecycle, hook_result=result)


def test_verdicts():
    d = start_drain(100.0, "scale-in", 30.0)
    assert (d.deadline, d.hard_deadline) == (130.0, 0.0)
    assert traffic_verdict(d, TargetState.UNUSED, 101, 30) == "", "never before it left its target groups"
    d.left_traffic_at = 105.0
    assert traffic_verdict(d, TargetState.DRAINING, 134, 30) == ""
    assert "terminating anyway" in traffic_verdict(d, TargetState.DRAINING, 135, 30)
    assert "state unknown" in traffic_verdict(d, None, 135, 30)
    assert traffic_verdict(d, TargetState.UNUSED, 106, 30) == "drained from its target groups"
    assert hook_verdict(d, row(Lifecycle.DRAINING), 110) == ""
    assert "continue" in hook_verdict(d, row(Lifecycle.DRAINED, result=HookResult.CONTINUE), 110)
    assert hook_verdict(d, row(Lifecycle.DRAINING, State.UNHEALTHY), 110) == "its agent does not answer"
    assert hook_verdict(d, None, 110) == "no agent to ask"
    assert "still running" in hook_verdict(d, row(Lifecycle.DRAINING), 130)
    assert hook_verdict(d, None, 110, table_read=False) == "", "an unreadable table: only the deadline"
    notice = start_drain(100.0, "interruption", 300.0, drain_by=160.0)
    assert (notice.deadline, notice.hard_deadline) == (160.0, 160.0)
    notice.left_traffic_at = 150.0
    assert "terminating anyway" in traffic_verdict(notice, TargetState.DRAINING, 160, 300)
    assert isinstance(Drain(**json.loads(json.dumps(notice.__dict__))), Drain)
