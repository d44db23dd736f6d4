"""Instance refresh, max instance lifetime, capacity overrides, suspended processes and schedules:
the real controller (refresh.py, operator.py, its act path) on the fault-injection harness's
simulated cloud and clock, steered through its helix-ctl handler."""

from __future__ import annotations

import math

import pytest

from controller_asg.ctlserver import CtlError
from controller_asg.operator import Bounds, Override, Scheduled, check_override, resolve_bounds
from shared.table import Lifecycle, State
from tests.faultsim import Fault, Harness, activities, assert_clean


def serving(h: Harness) -> int:
    """Instances in service right now: prepared, HEALTHY, not draining, billable."""
    rows = {r.instance_id: r for r in h.table.snapshot().instances()}
    return sum(
        1
        for i in h.cloud.billable()
        if i.state == "running"
        and (r := rows.get(i.instance_id)) is not None
        and r.state == State.HEALTHY
        and r.lifecycle == Lifecycle.IN_SERVICE
    )


def settle(h: Harness, until: float, desired: int) -> None:
    h.run_until(until)
    assert serving(h) == desired and len(h.cloud.billable()) == desired


def run_watching(h: Harness, until: float, floor: int, ceiling: int) -> list[int]:
    """Step to `until`, checking every simulated second that the fleet keeps at least `floor` in
    service and never bills more than `ceiling`; the in-service counts seen."""
    seen = []
    while h.now < until:
        h.step()
        h.now += 1.0
        n = serving(h)
        seen.append(n)
        assert n >= floor, f"t={h.now:.0f}: {n} in service, min healthy {floor}"
        assert len(h.cloud.billable()) <= ceiling, f"t={h.now:.0f}: {len(h.cloud.billable())} billable"
    return seen


def configs(h: Harness) -> set[str]:
    return {i.config for i in h.cloud.billable()}


def refresh_state(h: Harness) -> dict:
    status = h.ctl("status")
    assert status["refresh"] is not None
    return status["refresh"]


# -- refresh -------------------------------------------------------------------------------------


