"""The controller's pure parts (fleet view, health plan, victim choice) and its step logic.

The step tests use a real table in /dev/shm and an in-memory provider that records calls; the
real providers have their own tests, and the end-to-end test runs the real local provider.
"""

from __future__ import annotations

import json

import pytest

from controller_asg.controller import Controller
from controller_asg.fleet import FleetMember, build_fleet
from controller_asg.health import plan_replacements
from controller_asg.policy.base import Decision, Observation
from controller_asg.providers.base import LaunchConfig, ProviderInstance
from controller_asg.termination import choose_victims
from shared.config import load_config
from shared.table import InstanceRow, Lifecycle, MetricsTable, State

NOW = 10_000.0


def inst(i: str, zone: str = "a", launched: float = NOW - 1000, state: str = "running", protected: bool = False):
    return ProviderInstance(i, zone, launched, state, protected)


def row(
    i: str,
    state: State = State.HEALTHY,
    cpu: float = 0.5,
    registered: float = NOW - 500,
    metrics_age: float = 0.5,
    failures: int = 0,
    app_down: int = 0,
) -> InstanceRow:
    return InstanceRow(
        i,
        "127.0.0.1:1",
        state,
        registered_at=registered,
        last_seen=NOW - metrics_age,
        last_metrics=NOW - metrics_age,
        cpu=cpu,
        failures=failures,
        app_down_polls=app_down,
        lifecycle=Lifecycle.NONE if state == State.REGISTERING else Lifecycle.IN_SERVICE,
    )


class FakeSnap:
    def __init__(self, rows):
        self._rows = rows

    def instances(self):
        return list(self._rows)


# -- fleet -----------------------------------------------------------------------------------------


def test_observation_rules_warmup_missing_pending():
    fleet = build_fleet(
        FakeSnap(
            [
                row("ok", cpu=0.9),
                row("warm", cpu=1.0, registered=NOW - 5),
                row("stale", cpu=0.1, metrics_age=60),
                row("sick", State.UNHEALTHY),
                row("reg", State.REGISTERING),
                row("stranger"),
            ]
        ),
        [
            inst("ok"),
            inst("warm"),
            inst("stale"),
            inst("sick"),
            inst("reg"),
            inst("new"),
            inst("going", state="terminating"),
        ],
        NOW,
    )
    obs = fleet.observation(warmup=60, poll_interval=1)
    assert obs.cpu_samples == (pytest.approx(0.9),)
    assert (obs.capacity, obs.in_service, obs.pending, obs.warming, obs.missing) == (6, 4, 2, 1, 2)
    assert [r.instance_id for r in fleet.unowned_rows] == ["stranger"]
    assert [i.instance_id for i in fleet.terminating] == ["going"]


# -- health ----------------------------------------------------------------------------------------


def plan(rows, instances, desired=10, in_flight=0, monitor_started=NOW - 3600, fraction=0.45):
    fleet = build_fleet(FakeSnap(rows), instances, NOW)
    return plan_replacements(
        fleet,
        grace=30,
        app_down_after=3,
        desired=desired,
        in_flight=in_flight,
        max_unhealthy_fraction=fraction,
        monitor_started_at=monitor_started,
    )


def test_health_causes():
    p = plan(
        [
            row("sick", State.UNHEALTHY, failures=3),
            row("app", State.APP_DOWN, app_down=3),
            row("app-new", State.APP_DOWN, app_down=2),
        ]
        + [row(f"h{i}") for i in range(7)],
        [inst("sick"), inst("app"), inst("app-new"), inst("unreg"), inst("young", launched=NOW - 10)]
        + [inst(f"h{i}") for i in range(7)],
        desired=30,
    )
    causes = {r.instance_id: r.cause for r in p.replace}
    assert set(causes) == {"sick", "app", "unreg"}
    assert "3 failed polls" in causes["sick"] and "down for 3 polls" in causes["app"]
    assert "not registered within 30s" in causes["unreg"]


def test_monitor_restart_resets_the_registration_clock():
    p = plan([], [inst("a"), inst("b")], monitor_started=NOW - 5)
    assert p.replace == () and p.candidates == 0


