"""The pure rules of the act path, one by one: the launch budget, the churn breaker, the planners,
the health grace, and the host lock. Boundaries are pinned at and around every limit."""

from __future__ import annotations

import os

import pytest

from controller_asg.breaker import BACKOFF_BASE, BACKOFF_CAP, SLOT_EXPIRY, ChurnBreaker, Slot, backoff
from controller_asg.fleet import FleetMember, build_fleet, grace_expired
from controller_asg.gate import Budget, Intent, valid_token
from controller_asg.health import plan_replacements
from controller_asg.hostlock import HostLock, HostLockHeld
from controller_asg.plan import ActionKind, plan_frozen, plan_live
from controller_asg.policy.base import Decision
from controller_asg.providers.base import ProviderInstance
from shared.table import InstanceRow, Lifecycle, State

NOW = 10_000.0


def inst(
    i: str,
    state: str = "running",
    token: str = "",
    launched: float = NOW - 1000,
    zone: str = "a",
    protected: bool = False,
) -> ProviderInstance:
    return ProviderInstance(i, zone, launched, state, protected, launch_token=token)


def row(i: str, state: State = State.HEALTHY, cpu: float = 0.5, failures: int = 0, app_down: int = 0) -> InstanceRow:
    return InstanceRow(
        i,
        "127.0.0.1:1",
        state,
        registered_at=NOW - 500,
        last_seen=NOW - 0.5,
        last_metrics=NOW - 0.5,
        cpu=cpu,
        failures=failures,
        app_down_polls=app_down,
        lifecycle=Lifecycle.NONE if state == State.REGISTERING else Lifecycle.IN_SERVICE,
    )


class Snap:
    def __init__(self, rows):
        self._rows = rows

    def instances(self):
        return list(self._rows)


# -- the launch budget -----------------------------------------------------------------------------


def test_budget_counts_listed_terminating_unlisted_and_in_doubt():
    listed = [inst("a"), inst("b", state="terminating"), inst("c", token="t1")]
    budget = Budget.build(
        10, listed, recent={"c": "t1", "d": "t1"}, intents=[Intent("t1", 4, "x"), Intent("t2", 2, "y")]
    )
    assert budget.listed == 3  # the terminating one may still be billed
    assert budget.unlisted == 1  # d: answered, not listed yet; c is listed already
    assert budget.in_doubt == {"t1": 2, "t2": 2}  # t1 asked 4, two of them are seen (c, d)
    assert budget.billable == 3 + 1 + 4
    assert budget.room == 2


def test_budget_allows_up_to_max_and_never_negative():
    budget = Budget(5, listed=3, unlisted=0, in_doubt={})
    assert [budget.allow(n) for n in (0, 1, 2, 3)] == [0, 1, 2, 2]
    full = Budget(5, listed=7, unlisted=0, in_doubt={})
    assert full.room == 0 and full.allow(3) == 0


def test_a_resumed_intent_is_checked_afresh_without_its_own_doubt():
    budget = Budget(10, listed=5, unlisted=0, in_doubt={"t": 8})  # billable 13
    assert budget.allow(8, "t") == 5, "cut to what fits beside the other 5"
    assert budget.allow(8) == 0, "a fresh launch sees the doubt as billed"
    fits = Budget(10, listed=2, unlisted=0, in_doubt={"t": 3, "u": 1})
    assert fits.allow(3, "t") == 3
    assert fits.allow(9, "t") == 7


@pytest.mark.parametrize(
    ("token", "ok"),
    [
        ("grp-" + "0" * 20, True),
        ("grp-" + "abcdef0123" * 2, True),
        ("grp-" + "0" * 19, False),
        ("grp-" + "0" * 21, False),
        ("grp-" + "G" * 20, False),
        ("other-" + "0" * 20, False),
        (None, False),
        (7, False),
    ],
)
def test_token_shape(token, ok):
    assert valid_token(token, "grp") is ok


# -- the churn breaker -----------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_up_to_the_cap():
    assert backoff(0) == 0 and backoff(-1) == 0
    assert backoff(1) == BACKOFF_BASE and backoff(2) == 2 * BACKOFF_BASE and backoff(3) == 4 * BACKOFF_BASE
    assert backoff(7) == BACKOFF_CAP and backoff(100) == BACKOFF_CAP
    assert backoff(6) == min(BACKOFF_CAP, 32 * BACKOFF_BASE)


