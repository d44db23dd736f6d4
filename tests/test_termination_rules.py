"""Whom a scale-in terminates, rule by rule (controller_asg/termination.py): protection, zone
balance kept across a multi-instance scale-in, then the termination policy within the zone.
Real records (ProviderInstance, InstanceRow); the function is pure."""

from __future__ import annotations

from collections import Counter

import pytest

from controller_asg.fleet import FleetMember
from controller_asg.providers.base import ProviderInstance
from controller_asg.termination import choose_victims
from shared.table import InstanceRow, Lifecycle, State

NOW = 50_000.0


def member(
    i: str, zone: str = "a", launched: float = NOW - 1000, cpu: float | None = 0.5, protected: bool = False
) -> FleetMember:
    """cpu None: no row yet (a pending launch); else a HEALTHY row with metrics."""
    row = (
        None
        if cpu is None
        else InstanceRow(
            i,
            "127.0.0.1:1",
            State.HEALTHY,
            registered_at=launched + 5,
            last_seen=NOW,
            last_metrics=NOW,
            cpu=cpu,
            lifecycle=Lifecycle.IN_SERVICE,
        )
    )
    return FleetMember(ProviderInstance(i, zone, launched, "running", protected), row)


def ids(victims: list[FleetMember]) -> list[str]:
    return [m.instance_id for m in victims]


def zones_left(members: list[FleetMember], victims: list[FleetMember]) -> Counter:
    gone = {m.instance_id for m in victims}
    return Counter(m.instance.zone for m in members if m.instance_id not in gone)


@pytest.mark.parametrize("policy", ["least-busy", "oldest", "newest"])
def test_a_multi_instance_scale_in_keeps_the_zones_balanced(policy):
    """Rule: each victim comes from the zone that has the most instances *after* the victims
    already chosen, so removing 3 of a:4 b:3 c:2 leaves a:2 b:2 c:2, not a:1 b:3 c:2."""
    ms = (
        [member(f"a{n}", "a", launched=NOW - 100 * n, cpu=0.1 * n) for n in range(1, 5)]
        + [member(f"b{n}", "b", launched=NOW - 110 * n, cpu=0.1 * n) for n in range(1, 4)]
        + [member(f"c{n}", "c", launched=NOW - 120 * n, cpu=0.1 * n) for n in range(1, 3)]
    )
    victims = choose_victims(ms, 3, policy)
    assert len(victims) == 3
    assert zones_left(ms, victims) == Counter({"a": 2, "b": 2, "c": 2})


def test_zone_ties_go_to_the_last_zone_name_then_alternate():
    """Rule: equal zones are broken by name (the greatest first), deterministically; then the
    counts, not the names, decide: a:2 b:2 minus 3 takes b, a, then b."""
    ms = [member("a1", "a"), member("a2", "a"), member("b1", "b"), member("b2", "b")]
    victims = choose_victims(ms, 3, "oldest")
    assert [m.instance.zone for m in victims] == ["b", "a", "b"]


def test_protected_instances_count_toward_balance_but_are_never_chosen():
    """Rule: a protected instance still weighs in its zone (a:3 with 2 protected is fuller than
    b:2), but only an unprotected one is ever a victim."""
    ms = [
        member("a1", "a", protected=True),
        member("a2", "a", protected=True),
        member("a3", "a"),
        member("b1", "b"),
        member("b2", "b"),
    ]
    assert ids(choose_victims(ms, 1, "least-busy")) == ["a3"]
    assert ids(choose_victims(ms, 2, "least-busy")) == ["a3", "b1"]
    everything = choose_victims(ms, 10, "least-busy")
    assert sorted(ids(everything)) == ["a3", "b1", "b2"]


def test_nothing_asked_nothing_chosen():
    """Rule: count 0 (or everything protected) chooses nobody."""
    ms = [member("a1"), member("a2", protected=True)]
    assert choose_victims(ms, 0, "least-busy") == []
    assert choose_victims([member("p", protected=True)], 3, "oldest") == []
    assert choose_victims([], 2, "newest") == []


# -- the termination policy within a zone: three different answers on one fleet -------------------

FLEET = [
    # id, launched, cpu: the newest is the busiest, the oldest is middling, the idlest is in between
    ("old", NOW - 3000, 0.5),
    ("idle", NOW - 2000, 0.05),
    ("new", NOW - 100, 0.9),
]


@pytest.mark.parametrize(
    "policy, first, order",
    [
        ("least-busy", "idle", ["idle", "old", "new"]),
        ("oldest", "old", ["old", "idle", "new"]),
        ("newest", "new", ["new", "idle", "old"]),
    ],
)
def test_each_termination_policy_picks_its_own_victim(policy, first, order):
    """Rule: `least-busy` takes the lowest CPU, `oldest` the earliest launch, `newest` the latest;
    on this fleet the three answers all differ."""
    ms = [member(i, "a", launched=t, cpu=c) for i, t, c in FLEET]
    assert ids(choose_victims(ms, 1, policy)) == [first]
    assert ids(choose_victims(ms, 3, policy)) == order


def test_least_busy_ties_go_to_the_newest_and_no_metrics_counts_as_idle():
    """Rule: `least-busy` counts an instance without metrics (a pending launch) as idle (0.0) and,
    among equally busy instances, takes the newest first, then the lowest id."""
    ms = [
        member("old-idle", launched=NOW - 900, cpu=0.0),
        member("pending", launched=NOW - 10, cpu=None),
        member("mid-idle", launched=NOW - 500, cpu=0.0),
        member("busy", launched=NOW - 5, cpu=0.7),
    ]
    assert ids(choose_victims(ms, 4, "least-busy")) == ["pending", "mid-idle", "old-idle", "busy"]
    twins = [member("i-2", launched=NOW - 50, cpu=0.25), member("i-1", launched=NOW - 50, cpu=0.25)]
    assert ids(choose_victims(twins, 1, "least-busy")) == ["i-1"]


@pytest.mark.parametrize("policy", ["oldest", "newest"])
def test_launch_time_ties_go_to_the_lowest_id(policy):
    """Rule: instances launched at the same second are ordered by id, for both age policies."""
    ms = [member("i-b", launched=NOW - 60), member("i-c", launched=NOW - 60), member("i-a", launched=NOW - 60)]
    assert ids(choose_victims(ms, 3, policy)) == ["i-a", "i-b", "i-c"]