def test_at_most_ten_percent_in_flight_and_mass_failure_one_at_a_time():
    rows = [row(f"s{i}", State.UNHEALTHY) for i in range(3)] + [row(f"h{i}") for i in range(17)]
    insts = [inst(r.instance_id) for r in rows]
    p = plan(rows, insts, desired=20)
    assert len(p.replace) == 2 and p.candidates == 3 and "at most 2 at a time" in p.note
    assert len(plan(rows, insts, desired=20, in_flight=2).replace) == 0
    rows = [row(f"s{i}", State.UNHEALTHY) for i in range(6)] + [row(f"h{i}") for i in range(4)]
    p = plan(rows, [inst(r.instance_id) for r in rows], desired=30)
    assert len(p.replace) == 1 and "likely a monitoring or network fault" in p.note


# -- termination -----------------------------------------------------------------------------------


def members(*specs):
    return [
        FleetMember(inst(i, zone=z, launched=t, protected=p), row(i, cpu=c) if c is not None else None)
        for i, z, t, c, p in specs
    ]


def test_victims_protection_zone_balance_then_policy():
    ms = members(
        ("a1", "a", 1, 0.9, False), ("a2", "a", 2, 0.1, False), ("a3", "a", 3, 0.5, True), ("b1", "b", 4, 0.0, False)
    )
    assert [m.instance_id for m in choose_victims(ms, 1, "least-busy")] == ["a2"]  # zone a is fuller
    assert [m.instance_id for m in choose_victims(ms, 1, "oldest")] == ["a1"]
    assert [m.instance_id for m in choose_victims(ms, 1, "newest")] == ["a2"]  # a3 is protected
    assert [m.instance_id for m in choose_victims(ms, 2, "least-busy")] == ["a2", "a1"]  # 3a+1b → 2a+1b → 1a+1b
    assert [m.instance_id for m in choose_victims(ms, 3, "least-busy")] == ["a2", "a1", "b1"]
    assert len(choose_victims(ms, 10, "oldest")) == 3  # never the protected one
    pending_first = members(("p", "a", 9, None, False), ("busy", "a", 1, 0.7, False))
    assert [m.instance_id for m in choose_victims(pending_first, 1, "least-busy")] == ["p"]


# -- controller steps ------------------------------------------------------------------------------


class MemoryProvider:
    name = "memory"

    def __init__(self):
        self.instances: dict[str, ProviderInstance] = {}
        self.calls: list[tuple] = []
        self.tokens: dict[str, list[str]] = {}
        self.fail_next_launch_after_launching = False

    def list_instances(self):
        return list(self.instances.values())

    def launch_config(self):
        return LaunchConfig.of({"image": "memory-1"})

    def launch(self, count, token, config=None, *, epoch=0):
        self.calls.append(("launch", count, token))
        if token in self.tokens:
            return [self.instances[i] for i in self.tokens[token] if i in self.instances]
        ids = [f"m-{len(self.instances) + n}" for n in range(count)]
        for i in ids:
            self.instances[i] = inst(i, launched=NOW)
        self.tokens[token] = ids
        if self.fail_next_launch_after_launching:
            self.fail_next_launch_after_launching = False
            raise ConnectionError("reply lost")
        return [self.instances[i] for i in ids]

    def terminate(self, ids):
        self.calls.append(("terminate", tuple(ids)))
        for i in ids:
            self.instances.pop(i)

    def close(self):
        pass


class FixedPolicy:
    name = "fixed"

    def __init__(self, desired):
        self.desired = desired
        self.seen: list[Observation] = []

    def decide(self, obs):
        self.seen.append(obs)
        return Decision(self.desired, f"fixed at {self.desired}")

    def export_state(self):
        return {"desired": self.desired}

    def import_state(self, state):
        self.desired = state.get("desired", self.desired)