def test_refresh_replaces_every_instance_keeping_min_healthy_and_draining_each(harness, tmp_path):
    h = harness(HELIX_MIN_INSTANCES=6, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"))
    settle(h, 120, 6)
    old = configs(h)
    h.cloud.image = "img-2"  # the operator changed the settings' image
    answer = h.ctl("refresh", action="start", warmup=10.0, reason="release 2")
    assert "6 instance(s) to replace" in answer["message"]
    floor = math.floor(6 * 0.9)
    run_watching(h, 600, floor, h.cfg.max_instances)  # draining and terminating ones bill too
    r = refresh_state(h)
    assert r["state"] == "successful" and r["percent"] == 100.0, r
    assert configs(h).isdisjoint(old) and len(h.cloud.billable()) == 6
    acts = activities(h)
    assert any(a["action"] == "refresh-start" and "release 2" in a["reason"] and "tester" in a["reason"] for a in acts)
    assert sum(1 for a in acts if a["action"] == "replace" and "refresh" in a["reason"]) == 6
    assert h.cloud.violations == []  # among them: never terminated in service without draining


def test_refresh_with_max_healthy_launches_first_and_never_drops_below_desired(harness):
    h = harness(HELIX_MIN_INSTANCES=4)
    settle(h, 120, 4)
    h.cloud.image = "img-2"
    h.ctl("refresh", action="start", min_healthy=100.0, max_healthy=150.0, warmup=5.0)
    seen = run_watching(h, 600, 4, h.cfg.max_instances)
    assert max(seen) > 4, "launched first"
    assert refresh_state(h)["state"] == "successful"
    assert len(h.cloud.billable()) == 4 and configs(h) == {h.provider.launch_config().digest}


def test_a_surge_stays_within_max_unless_allowed(harness):
    h = harness(HELIX_MIN_INSTANCES=4, HELIX_MAX_INSTANCES=4)
    settle(h, 120, 4)
    h.cloud.image = "img-2"
    h.ctl("refresh", action="start", min_healthy=75.0, max_healthy=200.0, warmup=5.0)
    run_watching(h, 500, 3, 4)
    assert refresh_state(h)["state"] == "successful"


def test_a_failing_release_rolls_back_and_stays_pinned(harness, tmp_path):
    h = harness(HELIX_MIN_INSTANCES=4, HELIX_BREAKER_FAILURES=2, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"))
    settle(h, 120, 4)
    good = h.provider.launch_config()
    h.cloud.image = "img-bad"
    h.cloud.bad_images.add("img-bad")
    h.ctl("refresh", action="start", warmup=5.0)
    h.run_until(1500)
    r = refresh_state(h)
    assert r["state"] == "rolled-back", r
    assert configs(h) == {good.digest} and serving(h) == 4
    assert any(a["action"] == "refresh" and "rolling back" in a["reason"] for a in activities(h))
    # The settings still name the bad image: new launches keep the one rolled back to.
    victim = sorted(h.cloud.billable(), key=lambda i: i.instance_id)[0]
    victim.agent_dead = True
    h.run_until(h.now + 200)
    assert configs(h) == {good.digest} and serving(h) == 4


def test_a_refresh_survives_a_controller_restart_and_pauses_at_checkpoints(harness):
    h = harness(HELIX_MIN_INSTANCES=4)
    settle(h, 120, 4)
    h.cloud.image = "img-2"
    h.ctl("refresh", action="start", warmup=5.0, checkpoints=[50.0], checkpoint_delay=3600.0)
    while refresh_state(h)["state"] != "checkpoint":
        assert h.now < 600
        h.step()
        h.now += 1
    at = refresh_state(h)["percent"]
    assert at >= 50
    h.restart_controller()
    h.run_until(h.now + 300)
    r = refresh_state(h)
    assert r["state"] == "checkpoint" and r["percent"] == at, "paused across the restart"
    h.now += 3600
    h.run_until(h.now + 300)
    assert refresh_state(h)["state"] == "successful"
    assert configs(h) == {h.provider.launch_config().digest}


def test_refresh_cancel_and_rollback_by_hand(harness):
    h = harness(HELIX_MIN_INSTANCES=4)
    settle(h, 120, 4)
    with pytest.raises(CtlError, match="no"):
        h.ctl("refresh", action="cancel")
    h.cloud.image = "img-2"
    h.ctl("refresh", action="start", warmup=5.0)
    with pytest.raises(CtlError, match="cancel it first"):
        h.ctl("refresh", action="start")
    h.run_until(h.now + 40)
    h.ctl("refresh", action="rollback", reason="looks wrong")
    assert refresh_state(h)["state"] == "rolling-back"
    h.run_until(h.now + 600)
    assert refresh_state(h)["state"] == "rolled-back"
    assert len(configs(h)) == 1 and configs(h) != {h.provider.launch_config().digest}


def test_nothing_to_replace_ends_at_once(harness):
    h = harness(HELIX_MIN_INSTANCES=2)
    settle(h, 90, 2)
    h.ctl("refresh", action="start")
    h.run_until(h.now + 3)
    assert refresh_state(h)["state"] == "successful"
    launched = h.cloud.launches
    h.ctl("refresh", action="start", skip_matching=False, warmup=5.0)  # replace them anyway
    h.run_until(h.now + 300)
    assert refresh_state(h)["state"] == "successful" and h.cloud.launches == launched + 2


# -- max instance lifetime -------------------------------------------------------------------------


def test_instances_older_than_the_lifetime_are_replaced_gradually(harness, tmp_path):
    h = harness(HELIX_MIN_INSTANCES=5, HELIX_MAX_INSTANCE_LIFETIME=600, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"))
    settle(h, 120, 5)
    first = {i.instance_id for i in h.cloud.billable()}
    run_watching(h, 1000, 4, 6)
    assert first.isdisjoint(i.instance_id for i in h.cloud.billable())
    assert all(h.now - i.launched_at <= 600 for i in h.cloud.billable())
    assert any(a["action"] == "lifetime" for a in activities(h))


# -- overrides, suspended processes, schedules ----------------------------------------------------


def test_an_override_pins_desired_then_expires(harness, tmp_path):
    h = harness(HELIX_MIN_INSTANCES=2, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"))
    settle(h, 90, 2)
    h.ctl("set-capacity", desired=5, reason="incident 7", **{"for": 120.0})
    assert h.ctl("status")["bounds"] == {"min": 2, "max": 8, "desired": 5, "source": "override by tester"}
    h.run_until(h.now + 60)
    assert len(h.cloud.billable()) == 5
    h.restart_controller()  # persisted
    assert h.ctl("status")["override"]["desired"] == 5
    h.run_until(h.now + 300)  # expired; the scale-in window then lets it go back
    assert h.ctl("status")["override"] is None
    assert len(h.cloud.billable()) == 2
    actions = [a["action"] for a in activities(h)]
    assert "set-capacity" in actions and "override-expired" in actions


def test_an_override_may_raise_max_only_by_saying_so(harness):
    h = harness(HELIX_MIN_INSTANCES=2, HELIX_MAX_INSTANCES=4)
    settle(h, 90, 2)
    with pytest.raises(CtlError, match=r"--desired=6: expected at most the max in force, 4 \(raise it with --max\)"):
        h.ctl("set-capacity", desired=6)
    with pytest.raises(CtlError, match="--min=5"):
        h.ctl("set-capacity", min=5)
    assert h.ctl("status")["override"] is None, "a refused request changes nothing"
    h.cloud.max_instances = 6  # the harness's own budget check follows the raised max
    h.ctl("set-capacity", max=6, desired=6)
    h.run_until(h.now + 60)
    assert len(h.cloud.billable()) == 6
    h.ctl("set-capacity", clear=True)
    with pytest.raises(CtlError, match="no capacity override"):
        h.ctl("set-capacity", clear=True)
    h.run_until(h.now + 200)
    assert len(h.cloud.billable()) == 2


def test_suspended_launch_and_terminate_hold_until_resumed(harness):
    h = harness(HELIX_MIN_INSTANCES=3)
    settle(h, 90, 3)
    h.ctl("suspend", processes=["launch", "replace-unhealthy"], reason="incident")
    victim = sorted(h.cloud.billable(), key=lambda i: i.instance_id)[0]
    victim.agent_dead = True
    launched = h.cloud.launches
    h.run_until(h.now + 120)
    assert h.cloud.launches == launched, "nothing launched while launch is suspended"
    assert victim.state == "running", "not replaced while replace-unhealthy is suspended"
    h.ctl("resume", processes=["all"])
    h.run_until(h.now + 120)
    assert victim.state in ("terminating", "gone") and serving(h) == 3
    h.ctl("suspend", processes=["terminate"])
    h.ctl("set-capacity", max=2)
    h.run_until(h.now + 60)
    assert len(h.cloud.billable()) == 3, "nothing terminated while terminate is suspended"
    h.ctl("resume", processes=["terminate"])
    h.run_until(h.now + 60)
    assert len(h.cloud.billable()) == 2


def test_suspended_scale_in_keeps_the_fleet(harness):
    h = harness(HELIX_MIN_INSTANCES=2)
    settle(h, 90, 2)
    h.ctl("set-capacity", desired=5, **{"for": 60.0})
    h.run_until(h.now + 50)
    h.ctl("suspend", processes=["scale-in"])
    h.run_until(h.now + 300)
    assert len(h.cloud.billable()) == 5
    h.ctl("resume", processes=["scale-in"])
    h.run_until(h.now + 200)
    assert len(h.cloud.billable()) == 2


def test_a_schedule_fires_and_ends(harness, tmp_path):
    # The simulated clock starts at the epoch: 1970-01-01 00:00 UTC.
    h = harness(
        HELIX_MIN_INSTANCES=2,
        HELIX_SCHEDULE="morning cron='5 0 * * *' min=4 for=10m",
        HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"),
    )
    assert h.ctl("status")["next_scheduled"]["name"] == "morning"
    settle(h, 290, 2)
    h.run_until(400)
    assert len(h.cloud.billable()) == 4 and h.ctl("status")["bounds"]["source"] == "schedule 'morning'"
    h.run_until(1200)
    # The min is 2 again; the policy, which had no reason to scale out, lets the extra ones go.
    assert h.ctl("status")["bounds"]["source"] == "settings" and len(h.cloud.billable()) < 4
    assert any(a["action"] == "bounds" and "morning" in a["reason"] for a in activities(h))


def test_operator_control_under_random_faults(harness):
    """The invariants hold while an operator refreshes, overrides and suspends amid faults."""
    h = harness(HELIX_MIN_INSTANCES=3)
    faults = [
        Fault(30, "refresh", value=2),
        Fault(60, "agent_dies"),
        Fault(90, "override", 60, value=7),
        Fault(100, "lost_reply"),
        Fault(120, "suspend", 40, value=1),
        Fault(150, "restart"),
        Fault(200, "refresh", value=1),  # a bad release while the first may still run
        Fault(260, "suspend", 30, value=5),
        Fault(300, "terminate_fail_once"),
    ]
    assert_clean(h.run(faults, faults_end=400, settle=1500))


# -- the rules, pure --------------------------------------------------------------------------------


def test_bounds_precedence():
    assert resolve_bounds(2, 10, None, None, 0) == Bounds(2, 10, None, "settings")
    night = Scheduled("night", None, 3, None)
    assert resolve_bounds(2, 10, night, None, 0) == Bounds(2, 3, None, "schedule 'night'")
    ov = Override(5, None, None, 100.0, "ann", "", 0.0)
    # The override's min wins over the schedule's max: the max meets it.
    assert resolve_bounds(2, 10, night, ov, 50) == Bounds(5, 5, None, "schedule 'night' + override by ann")
    assert resolve_bounds(2, 10, night, ov, 100) == Bounds(2, 3, None, "schedule 'night'"), "expired"
    pin = Override(None, None, 9, None, "bo", "", 0.0)
    assert resolve_bounds(2, 10, night, pin, 0).desired == 3, "a pin stays within the bounds"
    current = Bounds(2, 10, None, "settings")
    assert check_override(current, None, None, 11) == [
        "--desired=11: expected at most the max in force, 10 (raise it with --max)"
    ]
    assert check_override(current, None, 12, 11) == []
    assert check_override(current, 1, None, 0) == ["--desired=0: expected at least the min in force, 1"]


def test_scheduled_actions_added_with_helix_ctl_fire_and_survive_a_restart(harness, tmp_path):
    h = harness(
        HELIX_MIN_INSTANCES=2,
        HELIX_SCHEDULE="base cron='0 3 * * *' min=2",
        HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"),
    )
    with pytest.raises(CtlError, match="spec="):
        h.ctl("schedule", action="add", spec="bad cron='61 * * * *' min=3")
    with pytest.raises(CtlError, match="name='base': expected a name no scheduled action has yet"):
        h.ctl("schedule", action="add", spec="base cron='5 0 * * *' min=3")
    h.ctl("schedule", action="add", spec="peak cron='5 0 * * *' for=5m min=3", reason="expected peak")
    h.restart_controller()
    listed = {a["name"]: a for a in h.ctl("schedule", action="list")["actions"]}
    assert (
        listed["peak"]["source"] == "ctl" and listed["peak"]["next"] == 300.0 and listed["base"]["source"] == "settings"
    )
    settle(h, 290, 2)
    h.run_until(360)
    assert len(h.cloud.billable()) == 3 and h.ctl("status")["bounds"]["source"] == "schedule 'peak'"
    with pytest.raises(CtlError, match="in HELIX_SCHEDULE"):
        h.ctl("schedule", action="remove", name="base")
    h.ctl("schedule", action="remove", name="peak")
    # Without `for`, base (fired yesterday at 03:00) lasts until the next fire of any action.
    assert h.ctl("status")["bounds"]["source"] == "schedule 'base'"
    assert [a["action"] for a in activities(h) if a["action"].startswith("schedule-")] == [
        "schedule-add",
        "schedule-remove",
    ]