def test_a_launch_fails_only_after_its_grace_and_succeeds_when_healthy():
    b = ChurnBreaker(threshold=3)
    b.launched([("i1", 100.0), ("i2", 100.0)], 100.0)
    assert b.observe(set(), {"i1", "i2"}, 130.0, grace=30) == []  # exactly at the end of the grace: not yet
    events = b.observe({"i2"}, {"i1", "i2"}, 130.5, grace=30)
    assert [e.kind for e in events] == ["failed", "healthy"] and b.consecutive == 0  # i2's success resets
    assert b.watched == {}


def test_grace_counts_from_a_later_start():
    b = ChurnBreaker()
    b.launched([("i1", 100.0)], 100.0)
    assert b.observe(set(), {"i1"}, 150.0, grace=30, grace_from=140.0) == []
    assert [e.kind for e in b.observe(set(), {"i1"}, 170.5, grace=30, grace_from=140.0)] == ["failed"]


def test_a_launch_that_vanishes_before_it_was_healthy_failed_and_one_we_terminate_did_not():
    b = ChurnBreaker()
    b.launched([("gone", 0.0), ("mine", 0.0)], 0.0)
    b.forget("mine")
    events = b.observe(set(), set(), 1.0, grace=30)
    assert [(e.kind, e.instance_id) for e in events] == [("failed", "gone")]


def test_trips_at_exactly_the_threshold_of_consecutive_failures():
    b = ChurnBreaker(threshold=3, window=100)
    for n, t in enumerate((0.0, 50.0, 100.0), 1):
        b.launched([(f"i{n}", t)], t)
        events = b.observe(set(), set(), t + 1, grace=30)
        assert b.tripped is (n == 3), n
    assert events[-1].kind == "tripped" and "3 launches in a row" in events[-1].message


def test_a_failure_older_than_the_window_starts_a_new_streak():
    for second_at, tripped in ((101.0, True), (101.5, False)):  # 100 s after the first failure, then 100.5 s
        b = ChurnBreaker(threshold=2, window=100)
        b.launched([("a", 0.0)], 0.0)
        b.observe(set(), set(), 1.0, grace=30)
        b.launched([("b", second_at)], second_at)
        b.observe(set(), set(), second_at, grace=30)
        assert b.tripped is tripped and b.consecutive == (2 if tripped else 1), second_at


def test_slots_of_failed_launches_back_off_and_pass_their_depth_on():
    b = ChurnBreaker(threshold=10)
    b.launched([("a", 0.0)], 0.0)
    b.observe(set(), set(), 5.0, grace=30)  # failed: a slot of depth 1, refilled after backoff(1)
    assert b.slots == [Slot(1, 5.0 + backoff(1))]
    assert b.allowed(3, 5.0 + backoff(1) - 0.5)[0] == 2, "the slot holds one launch back; real scale-out goes"
    assert b.allowed(1, 5.0 + backoff(1) - 0.5) == (0, b.allowed(1, 5.0 + backoff(1) - 0.5)[1])
    assert b.allowed(3, 5.0 + backoff(1))[0] == 3, "due: it may be refilled"
    b.launched([("b", 20.0), ("c", 20.0)], 20.0)
    assert (b.watched["b"].depth, b.watched["c"].depth) == (1, 0), "the first refills the slot, the second is new"
    b.observe(set(), set(), 21.0, grace=30)
    assert sorted(s.depth for s in b.slots) == [1, 2]
    assert max(s.not_before for s in b.slots) == 21.0 + backoff(2)


def test_old_slots_expire():
    b = ChurnBreaker(threshold=10, slots=[Slot(1, 0.0)])
    b.observe(set(), set(), SLOT_EXPIRY - 1, grace=30)
    assert b.slots
    b.observe(set(), set(), SLOT_EXPIRY, grace=30)
    assert b.slots == []


