"""The act path's rules, pinned where tests/test_cost_safety_rules.py leaves them loose: what the
launch budget counts, how the churn breaker judges and restores, what the planners and the health
rules say. The messages are pinned word for word: they are what the operator reads in the log and
in the activity history (an event names the instance, the reason, the streak and the back-off; the
trip says how to reset; an action's cause says why).

Fleets are built directly as `FleetView`s of real `FleetMember`s (the dataclasses the controller
builds from the table and the provider's list), so each test says exactly who is in the fleet and
in which order."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller_asg.breaker import SLOT_EXPIRY, BreakerEvent, ChurnBreaker, Slot, Watched
from controller_asg.fleet import FleetMember, FleetView
from controller_asg.gate import Budget, Intent, token_prefix, valid_token
from controller_asg.health import HealthPlan, Replacement, plan_replacements
from controller_asg.plan import Action, ActionKind, plan_frozen, plan_live
from controller_asg.policy.base import Decision
from controller_asg.providers.base import ProviderInstance
from shared.table import InstanceRow, Lifecycle, State

NOW = 10_000.0


def inst(i: str, *, token: str = "", launched: float = NOW - 1000, state: str = "running") -> ProviderInstance:
    return ProviderInstance(i, "a", launched, state, launch_token=token)


def member(
    i: str,
    state: State | None = State.HEALTHY,
    *,
    cpu: float = 0.5,
    launched: float = NOW - 1000,
    failures: int = 0,
    app_down: int = 0,
    detail: str = "",
) -> FleetMember:
    """`state` None: the agent never registered (no row)."""
    row = None
    if state is not None:
        row = InstanceRow(
            i,
            "127.0.0.1:1",
            state,
            app_detail=detail,
            registered_at=launched + 5,
            last_seen=NOW - 0.5,
            last_metrics=NOW - 0.5,
            cpu=cpu,
            failures=failures,
            app_down_polls=app_down,
            lifecycle=Lifecycle.NONE if state == State.REGISTERING else Lifecycle.IN_SERVICE,
        )
    return FleetMember(inst(i, launched=launched), row)


def fleet(*members: FleetMember) -> FleetView:
    return FleetView(NOW, tuple(members), (), ())


def health(f: FleetView, *, desired: int, in_flight: int = 0, fraction: float = 0.45, skip=()) -> HealthPlan:
    return plan_replacements(
        f,
        grace=30.0,
        app_down_after=3,
        desired=desired,
        in_flight=in_flight,
        max_unhealthy_fraction=fraction,
        monitor_started_at=0.0,
        skip=skip,
    )


# -- the launch budget -----------------------------------------------------------------------------


def test_the_token_prefix_keeps_the_first_24_characters_of_the_group():
    group = "g" * 30
    assert token_prefix(group) == "g" * 24 + "-"
    assert valid_token("g" * 24 + "-" + "0" * 20, group)
    assert not valid_token("g" * 25 + "-" + "0" * 20, group)


def test_listed_instances_answer_for_their_launch_token():
    """An intent in doubt is less in doubt by each instance the provider lists under its token,
    even with no launch reply on record (a restart lost it)."""
    listed = [inst("a", token="t1"), inst("b", token="t1"), inst("c", token="t2"), inst("d")]
    budget = Budget.build(10, listed, recent={}, intents=[Intent("t1", 3, "x"), Intent("t3", 2, "y")])
    assert budget.in_doubt == {"t1": 1, "t3": 2}
    assert (budget.listed, budget.unlisted, budget.billable) == (4, 0, 4 + 1 + 2)


def test_every_returned_instance_not_listed_yet_is_billable_and_answers_for_its_token():
    listed = [inst("a", token="t1")]
    recent = {"a": "t1", "b": "t1", "c": "t1", "d": "t2"}  # b, c, d: answered, not listed yet
    budget = Budget.build(10, listed, recent, intents=[Intent("t1", 5, "x"), Intent("t2", 1, "y")])
    assert budget.unlisted == 3
    assert budget.in_doubt == {"t1": 2, "t2": 0}, "t1 asked 5, 3 seen (a, b, c); t2 asked 1, d seen"
    assert budget.billable == 1 + 3 + 2


def test_an_intent_seen_in_full_or_beyond_is_no_longer_in_doubt():
    listed = [inst("a", token="t1"), inst("b", token="t1"), inst("c", token="t1")]
    budget = Budget.build(3, listed, recent={}, intents=[Intent("t1", 2, "x")])
    assert budget.in_doubt == {"t1": 0}
    assert budget.billable == 3 and budget.room == 0 and budget.allow(1) == 0
    assert budget.allow(1, "t1") == 0, "its own doubt is nothing: nothing to give back"


def test_a_token_not_in_doubt_frees_nothing():
    budget = Budget(5, listed=2, unlisted=0, in_doubt={"t": 2})  # billable 4
    assert budget.allow(3, "unknown") == budget.allow(3) == 1
    assert budget.allow(3, "t") == 3


# -- the churn breaker: what a launch refills ------------------------------------------------------


def test_launches_refill_the_slots_that_came_due_first_then_fresh_ones():
    b = ChurnBreaker(threshold=10, slots=[Slot(3, 50.0), Slot(1, 20.0), Slot(2, 80.0)])
    b.launched([("a", 60.0), ("b", 60.0), ("c", 60.0)], 60.0)
    assert {k: w.depth for k, w in b.watched.items()} == {"a": 1, "b": 3, "c": 0}
    assert b.slots == [Slot(2, 80.0)], "not due yet at 60: left for a later launch"


def test_a_slot_is_due_at_exactly_its_not_before():
    b = ChurnBreaker(threshold=10, slots=[Slot(2, 60.0)])
    b.launched([("a", 60.0)], 60.0)
    assert b.watched == {"a": Watched(60.0, 2)} and b.slots == []


def test_an_instance_already_watched_is_skipped_and_the_rest_still_counted():
    b = ChurnBreaker(threshold=10)
    b.launched([("a", 10.0)], 10.0)
    b.launched([("a", 50.0), ("b", 50.0)], 50.0)
    assert b.watched == {"a": Watched(10.0, 0), "b": Watched(50.0, 0)}


def test_the_launch_time_is_the_providers_when_known_and_never_later_than_now():
    b = ChurnBreaker(threshold=10)
    b.launched([("early", 90.0), ("unknown", 0.0), ("future", 150.0), ("first-second", 1.0)], 100.0)
    assert {k: w.launched_at for k, w in b.watched.items()} == {
        "early": 90.0,
        "unknown": 100.0,  # 0: the provider did not say
        "future": 100.0,  # a clock ahead of ours
        "first-second": 1.0,  # any positive time is a real one
    }


def test_forgetting_an_instance_never_watched_is_harmless():
    b = ChurnBreaker(threshold=10)
    b.launched([("a", 10.0)], 10.0)
    b.forget("never-watched")
    b.forget("a")
    b.forget("a")
    assert b.watched == {}


# -- the churn breaker: verdicts and what they say -------------------------------------------------


def test_without_grace_from_the_grace_counts_from_the_launch_alone():
    b = ChurnBreaker(threshold=10)
    b.launched([("i", 0.5)], 0.5)
    assert b.observe(set(), {"i"}, 30.5, grace=30) == []
    assert [e.kind for e in b.observe(set(), {"i"}, 30.75, grace=30)] == ["failed"]


def test_a_failed_launch_names_the_instance_the_reason_the_streak_and_the_back_off():
    b = ChurnBreaker(threshold=5)
    b.launched([("i-1", 100.0)], 100.0)
    assert b.observe(set(), {"i-1"}, 130.5, grace=30) == [
        BreakerEvent(
            "failed",
            "i-1",
            "launch i-1 failed: it was not healthy within 30s of launch (1 in a row; refilling its slot waits 10s)",
        )
    ]
    b.launched([("i-2", 141.0)], 141.0)  # refills i-1's slot (due at 140.5)
    assert b.observe(set(), set(), 150.0, grace=30) == [
        BreakerEvent(
            "failed",
            "i-2",
            "launch i-2 failed: it vanished before it was ever healthy (2 in a row; refilling its slot waits 20s)",
        )
    ]


def test_every_verdict_of_one_step_is_reported_in_order():
    b = ChurnBreaker(threshold=10)
    b.launched([("ok", 100.0), ("gone", 100.0), ("slow", 100.0)], 100.0)
    events = b.observe({"ok"}, {"ok", "slow"}, 131.0, grace=30)
    assert [(e.kind, e.instance_id) for e in events] == [("healthy", "ok"), ("failed", "gone"), ("failed", "slow")]
    assert events[0] == BreakerEvent("healthy", "ok", "launch ok became healthy")
    assert "it vanished before it was ever healthy (1 in a row;" in events[1].message
    assert "it was not healthy within 30s of launch (2 in a row;" in events[2].message
    assert b.watched == {}


def test_the_trip_names_the_streak_what_stops_and_how_to_reset():
    b = ChurnBreaker(threshold=2, window=100)
    b.launched([("i-1", 0.0), ("i-2", 0.0)], 0.0)
    events = b.observe(set(), {"i-1", "i-2"}, 31.0, grace=30)
    assert [(e.kind, e.instance_id) for e in events] == [("failed", "i-1"), ("failed", "i-2"), ("tripped", "i-2")]
    assert events[-1].message == (
        "CHURN BREAKER TRIPPED: 2 launches in a row never became healthy; no more scale-out or replacement "
        "launches, failed launches are terminated, healthy instances kept; one probe launch at a time with "
        "back-off; it closes when a launch becomes healthy or on `python -m controller_asg.breaker_cli reset`"
    )
    assert b.tripped and b.tripped_at == 31.0


def test_a_healthy_probe_closes_the_breaker_and_names_itself():
    b = ChurnBreaker(threshold=2, consecutive=2, tripped=True, last_failure_at=100.0)
    b.launched([("probe", 200.0)], 200.0)
    assert b.observe({"probe"}, {"probe"}, 210.0, grace=30) == [
        BreakerEvent("healthy", "probe", "launch probe became healthy"),
        BreakerEvent(
            "closed", "probe", "churn breaker closed: launch probe became healthy; launches and replacements resume"
        ),
    ]


def test_a_reset_names_who_and_no_instance():
    b = ChurnBreaker(consecutive=3, tripped=True)
    assert b.reset(5.0, "ops@host") == [
        BreakerEvent("closed", "", "churn breaker reset by ops@host: launches and replacements resume")
    ]


def test_slot_expiry_counts_from_when_the_slot_came_due():
    b = ChurnBreaker(threshold=10, slots=[Slot(1, 5000.0)])
    b.observe(set(), set(), 5000.0 + SLOT_EXPIRY - 1, grace=30)
    assert b.slots == [Slot(1, 5000.0)]
    b.observe(set(), set(), 5000.0 + SLOT_EXPIRY, grace=30)
    assert b.slots == []


# -- the churn breaker: what may go ----------------------------------------------------------------


def test_nothing_wanted_is_nothing_allowed_with_no_reason_and_one_is_one():
    assert ChurnBreaker().allowed(1, 0.0) == (1, "")
    assert ChurnBreaker().allowed(0, 0.0) == (0, "")
    assert ChurnBreaker().allowed(-2, 0.0) == (0, "")
    assert ChurnBreaker(tripped=True, consecutive=3).allowed(0, 0.0) == (0, "")


def test_a_tripped_breaker_says_a_probe_is_being_judged_or_when_the_next_one_goes():
    b = ChurnBreaker(threshold=2, consecutive=2, tripped=True, last_failure_at=100.0)  # backoff(2) = 20 s
    assert b.allowed(3, 105.0) == (0, "churn breaker tripped: next probe launch in 15s")
    b.launched([("probe", 120.0)], 120.0)
    assert b.allowed(3, 121.0) == (0, "churn breaker tripped: a probe launch is still being judged")


def test_the_back_off_reason_counts_blocked_slots_and_the_next_one_not_due_yet():
    b = ChurnBreaker(threshold=10, slots=[Slot(1, 100.0), Slot(3, 170.0), Slot(2, 140.0), Slot(1, 90.0)])
    assert b.allowed(5, 100.0) == (3, "2 slot(s) of failed launches back off (next in 40s)")
    assert b.allowed(1, 100.0) == (0, "2 slot(s) of failed launches back off (next in 40s)")


# -- the churn breaker: restoring its state --------------------------------------------------------


def saved() -> ChurnBreaker:
    return ChurnBreaker(
        threshold=5,
        window=60.0,
        consecutive=4,
        last_failure_at=50.0,
        tripped=True,
        tripped_at=40.0,
        watched={"p": Watched(60.0, 2)},
        slots=[Slot(3, 70.0), Slot(0, 80.0)],
    )


def test_a_restored_breaker_takes_threshold_and_window_from_the_config():
    state = saved().export_state()
    state["threshold"], state["window"] = 99, 1.0  # what was saved is not what is configured now
    assert ChurnBreaker.from_state(state, 5, 60.0) == saved()
    assert ChurnBreaker.from_state({"tripped": True, "slots": 7}, 5, 60.0) == ChurnBreaker(threshold=5, window=60.0)


@pytest.mark.parametrize(
    ("key", "default"),
    [
        ("consecutive", 0),
        ("last_failure_at", 0.0),
        ("tripped", False),
        ("tripped_at", 0.0),
        ("watched", {}),
        ("slots", []),
    ],
)
def test_a_state_missing_one_key_restores_that_key_as_new_and_keeps_the_rest(key, default):
    state = saved().export_state()
    del state[key]
    assert ChurnBreaker.from_state(state, 5, 60.0) == replace(saved(), **{key: default})


def test_restored_counts_are_never_negative_and_zero_stays_zero():
    state = saved().export_state()
    state["consecutive"] = 0
    state["slots"] = [{"depth": 0, "not_before": 1.0}, {"depth": -4, "not_before": 2.0}]
    state["watched"] = {"p": {"launched_at": 3.0, "depth": -1}}
    b = ChurnBreaker.from_state(state, 5, 60.0)
    assert (b.consecutive, b.slots, b.watched) == (0, [Slot(0, 1.0), Slot(0, 2.0)], {"p": Watched(3.0, 0)})
    state["consecutive"] = -3
    assert ChurnBreaker.from_state(state, 5, 60.0).consecutive == 0


# -- the planners ----------------------------------------------------------------------------------


UNHEALTHY_CAUSE = "MonitorS marks it unhealthy after 4 failed polls in a row"


def test_a_replacements_terminate_and_launch_carry_the_health_cause():
    f = fleet(member("a"), member("b"), member("c", State.UNHEALTHY, failures=4))
    h = health(f, desired=3)
    assert h.replace == (Replacement("c", UNHEALTHY_CAUSE),)
    p = plan_live(f, Decision(3, "steady"), h, termination_policy="oldest")
    assert p.actions == (
        Action(ActionKind.REPLACE, UNHEALTHY_CAUSE, 1, ("c",)),
        Action(ActionKind.LAUNCH, f"replacing c: {UNHEALTHY_CAUSE}", 1, replaces="c"),
    )
    assert (p.action, p.reason, p.notes) == ("replace", "steady", ())


def test_tripped_a_failed_launch_is_terminated_with_its_cause_and_the_policy_refills_its_place():
    f = fleet(member("a"), member("b"), member("c", State.UNHEALTHY, failures=4))
    h = health(f, desired=3)
    p = plan_live(f, Decision(3, "steady"), h, termination_policy="oldest", breaker="tripped")
    assert p.actions == (
        Action(
            ActionKind.REPLACE,
            f"{UNHEALTHY_CAUSE}; a failed launch, not replaced while the churn breaker is tripped",
            1,
            ("c",),
        ),
        Action(ActionKind.LAUNCH, "steady", 1),  # capacity 3 - 1 terminated: the gate holds it while tripped
    )
    assert p.action == "launch"


def test_the_health_note_is_a_plan_note():
    f = fleet(*[member(f"h{i}") for i in range(8)], member("s0", State.UNHEALTHY), member("s1", State.UNHEALTHY))
    h = health(f, desired=10)
    assert h.note == "2 need replacing, 0 replacement(s) in flight, at most 1 at a time"
    p = plan_live(f, Decision(10, "steady"), h, termination_policy="oldest")
    assert p.notes == ("health: 2 need replacing, 0 replacement(s) in flight, at most 1 at a time",)


def test_tripped_the_note_names_only_instances_healthy_once_and_not_healthy_now():
    f = fleet(
        member("a"),  # healthy once, healthy now: nothing to say
        member("c", State.UNHEALTHY),  # healthy once: held
        member("b", State.APP_DOWN, app_down=1),  # healthy once: held
        member("d", State.APP_DOWN, app_down=1),  # never healthy, not (yet) a failed launch
        member("e", None),  # healthy once, no row now
    )
    once = {"a", "b", "c", "e"}
    h = health(f, desired=5, skip=once)
    assert h.replace == ()
    p = plan_live(f, Decision(5, "steady"), h, termination_policy="oldest", breaker="tripped", ever_healthy=once)
    assert p.notes == (
        "churn breaker tripped: b, c not replaced until the next probe launch (healthy once; may recover)",
    )
    assert (p.actions, p.action) == ((), "hold")


def test_one_more_instance_is_a_launch_of_one():
    p = plan_live(fleet(member("a"), member("b")), Decision(3, "busy"), HealthPlan((), 0), termination_policy="oldest")
    assert (p.action, p.actions) == ("launch", (Action(ActionKind.LAUNCH, "busy", 1),))


@pytest.mark.parametrize(("policy", "victim"), [("oldest", "old"), ("newest", "new"), ("least-busy", "new")])
def test_scale_in_takes_the_policys_victim_and_says_terminate(policy, victim):
    f = fleet(member("old", cpu=0.9, launched=NOW - 2000), member("new", cpu=0.1, launched=NOW - 100))
    p = plan_live(f, Decision(1, "idle"), HealthPlan((), 0), termination_policy=policy)
    assert p.actions == (Action(ActionKind.TERMINATE, "idle", 1, (victim,)),)
    assert (p.action, p.notes) == ("terminate", ()), "exactly as many victims as wanted: no note"


def test_frozen_above_max_terminates_the_policys_victims_and_names_max():
    f = fleet(member("old", cpu=0.9, launched=NOW - 2000), member("new", cpu=0.1, launched=NOW - 100))
    p = plan_frozen(f, min_instances=0, max_instances=1, termination_policy="oldest", why="MonitorS is down")
    assert p.actions == (
        Action(ActionKind.TERMINATE, "2 instances, above HELIX_MAX_INSTANCES=1 (MonitorS is down)", 1, ("old",)),
    )
    assert (p.desired, p.action, p.reason) == (
        1,
        "frozen",
        "MonitorS is down: holding the fleet, only min/max enforced",
    )


# -- the health rules ------------------------------------------------------------------------------


def test_an_app_down_cause_gives_the_probes_detail_only_when_there_is_one():
    f = fleet(
        *[member(f"h{i}") for i in range(18)],
        member("d1", State.APP_DOWN, app_down=4, detail="connection refused"),
        member("d2", State.APP_DOWN, app_down=3),
    )
    h = health(f, desired=20)
    assert h.replace == (
        Replacement("d1", "its app has been down for 4 polls (connection refused)"),
        Replacement("d2", "its app has been down for 3 polls"),
    )
    assert (h.candidates, h.note) == (2, ""), "exactly as many as may go at once: nothing to explain"


def test_below_20_desired_one_replacement_at_a_time():
    f = fleet(*[member(f"h{i}") for i in range(8)], member("s0", State.UNHEALTHY), member("s1", State.UNHEALTHY))
    assert [r.instance_id for r in health(f, desired=19).replace] == ["s0"]
    assert [r.instance_id for r in health(f, desired=20).replace] == ["s0", "s1"]


def test_the_mass_failure_guard_acts_only_above_the_fraction_and_says_why():
    at = fleet(member("h0"), member("h1"), member("s0", State.UNHEALTHY), member("s1", State.UNHEALTHY))
    p = health(at, desired=40, fraction=0.5)  # 2 of 4: exactly 50%
    assert (len(p.replace), p.note) == (2, "")
    above = fleet(member("h0"), *[member(f"s{i}", State.UNHEALTHY) for i in range(3)])
    p = health(above, desired=40, fraction=0.5)
    assert [r.instance_id for r in p.replace] == ["s0"]
    assert p.note == (
        "3 of 4 in-service instances look unhealthy at once (more than 50%): likely a monitoring or network "
        "fault, replacing at most one per interval"
    )