@pytest.fixture
def setup(table_name, tmp_path):
    cfg = load_config(
        {
            "HELIX_ENV_FILE": "",
            "HELIX_SHM_NAME": table_name,
            "HELIX_STATE_DIR": str(tmp_path),
            "HELIX_MIN_INSTANCES": "1",
            "HELIX_MAX_INSTANCES": "5",
            "HELIX_DRAIN_TIMEOUT": "0",  # terminate at once: drains have their own tests (test_drain.py)
            "HELIX_ACTIVITY_LOG": str(tmp_path / "activity.jsonl"),
        }
    )
    table = MetricsTable.open_or_create(table_name, 16)
    yield cfg, table
    table.close()


def make(cfg, table, desired, dry_run=False, clock=lambda: NOW):
    provider, policy = MemoryProvider(), FixedPolicy(desired)
    ctl = Controller(cfg, table, provider, policy, dry_run=dry_run, clock=clock)
    ctl.start()
    return ctl, provider, policy


def test_frozen_without_monitor_heartbeat_enforces_only_min(setup, tmp_path):
    cfg, table = setup
    ctl, provider, policy = make(cfg, table, desired=4)
    ctl.step()  # no MonitorS heartbeat at all: frozen, but min=1 is enforced
    assert ctl.frozen and policy.seen == []
    assert [c[:2] for c in provider.calls] == [("launch", 1)]
    status = table.snapshot().controller
    assert status.frozen and status.desired == 1 and status.action == "frozen"
    table.monitor_heartbeat(NOW, 1, 1.0, started_at=NOW - 100)
    ctl.step()  # fresh heartbeat: resumes, the policy's 4 applies
    assert not ctl.frozen and len(provider.instances) == 4
    actions = [json.loads(line)["action"] for line in open(tmp_path / "activity.jsonl")]
    assert actions == ["freeze", "launch", "resume", "launch"]


def test_dry_run_acts_on_nothing_and_says_so_once(setup, tmp_path):
    cfg, table = setup
    table.monitor_heartbeat(NOW, 1, 1.0, started_at=NOW - 100)
    ctl, provider, _ = make(cfg, table, desired=3, dry_run=True)
    for _ in range(3):
        ctl.step()
    assert provider.calls == []
    entries = [json.loads(line) for line in open(tmp_path / "activity.jsonl")]
    assert [(e["action"], e["count"], e["dry_run"]) for e in entries] == [("launch", 3, True)]
    assert table.snapshot().controller.dry_run


def test_lost_launch_reply_is_retried_with_the_same_token_and_never_doubles(setup):
    cfg, table = setup
    table.monitor_heartbeat(NOW, 1, 1.0, started_at=NOW - 100)
    ctl, provider, _ = make(cfg, table, desired=2)
    provider.fail_next_launch_after_launching = True
    ctl.step()
    ctl.step()
    launches = [c for c in provider.calls if c[0] == "launch"]
    assert launches[0][2] == launches[1][2]  # retried with the same token
    assert len(provider.instances) == 2


def test_restart_mid_launch_resumes_the_intent(setup):
    cfg, table = setup
    table.monitor_heartbeat(NOW, 1, 1.0, started_at=NOW - 100)
    ctl, provider, _ = make(cfg, table, desired=2)
    provider.fail_next_launch_after_launching = True
    ctl.step()  # the launch happened, the reply was lost, then the controller "dies"
    again = Controller(cfg, table, provider, FixedPolicy(2), clock=lambda: NOW)
    again.start()
    again.step()
    assert len(provider.instances) == 2
    assert provider.calls[-1][0] == "launch" and provider.calls[-1][2] == provider.calls[0][2]


def test_scale_in_terminates_least_busy_and_history_survives(setup, tmp_path):
    cfg, table = setup
    table.monitor_heartbeat(NOW, 1, 1.0, started_at=NOW - 100)
    ctl, provider, policy = make(cfg, table, desired=3)
    ctl.step()
    for n, i in enumerate(sorted(provider.instances)):
        table.register(row(i, cpu=[0.6, 0.1, 0.4][n]))
    policy.desired = 2
    ctl.step()
    assert provider.calls[-1] == ("terminate", ("m-1",))
    ctl.save_history()
    fresh = FixedPolicy(0)
    Controller(cfg, table, provider, fresh, clock=lambda: NOW).start()
    assert fresh.desired == 2