def test_tripped_allows_one_probe_at_a_time_after_the_back_off():
    b = ChurnBreaker(threshold=2, consecutive=2, tripped=True, last_failure_at=100.0)
    wait = backoff(2)
    assert b.allowed(5, 100.0 + wait - 1)[0] == 0
    assert b.allowed(5, 100.0 + wait) == (1, "churn breaker tripped: one probe launch")
    assert b.allowed(0, 100.0 + wait)[0] == 0
    b.launched([("probe", 200.0)], 200.0)
    assert b.allowed(5, 10_000.0)[0] == 0, "a probe is still being judged"
    events = b.observe({"probe"}, {"probe"}, 201.0, grace=30)
    assert [e.kind for e in events] == ["healthy", "closed"] and not b.tripped and b.slots == []
    assert b.allowed(5, 202.0) == (5, "")


def test_reset_closes_and_says_so_only_when_tripped():
    b = ChurnBreaker(consecutive=4, tripped=True, slots=[Slot(2, 1e9)])
    assert [e.kind for e in b.reset(1.0, "ops")] == ["closed"]
    assert not b.tripped and b.consecutive == 0 and b.slots == []
    assert b.reset(2.0, "ops") == []


def test_breaker_state_round_trips_and_a_bad_one_restores_closed():
    b = ChurnBreaker(consecutive=3, tripped=True, last_failure_at=5.0, tripped_at=4.0, slots=[Slot(2, 9.0)])
    b.launched([("x", 1.0)], 1.0)
    again = ChurnBreaker.from_state(b.export_state(), 3, 1800)
    assert again == b
    assert ChurnBreaker.from_state({"consecutive": "many"}, 3, 1800) == ChurnBreaker(3, 1800)
    assert ChurnBreaker.from_state({"watched": {"x": {}}}, 3, 1800).watched == {}


# -- health grace ----------------------------------------------------------------------------------


def health(rows, instances, *, grace=30.0, desired=10, in_flight=0, monitor_started=0.0, fraction=0.45, skip=()):
    fleet = build_fleet(Snap(rows), instances, NOW)
    return plan_replacements(
        fleet,
        grace=grace,
        app_down_after=3,
        desired=desired,
        in_flight=in_flight,
        max_unhealthy_fraction=fraction,
        monitor_started_at=monitor_started,
        skip=skip,
    )


@pytest.mark.parametrize("state", [State.APP_DOWN, State.UNHEALTHY])
def test_no_replacement_inside_the_grace_whatever_the_row_says(state):
    """Was: an app that needed 20 s after its agent was replaced ~3 s after registering."""
    sick = row("s", state, failures=5, app_down=9)
    healthy = [row(f"h{i}") for i in range(9)]
    others = [inst(f"h{i}") for i in range(9)]
    assert health([sick, *healthy], [inst("s", launched=NOW - 30), *others]).replace == ()  # exactly 30 s
    assert [r.instance_id for r in health([sick, *healthy], [inst("s", launched=NOW - 30.5), *others]).replace] == ["s"]
    # MonitorS's restart starts the grace again
    assert health([sick, *healthy], [inst("s"), *others], monitor_started=NOW - 10).replace == ()


def test_grace_expired_boundary():
    member = FleetMember(inst("x", launched=100.0), None)
    assert not grace_expired(member, 130.0, 30.0, 0.0)
    assert grace_expired(member, 130.001, 30.0, 0.0)
    assert not grace_expired(member, 150.0, 30.0, 125.0)


def test_more_in_flight_than_the_cap_replaces_nothing():
    rows = [row(f"s{i}", State.UNHEALTHY) for i in range(3)] + [row(f"h{i}") for i in range(17)]
    insts = [inst(r.instance_id) for r in rows]
    assert len(health(rows, insts, desired=20, in_flight=1).replace) == 1
    assert health(rows, insts, desired=20, in_flight=3).replace == ()
    assert health(rows, insts, desired=20, in_flight=9).replace == ()


def test_the_mass_failure_guard_needs_two_sick():
    one = [row("s0", State.UNHEALTHY)] + [row("h0")]  # 1 of 2 sick: 50% > 45%, but only one
    p = health(one, [inst("s0"), inst("h0"), inst("unreg")], desired=40)
    assert len(p.replace) == 2 and "monitoring" not in p.note
    two = [row("s0", State.UNHEALTHY), row("s1", State.APP_DOWN, app_down=3), row("h0"), row("h1")]
    p = health(two, [inst(r.instance_id) for r in two], desired=40)
    assert len(p.replace) == 1 and "likely a monitoring or network fault" in p.note
    below = [row("s0", State.UNHEALTHY), row("s1", State.UNHEALTHY)] + [row(f"h{i}") for i in range(3)]
    assert len(health(below, [inst(r.instance_id) for r in below], desired=40).replace) == 2  # 40% < 45%


