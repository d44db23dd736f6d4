"""What a policy sees of the fleet (controller_asg/fleet.py), rule by rule: the staleness window
(STALE_METRICS_INTERVALS poll intervals, at poll intervals other than 1 s), the warm-up boundary,
never-polled metrics, the CPU clamp. Rows go through a real metrics table in /dev/shm, as the
controller reads them."""

from __future__ import annotations

import pytest

from controller_asg.fleet import STALE_METRICS_INTERVALS, build_fleet
from controller_asg.providers.base import ProviderInstance
from shared.table import InstanceRow, Lifecycle, MetricsTable, State

NOW = 20_000.0


@pytest.fixture
def table(table_name):
    t = MetricsTable.open_or_create(table_name, 32)
    yield t
    t.close()


def put(
    table,
    i: str,
    *,
    state: State = State.HEALTHY,
    cpu: float = 0.5,
    metrics_age: float | None = 0.0,
    registered_age: float = 3600.0,
    now: float = NOW,
) -> ProviderInstance:
    """Register a row for `i` (metrics_age None: never polled for metrics) and return the
    provider's record of the same instance."""
    last_metrics = 0.0 if metrics_age is None else now - metrics_age
    table.register(
        InstanceRow(
            i,
            "127.0.0.1:1",
            state,
            registered_at=now - registered_age,
            last_seen=last_metrics,
            last_metrics=last_metrics,
            cpu=cpu,
            lifecycle=Lifecycle.NONE if state == State.REGISTERING else Lifecycle.IN_SERVICE,
        )
    )
    return ProviderInstance(i, "a", now - registered_age - 10, "running")


def observe(table, instances, *, now=NOW, warmup=0.0, poll_interval=1.0):
    fleet = build_fleet(table.snapshot(), instances, now)
    return fleet, fleet.observation(warmup=warmup, poll_interval=poll_interval)


def test_the_window_is_three_poll_intervals():
    """Rule: the constant itself: metrics go stale after 3 poll intervals."""
    assert STALE_METRICS_INTERVALS == 3.0


@pytest.mark.parametrize("poll_interval", [0.5, 2.0, 5.0])
def test_metrics_stay_fresh_for_exactly_three_poll_intervals(table, poll_interval):
    """Rule: metrics exactly 3 × poll_interval old still count; any older are missing. The window
    scales with the poll interval (a 1 s poll cannot tell 3 × 1 from 3 / 1)."""
    window = STALE_METRICS_INTERVALS * poll_interval
    insts = [
        put(table, "edge", cpu=0.25, metrics_age=window),
        put(table, "stale", cpu=0.75, metrics_age=window + 0.25),
        put(table, "recent", cpu=0.5, metrics_age=poll_interval),
    ]
    _, obs = observe(table, insts, poll_interval=poll_interval)
    assert sorted(obs.cpu_samples) == [0.25, 0.5]
    assert (obs.missing, obs.in_service, obs.warming) == (1, 3, 0)


def test_a_slow_poll_keeps_metrics_a_fast_poll_would_drop(table):
    """Rule: the same 4 s old metrics are fresh at a 2 s poll (window 6 s) and stale at 1 s (3 s)."""
    insts = [put(table, "i-1", cpu=0.5, metrics_age=4.0)]
    assert observe(table, insts, poll_interval=2.0)[1].cpu_samples == (0.5,)
    assert observe(table, insts, poll_interval=1.0)[1].missing == 1


def test_never_polled_metrics_are_missing_even_on_a_young_clock(table):
    """Rule: last_metrics 0 means "never": missing, even when the clock itself is so young that
    0 would look recent; any real time (> 0) is a reading."""
    now = 1.0
    insts = [
        put(table, "never", metrics_age=None, registered_age=0.5, now=now),
        put(table, "early", cpu=0.75, metrics_age=0.5, registered_age=0.5, now=now),
    ]
    fleet, obs = observe(table, insts, now=now)
    assert obs.cpu_samples == (0.75,) and obs.missing == 1
    cpus = {m.instance_id: m.cpu for m in fleet.members}
    assert cpus == {"never": None, "early": 0.75}