def test_skipped_instances_take_no_place_in_the_plan():
    rows = [row("s0", State.UNHEALTHY), row("s1", State.UNHEALTHY)] + [row(f"h{i}") for i in range(8)]
    p = health(rows, [inst(r.instance_id) for r in rows], desired=10, skip={"s0"})
    assert [r.instance_id for r in p.replace] == ["s1"] and p.candidates == 1


# -- fleet -----------------------------------------------------------------------------------------


def test_condemned_instances_are_billable_never_capacity_and_failed_launches_not_pending():
    fleet = build_fleet(
        Snap([row("ok")]),
        [inst("ok"), inst("doomed"), inst("young", launched=NOW - 5), inst("late", launched=NOW - 100)],
        NOW,
        condemned={"doomed"},
    )
    assert [m.instance_id for m in fleet.members] == ["ok", "late", "young"]  # by launch time
    assert [i.instance_id for i in fleet.terminating] == ["doomed"]
    obs = fleet.observation(warmup=0, poll_interval=1, grace=30, monitor_started_at=0)
    assert (obs.capacity, obs.in_service, obs.pending) == (3, 1, 1), "late missed its grace: not pending"
    assert fleet.observation(warmup=0, poll_interval=1).pending == 2, "no grace given: every launch pends"


# -- the planners ----------------------------------------------------------------------------------


def fleet_of(*ids, rows=None):
    return build_fleet(Snap(rows if rows is not None else [row(i) for i in ids]), [inst(i) for i in ids], NOW)


def test_a_replacement_is_a_terminate_then_its_launch_then_the_policys_delta():
    f = fleet_of("a", "b", "c", rows=[row("a"), row("b"), row("c", State.UNHEALTHY)])
    h = health(f.members and [row("a"), row("b"), row("c", State.UNHEALTHY)], [inst("a"), inst("b"), inst("c")])
    p = plan_live(f, Decision(5, "more"), h, termination_policy="oldest")
    assert [(a.kind, a.count, a.instance_ids, a.replaces) for a in p.actions] == [
        (ActionKind.REPLACE, 1, ("c",), ""),
        (ActionKind.LAUNCH, 1, (), "c"),
        (ActionKind.LAUNCH, 2, (), ""),
    ]
    assert p.action == "launch" and p.desired == 5


def test_scale_in_never_takes_an_instance_being_replaced():
    f = fleet_of("a", "b", "c", rows=[row("a"), row("b"), row("c", State.UNHEALTHY)])
    h = health([row("a"), row("b"), row("c", State.UNHEALTHY)], [inst("a"), inst("b"), inst("c")])
    p = plan_live(f, Decision(2, "less"), h, termination_policy="oldest")
    terminate = [a for a in p.actions if a.kind == ActionKind.TERMINATE]
    assert len(terminate) == 1 and "c" not in terminate[0].instance_ids


def test_only_replacements_say_replace():
    f = fleet_of("a", "b", rows=[row("a"), row("b", State.UNHEALTHY)])
    h = health([row("a"), row("b", State.UNHEALTHY)], [inst("a"), inst("b")])
    assert plan_live(f, Decision(2, "same"), h, termination_policy="oldest").action == "replace"
    assert (
        plan_live(
            fleet_of("a"), Decision(1, "same"), health([row("a")], [inst("a")]), termination_policy="oldest"
        ).action
        == "hold"
    )


def test_tripped_breaker_terminates_failed_launches_without_replacing_them():
    rows = [row("a"), row("b", State.APP_DOWN, app_down=5)]
    f = build_fleet(Snap(rows), [inst("a"), inst("b"), inst("dead")], NOW)
    h = health(rows, [inst("a"), inst("b"), inst("dead")], desired=30)
    p = plan_live(f, Decision(3, "keep"), h, termination_policy="oldest", breaker="tripped", ever_healthy={"a"})
    kinds = [(a.kind, a.instance_ids, a.count) for a in p.actions]
    assert (ActionKind.REPLACE, ("b",), 1) in kinds and (ActionKind.REPLACE, ("dead",), 1) in kinds
    assert [a for a in p.actions if a.kind == ActionKind.LAUNCH] == [
        a for a in p.actions if a.kind == ActionKind.LAUNCH and a.count == 2 and not a.replaces
    ]
    once = plan_live(
        f,
        Decision(3, "keep"),
        health(rows, [inst("a"), inst("b"), inst("dead")], desired=3, skip={"b"}),
        termination_policy="oldest",
        breaker="tripped",
        ever_healthy={"a", "b"},
    )
    assert any("b not replaced until the next probe" in n for n in once.notes)
    assert all("b" not in a.instance_ids for a in once.actions)


def test_a_due_probe_replaces_one_instance_as_usual():
    rows = [row("a", State.UNHEALTHY), row("b", State.UNHEALTHY)] + [row(f"h{i}") for i in range(20)]
    ids = [r.instance_id for r in rows]
    f = build_fleet(Snap(rows), [inst(i) for i in ids], NOW)
    h = health(rows, [inst(i) for i in ids], desired=22)
    assert len(h.replace) == 2
    p = plan_live(f, Decision(22, "keep"), h, termination_policy="oldest", breaker="probe")
    assert [(a.kind, a.replaces) for a in p.actions] == [(ActionKind.REPLACE, ""), (ActionKind.LAUNCH, "a")]


def test_protected_instances_leave_a_note():
    f = build_fleet(Snap([row("a"), row("b")]), [inst("a", protected=True), inst("b")], NOW)
    p = plan_live(
        f, Decision(0, "idle"), health([row("a"), row("b")], [inst("a"), inst("b")]), termination_policy="oldest"
    )
    assert p.actions[0].instance_ids == ("b",)
    assert any("want 2 fewer instances but only 1 are unprotected" in n for n in p.notes)


def test_frozen_enforces_only_min_and_max():
    two = fleet_of("a", "b")
    p = plan_frozen(two, min_instances=3, max_instances=5, termination_policy="oldest", why="MonitorS is down")
    assert [(a.kind, a.count) for a in p.actions] == [(ActionKind.LAUNCH, 1)] and p.desired == 3
    assert "below HELIX_MIN_INSTANCES=3 (MonitorS is down)" in p.actions[0].cause
    p = plan_frozen(two, min_instances=1, max_instances=1, termination_policy="oldest", why="x")
    assert [(a.kind, a.count) for a in p.actions] == [(ActionKind.TERMINATE, 1)] and p.desired == 1
    assert plan_frozen(two, min_instances=2, max_instances=2, termination_policy="oldest", why="x").actions == ()
    assert plan_frozen(two, min_instances=0, max_instances=9, termination_policy="oldest", why="x").action == "frozen"


# -- the host lock ---------------------------------------------------------------------------------


def test_the_host_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    first = HostLock(str(tmp_path), "g/1")
    first.acquire()
    assert first.may_act() == ""
    assert os.path.basename(first.path) == "g_1.lock"
    with pytest.raises(HostLockHeld, match=f"pid {os.getpid()}"):
        HostLock(str(tmp_path), "g/1").acquire()
    HostLock(str(tmp_path), "other").acquire()  # another group is another lock
    first.release()
    assert first.may_act() != ""
    again = HostLock(str(tmp_path), "g/1")
    again.acquire()
    again.release()


def test_a_tripped_breaker_still_refills_min_as_fast_as_the_slots_back_off():
    """Found by `make chaos`: a tripped breaker held the fleet at 0 with min 2 (an outage)."""
    b = ChurnBreaker(threshold=3, consecutive=3, tripped=True, last_failure_at=100.0, slots=[Slot(2, 150.0)])
    assert b.allowed(5, 120.0, below_min=2)[0] == 1, "one slot still backs off"
    assert b.allowed(5, 150.0, below_min=2) == (2, "churn breaker tripped: only refilling HELIX_MIN_INSTANCES (2 now)")
    assert b.allowed(1, 150.0, below_min=2)[0] == 1
    assert b.allowed(5, 120.0, below_min=0)[0] == 0, "above min: only the probe, after its back-off"