def test_the_warmup_ends_at_exactly_warmup_seconds(table):
    """Rule: an instance is warming while registered for less than HELIX_WARMUP seconds; at
    exactly HELIX_WARMUP its CPU counts. Every warming instance is counted."""
    insts = [
        put(table, "done", cpu=0.25, registered_age=60.0),
        put(table, "warm-1", cpu=1.0, registered_age=59.5),
        put(table, "warm-2", cpu=1.0, registered_age=1.0),
        put(table, "warm-3", cpu=1.0, registered_age=0.0),
    ]
    _, obs = observe(table, insts, warmup=60.0)
    assert obs.cpu_samples == (0.25,)
    assert (obs.warming, obs.missing, obs.in_service) == (3, 0, 4)


def test_cpu_above_one_is_clamped_to_one(table):
    """Rule: an agent's rounding may report a little over 100% (the table admits up to 1.5): the
    policy sees 1.0."""
    insts = [put(table, "hot", cpu=1.25), put(table, "ok", cpu=0.5), put(table, "zero", cpu=0.0)]
    _, obs = observe(table, insts)
    assert sorted(obs.cpu_samples) == [0.0, 0.5, 1.0]


def test_only_healthy_rows_give_samples(table):
    """Rule: fresh metrics from an UNHEALTHY or APP_DOWN row are missing, not samples; a
    REGISTERING row is not in service at all; a provider instance without a row is pending."""
    insts = [
        put(table, "ok", cpu=0.5),
        put(table, "sick", state=State.UNHEALTHY, cpu=0.25),
        put(table, "app", state=State.APP_DOWN, cpu=0.25),
        put(table, "reg", state=State.REGISTERING, cpu=0.25),
        ProviderInstance("booting", "a", NOW - 5, "pending"),
    ]
    fleet, obs = observe(table, insts)
    assert obs.cpu_samples == (0.5,)
    assert (obs.in_service, obs.missing, obs.capacity) == (3, 2, 5)
    assert sorted(m.instance_id for m in fleet.pending) == ["booting", "reg"]


def test_the_observation_carries_the_fleets_time(table):
    """Rule: the policy decides at the view's `now` (time is passed in, never read)."""
    _, obs = observe(table, [put(table, "i-1")], now=NOW)
    assert obs.now == NOW


def test_terminating_and_unowned_are_not_capacity(table):
    """Rule: an instance the provider lists as terminating is never capacity; a registered row
    the provider does not own is reported apart, never counted."""
    insts = [put(table, "mine"), ProviderInstance("going", "a", NOW - 99, "terminating")]
    put(table, "stranger")
    fleet, obs = observe(table, insts)
    assert [m.instance_id for m in fleet.members] == ["mine"]
    assert [i.instance_id for i in fleet.terminating] == ["going"]
    assert [r.instance_id for r in fleet.unowned_rows] == ["stranger"]
    assert (obs.capacity, obs.in_service) == (1, 1)


def test_a_launch_past_its_grace_is_not_pending(table):
    """Rule: `pending` counts only launches still inside their health grace, counted from the
    launch (or from MonitorS's start when later); at exactly `grace` seconds a launch is still
    pending, after that it is a failed launch: capacity, but never a pending launch that holds
    a scale-in."""
    insts = [
        ProviderInstance("fresh", "a", NOW - 30, "pending"),
        ProviderInstance("edge", "a", NOW - 60, "pending"),
        ProviderInstance("late", "a", NOW - 61, "pending"),
    ]
    fleet = build_fleet(table.snapshot(), insts, NOW)
    obs = fleet.observation(warmup=0.0, poll_interval=1.0, grace=60.0, monitor_started_at=0.0)
    assert (obs.pending, obs.capacity) == (2, 3)
    # MonitorS (re)started 10 s ago: every grace starts again from then
    obs = fleet.observation(warmup=0.0, poll_interval=1.0, grace=60.0, monitor_started_at=NOW - 10)
    assert obs.pending == 3


def test_an_unreadable_table_leaves_every_instance_unregistered():
    """Rule: no snapshot (the table could not be read) joins as no rows at all: every owned
    instance is unregistered, nothing is unowned."""
    fleet = build_fleet(None, [ProviderInstance("i-1", "a", NOW - 5, "running")], NOW)
    assert [m.row for m in fleet.members] == [None]
    assert fleet.unowned_rows == () and fleet.in_service == []
