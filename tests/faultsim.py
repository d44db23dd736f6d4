"""The fault-injection harness: the real `Controller` (real policy, health, plan, gate, breaker and
table code, a real /dev/shm table) against a simulated cloud on a simulated clock.

What is simulated, and only that: the cloud (`FakeCloud`, behind `FakeProvider`, the provider
contract), MonitorS (`SimMonitor` writes the rows and the heartbeat a real MonitorS would write
for what the instances do) and the load. Faults are scheduled by simulated time (`Fault`), so a
run is deterministic: the same schedule gives the same steps. Every step the invariants are
checked; a violation is recorded with its time, never raised, so a run reports all of them.

Used by tests/test_faults.py (a bounded number of Hypothesis schedules, and one test per
reproduction of the cost-safety issue) and by `make bench BENCH_ARGS=chaos` (thousands).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller_asg.controller import Controller
from controller_asg.ctlserver import Caller, CtlError, validate
from controller_asg.hostlock import Fence, HostLock, HostLockHeld
from controller_asg.operator import PROCESSES
from controller_asg.policy import build_policy
from controller_asg.providers.base import LaunchConfig, LaunchError, ProviderInstance
from controller_asg.statestore import StaleEpoch, StateStore, StoreError
from controller_asg.traffic import TargetState, TrafficError
from shared.config import Config, load_config
from shared.table import HookResult, InstanceRow, Lifecycle, MetricsTable, State

GROUP = "sim"
TERMINATING_SECONDS = 5.0  # how long a terminated instance stays billable (EC2's shutting-down)
POLL = 1.0
UNHEALTHY_AFTER = 3

FAULT_KINDS = (
    "lost_reply",  # the next launch runs, its reply is lost
    "launch_error",  # the next launch is refused (nothing runs)
    "crash_before_launch",  # the controller dies between writing the intent and the launch call
    "crash_after_launch",  # the controller dies between the launch and its reply
    "restart",  # the controller is killed and restarted between two steps
    "terminate_fail_once",  # the next terminate call fails
    "terminate_fail_forever",  # one instance can never be terminated (until faults stop)
    "throttle",  # the listing fails for `duration` seconds
    "list_lag",  # launches in the next `duration` seconds show in the listing `value` seconds late
    "never_register",  # the next `value` launches never register
    "slow_app",  # the next `value` launches' apps need 15..60 s after their agent
    "broken_image",  # every launch in the next `duration` seconds has an app that never starts
    "agent_dies",  # one running instance's agent dies
    "app_dies",  # one running instance's app dies
    "monitor_down",  # MonitorS's heartbeat stops for `duration` seconds
    "monitor_restart",  # MonitorS restarts (its start time moves; rows stay)
    "second_controller",  # a second controller tries to start on the same group
    "corrupt_row",  # one row gets a bad state byte and a NaN cpu
    "corrupt_high_water",  # the header's high-water mark goes far beyond capacity for `duration` s
    "load",  # the load changes to `value` / 10 instances' worth of work
    "foreign",  # an instance Helix did not create appears in the account
    # drain before terminate (with HELIX_DRAIN_TIMEOUT > 0; the lb_* ones with target groups)
    "lb_down",  # the load balancer's API fails for `duration` seconds
    "lb_slow_drain",  # the next deregistrations drain for `value` minutes
    "hook_hangs",  # the next `value` instances' terminate hooks never end
    "hook_abandons",  # the next `value` launches' launch hooks say ABANDON
    "dies_draining",  # one draining instance's agent dies
    # the warm pool (with HELIX_WARM_POOL_SIZE > 0)
    "stop_start_fails",  # StopInstances / StartInstances fail for `duration` seconds
    # operator control (helix-ctl), each through the controller's own request handler
    "refresh",  # a new release (image) and `refresh start`; an odd `value` makes it a bad release
    "override",  # `set-capacity`: desired `value` % (max + 1) (and a lower max when it is odd), for `duration` s
    "suspend",  # `suspend` process `value` % 6 for `duration` seconds, then `resume`
)


class Crash(BaseException):
    """The controller process dies here (a BaseException: nothing in it may catch this)."""


@dataclass(frozen=True)
class Fault:
    at: int  # simulated second
    kind: str
    duration: int = 30
    value: int = 1


@dataclass
class SimInstance:
    instance_id: str
    token: str
    zone: str
    launched_at: float
    listed_at: float
    agent_at: float | None  # when its agent registers (None: never)
    app_at: float | None  # when its app is live (None: never)
    foreign: bool = False
    state: str = "running"  # running | stopped | terminating | gone
    terminated_at: float = 0.0
    agent_dead: bool = False
    unterminatable: bool = False
    hook_seconds: float = 1.0  # its launch hook's run
    hook_abandons: bool = False
    drain_seconds: float = 3.0  # its terminate hook's run (inf: never ends)
    config: str = ""  # the digest of the LaunchConfig it was launched from

    def billable(self) -> bool:
        return self.state in ("running", "terminating")


@dataclass
class Violation:
    at: float
    what: str


@dataclass
class RunReport:
    steps: int = 0
    violations: list[Violation] = field(default_factory=list)
    worst_overshoot: int = 0  # most billable instances above max at any moment (0 = never above)
    converged_after: float | None = None  # seconds after the faults stopped (None: did not converge)
    launches: int = 0
    instance_seconds: float = 0.0  # billed instance-seconds over the run
    instance_seconds_unhealthy: float = 0.0  # of those, instances not HEALTHY
    breaker_tripped_at: float | None = None
    restarts: int = 0


class FakeCloud:
    """The account: Helix's instances and others', with the faults that concern the cloud."""

    def __init__(self, max_instances: int, rng: random.Random):
        self.now = 0.0
        self.max_instances = max_instances
        self.rng = rng
        self.instances: dict[str, SimInstance] = {}
        self.by_token: dict[str, list[str]] = {}
        self.first_count: dict[str, int] = {}
        self.calls: list[tuple[int, str]] = []  # every launch call that reached the cloud
        self.violations: list[Violation] = []
        self.worst_overshoot = 0
        self.launches = 0
        self._n = 0
        # faults
        self.pending_launch_faults: list[str] = []  # consumed by the next launch calls
        self.terminate_fail_once = 0
        self.throttled_until = 0.0
        self.lag_until = 0.0
        self.lag = 0.0
        self.never_register = 0
        self.slow_app = 0
        self.broken_until = -1.0
        self.broken_image = False  # set by scenarios: every launch's app never starts
        self.hook_abandons = 0
        self.hook_hangs = 0
        self.traffic: FakeTraffic | None = None  # with target groups
        self.drain_timeout = 0.0
        self.rows: dict[str, InstanceRow] = {}  # what SimMonitor wrote last (for the drain checks)
        self.max_prepared = 0  # with a warm pool: every owned instance, stopped ones too, within this
        self.stop_start_fails_until = -1.0
        # The launch configuration the settings name (an instance refresh replaces instances of
        # others), and images whose instances' apps never start (a bad release: refresh rolls back).
        self.monitor_down_at = -1e9  # the last second MonitorS was down (nobody could run a hook then)
        self.image = "img-1"
        self.bad_images: set[str] = set()

    def owned(self) -> list[SimInstance]:
        return [i for i in self.instances.values() if not i.foreign]

    def billable(self) -> list[SimInstance]:
        return [i for i in self.owned() if i.billable()]

    def check_budget(self, where: str) -> None:
        if self.max_prepared:
            alive = [i for i in self.owned() if i.state != "gone"]
            if len(alive) > self.max_prepared:
                self.violations.append(
                    Violation(self.now, f"{len(alive)} instances, prepared cap {self.max_prepared} ({where})")
                )
        over = len(self.billable()) - self.max_instances
        if over > 0:
            self.worst_overshoot = max(self.worst_overshoot, over)
            self.violations.append(
                Violation(self.now, f"{len(self.billable())} billable instances, max {self.max_instances} ({where})")
            )

    def advance(self, now: float) -> None:
        self.now = now
        for inst in self.instances.values():
            if inst.state == "terminating" and now - inst.terminated_at >= TERMINATING_SECONDS:
                inst.state = "gone"

    def new_instance(self, token: str, config: LaunchConfig | None = None) -> SimInstance:
        self._n += 1
        now = self.now
        agent_at: float | None = now + self.rng.uniform(2, 6)
        app_at: float | None = (agent_at or now) + self.rng.uniform(0, 3)
        if self.never_register > 0:
            self.never_register -= 1
            agent_at = app_at = None
        elif self.slow_app > 0:
            self.slow_app -= 1
            app_at = (agent_at or now) + self.rng.uniform(15, 60)
        if self.broken_image or now < self.broken_until:
            app_at = None
        if config is not None and config.as_dict().get("image") in self.bad_images:
            app_at = None
        lag = self.lag if now < self.lag_until else 0.0
        inst = SimInstance(f"i-{self._n:05d}", token, f"z{self._n % 2}", now, now + lag, agent_at, app_at)
        inst.config = config.digest if config is not None else ""
        inst.hook_seconds = self.rng.uniform(0, 4)
        inst.drain_seconds = self.rng.uniform(1, 8)
        if self.hook_abandons > 0:
            self.hook_abandons -= 1
            inst.hook_abandons = True
        if self.hook_hangs > 0:
            self.hook_hangs -= 1
            inst.drain_seconds = float("inf")
        self.instances[inst.instance_id] = inst
        self.launches += 1
        return inst

    def add_foreign(self) -> None:
        self._n += 1
        inst = SimInstance(f"i-{self._n:05d}", "", "z0", self.now, self.now, self.now, self.now, foreign=True)
        self.instances[inst.instance_id] = inst


class FakeProvider:
    """The provider contract over `FakeCloud`, with the cloud's faults."""

    name = "fake"

    def __init__(self, cloud: FakeCloud):
        self.cloud = cloud

    def _view(self, inst: SimInstance) -> ProviderInstance:
        return ProviderInstance(
            inst.instance_id,
            inst.zone,
            inst.launched_at,
            inst.state if inst.state in ("terminating", "stopped") else "running",
            address="",
            launch_token=inst.token,
            config=inst.config,
        )

    def list_instances(self) -> list[ProviderInstance]:
        c = self.cloud
        if c.now < c.throttled_until:
            raise ConnectionError("RequestLimitExceeded (simulated throttling)")
        return [self._view(i) for i in c.owned() if i.state != "gone" and c.now >= i.listed_at]

    def launch_config(self) -> LaunchConfig:
        return LaunchConfig.of({"image": self.cloud.image})

    def launch(
        self, count: int, token: str, config: LaunchConfig | None = None, *, epoch: int = 0
    ) -> list[ProviderInstance]:
        c = self.cloud
        config = config or self.launch_config()
        if count < 0:
            raise ValueError(f"count={count}: expected 0 or more")
        fault = c.pending_launch_faults.pop(0) if c.pending_launch_faults and count > 0 else ""
        if fault == "crash_before_launch":
            raise Crash("controller killed before the launch call")
        if fault == "launch_error":
            raise LaunchError("InsufficientInstanceCapacity in every zone (simulated)")
        c.calls.append((count, token))
        c.first_count.setdefault(token, count)
        mine = c.by_token.setdefault(token, [])
        for _ in range(count - len(mine)):
            mine.append(c.new_instance(token, config).instance_id)
        if len(mine) > c.first_count[token]:
            c.violations.append(
                Violation(
                    c.now, f"launch token {token} has {len(mine)} instances, first asked for {c.first_count[token]}"
                )
            )
        c.check_budget(f"after a launch of {count}")
        if fault == "lost_reply":
            raise ConnectionError("launch reply lost (simulated)")
        if fault == "crash_after_launch":
            raise Crash("controller killed between the launch and its reply")
        return [self._view(c.instances[i]) for i in mine if c.instances[i].state != "gone"]

    def terminate(self, instance_ids: Sequence[str]) -> None:
        c = self.cloud
        for instance_id in instance_ids:
            inst = c.instances.get(instance_id)
            if inst is None or inst.foreign:
                c.violations.append(
                    Violation(c.now, f"asked to terminate {instance_id}, not an instance Helix created")
                )
        if c.terminate_fail_once > 0:
            c.terminate_fail_once -= 1
            raise ConnectionError("TerminateInstances failed (simulated)")
        stuck = [i for i in instance_ids if i in c.instances and c.instances[i].unterminatable]
        if stuck:
            raise PermissionError(f"OperationNotPermitted: termination protection on {', '.join(stuck)} (simulated)")
        for instance_id in instance_ids:
            inst = c.instances.get(instance_id)
            if inst is not None and not inst.foreign and inst.state in ("running", "stopped"):
                if inst.state == "running":
                    self._check_drained(instance_id)
                inst.state, inst.terminated_at = "terminating", c.now

    def stop(self, instance_ids: Sequence[str]) -> None:
        self._pause(instance_ids, "stopped")

    def start(self, instance_ids: Sequence[str]) -> None:
        self._pause(instance_ids, "running")

    def _pause(self, instance_ids: Sequence[str], to: str) -> None:
        c = self.cloud
        if c.now < c.stop_start_fails_until:
            raise ConnectionError(f"{'Stop' if to == 'stopped' else 'Start'}Instances failed (simulated)")
        for instance_id in instance_ids:
            inst = c.instances.get(instance_id)
            if inst is None or inst.foreign or inst.state not in ("running", "stopped"):
                c.violations.append(Violation(c.now, f"{to} of {instance_id}, which is not a live instance of ours"))
                continue
            inst.state = to
            if to == "running":  # a paused agent and app resume where they were, a second later
                inst.agent_at = max(inst.agent_at or 0.0, c.now + 1.0)
        c.check_budget(f"after {'stopping' if to == 'stopped' else 'starting'} {len(instance_ids)}")

    def _check_drained(self, instance_id: str) -> None:
        """Drain before terminate: never while in a target group, never while its target drains
        (before the timeout), never in service without its terminate hook having had its chance."""
        c = self.cloud
        t = c.traffic
        if t is not None:
            if instance_id in t.registered:
                c.violations.append(Violation(c.now, f"{instance_id} terminated while in its target groups"))
            left = t.left_at.get(instance_id)
            if left is not None and c.now < t.drained_at[instance_id] and c.now < left + c.drain_timeout:
                c.violations.append(Violation(c.now, f"{instance_id} terminated undrained before the drain timeout"))
        row = c.rows.get(instance_id)
        if c.now - c.monitor_down_at <= c.drain_timeout + POLL:
            # MonitorS was down while it drained: nobody could ask its agent to run the hook, and the
            # hook never holds a terminate past its deadline (controller_asg/drain.py).
            return
        if (
            c.drain_timeout > 0
            and row is not None
            and row.state == State.HEALTHY
            and row.lifecycle == Lifecycle.IN_SERVICE
        ):
            c.violations.append(Violation(c.now, f"{instance_id} terminated in service without draining"))

    def close(self) -> None:
        pass


class FakeTraffic:
    """Target groups: who is registered, who drains until when, and the load balancer's faults."""

    name = "fake-elb"
    enabled = True

    def __init__(self, cloud: FakeCloud):
        self.cloud = cloud
        self.registered: set[str] = set()
        self.left_at: dict[str, float] = {}
        self.drained_at: dict[str, float] = {}
        self.down_until = -1.0
        self.slow_drains = 0  # the next deregistrations drain for `slow_minutes`
        self.slow_minutes = 0
        self.unhealthy: set[str] = set()  # registered targets whose health check fails

    def _api(self, operation: str) -> None:
        if self.cloud.now < self.down_until:
            raise TrafficError(f"{operation}: ServiceUnavailable (simulated)")

    def register(self, instance_ids: Sequence[str]) -> None:
        self._api("RegisterTargets")
        for instance_id in instance_ids:
            self.registered.add(instance_id)
            self.left_at.pop(instance_id, None)

    def deregister(self, instance_ids: Sequence[str]) -> None:
        self._api("DeregisterTargets")
        now = self.cloud.now
        for instance_id in instance_ids:
            if instance_id in self.registered:
                self.registered.discard(instance_id)
                self.left_at[instance_id] = now
                drain = 5.0
                if self.slow_drains > 0:
                    self.slow_drains -= 1
                    drain = 60.0 * self.slow_minutes
                self.drained_at[instance_id] = now + drain

    def states(self, instance_ids: Sequence[str]) -> dict[str, TargetState]:
        self._api("DescribeTargetHealth")
        now = self.cloud.now
        out = {}
        for instance_id in instance_ids:
            if instance_id in self.registered:
                out[instance_id] = TargetState.UNHEALTHY if instance_id in self.unhealthy else TargetState.HEALTHY
            elif instance_id in self.left_at and now < self.drained_at[instance_id]:
                out[instance_id] = TargetState.DRAINING
            else:
                out[instance_id] = TargetState.UNUSED
        return out


class SimMonitor:
    """Writes what MonitorS would: a row per registered agent, the heartbeat, per poll; and runs
    the hooks as MonitorS and the agents would (launch hook after the first good poll; terminate
    hook when the roster asks for a drain)."""

    def __init__(self, cloud: FakeCloud, table: MetricsTable):
        self.cloud = cloud
        self.table = table
        self.started_at = 0.0
        self.down_until = -1.0
        self.load = 1.0  # instances' worth of work at 100% CPU
        self.rows: dict[str, InstanceRow] = {}
        self.hw_restore_at = -1.0
        # With several managers (HAHarness): each one's MonitorS polls every agent into its own
        # table; an agent's terminate hook runs when any of them asks for a drain.
        self.mirrors: list[MetricsTable] = []

    def tick(self, now: float) -> None:
        if now < self.down_until:
            self.cloud.monitor_down_at = now
            return
        if 0 <= self.hw_restore_at <= now:
            with self.table.writing() as w:  # MonitorS's start-up repair clamps it
                w.header["high_water"] = min(int(w.header["high_water"]), self.table.capacity)
            self.hw_restore_at = -1.0
        live = {i.instance_id: i for i in self.cloud.owned() if i.state == "running"}
        drains: dict[str, float] = {}
        for table in [self.table, *self.mirrors]:
            for i, e in table.roster().entries.items():
                if e.drain_deadline > 0:
                    drains[i] = max(drains.get(i, 0.0), e.drain_deadline)
        self.cloud.rows = self.rows
        healthy = [i for i in live.values() if self._healthy(i, now)]
        cpu = min(1.0, self.load / len(healthy)) if healthy else 0.0
        for instance_id in list(self.rows):
            if instance_id not in live:
                for table in [self.table, *self.mirrors]:
                    table.free(instance_id)
                del self.rows[instance_id]
        for inst in live.values():
            if inst.agent_at is None or now < inst.agent_at:
                continue
            row = self.rows.get(inst.instance_id)
            if row is None:
                row = InstanceRow(inst.instance_id, "127.0.0.1:1", State.REGISTERING, zone=inst.zone, registered_at=now)
                self.rows[inst.instance_id] = row
            elif inst.agent_dead:
                row.failures += 1
                if row.failures >= UNHEALTHY_AFTER:
                    row.state = State.UNHEALTHY
            else:
                row.failures = 0
                row.last_seen = row.last_metrics = now
                row.cpu = cpu if self._healthy(inst, now) else 0.02
                if self._healthy(inst, now):
                    row.state, row.app_down_polls, row.app_live = State.HEALTHY, 0, True
                else:
                    row.state, row.app_live = State.APP_DOWN, False
                    row.app_down_polls += 1
            self._lifecycle(inst, row, drains.get(inst.instance_id, 0.0), now)
            for table in [self.table, *self.mirrors]:
                try:
                    table.register(row)
                except Exception:  # noqa: BLE001 - a corrupted header may refuse writes until repaired
                    pass
        for table in [self.table, *self.mirrors]:
            table.monitor_heartbeat(now, 4242, POLL, 0.0, started_at=self.started_at)

    @staticmethod
    def _lifecycle(inst: SimInstance, row: InstanceRow, drain_deadline: float, now: float) -> None:
        def move(to: Lifecycle, result: HookResult | None = None) -> None:
            if row.lifecycle != to:
                row.lifecycle, row.lifecycle_at = to, now
            if result is not None:
                row.hook_result = result

        alive = not inst.agent_dead
        if drain_deadline > 0 and row.lifecycle not in (Lifecycle.DRAINED,):
            if not alive:
                move(Lifecycle.DRAINED, HookResult.FAILED)
            elif row.lifecycle != Lifecycle.DRAINING:
                move(Lifecycle.DRAINING)
            elif now - row.lifecycle_at >= inst.drain_seconds:
                move(Lifecycle.DRAINED, HookResult.CONTINUE)
            elif now >= drain_deadline:
                move(Lifecycle.DRAINED, HookResult.TIMEOUT)
            return
        if row.state == State.REGISTERING or not alive:
            return
        if row.lifecycle == Lifecycle.NONE:
            move(Lifecycle.PREPARING)
        if row.lifecycle == Lifecycle.PREPARING and now - row.lifecycle_at >= inst.hook_seconds:
            if inst.hook_abandons:
                move(Lifecycle.ABANDONED, HookResult.ABANDON)
            else:
                move(Lifecycle.IN_SERVICE, HookResult.CONTINUE)

    @staticmethod
    def _healthy(inst: SimInstance, now: float) -> bool:
        return (
            not inst.agent_dead
            and inst.agent_at is not None
            and now >= inst.agent_at
            and inst.app_at is not None
            and now >= inst.app_at
        )

    def is_healthy(self, instance_id: str) -> bool:
        row = self.rows.get(instance_id)
        return row is not None and row.state == State.HEALTHY and row.lifecycle == Lifecycle.IN_SERVICE

    def corrupt_row(self, rng: random.Random) -> None:
        """A row no MonitorS wrote: an unknown state, a NaN CPU and an id that is not UTF-8, in a
        slot the monitor will not rewrite (it stays until MonitorS's start-up repair)."""
        with self.table.writing() as w:
            used = w.used()
            free = [i for i in range(len(used)) if used[i]["state"] == State.FREE]
            if free:
                slot = rng.choice(free)
            elif w.high_water < self.table.capacity:
                slot = w.high_water
                w.header["high_water"] = slot + 1
            else:
                return
            w.rows[slot]["instance_id"] = b"\xff\xfe-garbage"
            w.rows[slot]["state"] = 9
            w.rows[slot]["cpu"] = float("nan")
            w.rows[slot]["last_metrics"] = float("inf")

    def corrupt_high_water(self, until: float) -> None:
        with self.table.writing() as w:
            w.header["high_water"] = 2**31
        self.hw_restore_at = until


def sim_config(state_dir: str, table_name: str, **overrides: object) -> Config:
    env = {
        "HELIX_ENV_FILE": "",
        "HELIX_SHM_NAME": table_name,
        "HELIX_STATE_DIR": state_dir,
        "HELIX_GROUP": GROUP,
        "HELIX_MIN_INSTANCES": "2",
        "HELIX_MAX_INSTANCES": "8",
        "HELIX_POLL_INTERVAL": str(POLL),
        "HELIX_HEALTH_GRACE": "30",
        "HELIX_WARMUP": "10",
        "HELIX_SCALE_IN_WINDOW": "60",
        "HELIX_LAUNCH_LEAD": "10",
        "HELIX_DRAIN_TIMEOUT": "30",
        "HELIX_ACTIVITY_LOG": "",
        "HELIX_INSECURE": "1",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return load_config(env)


class Harness:
    """One simulated world and the real controller in it."""

    def __init__(
        self,
        table_name: str,
        state_dir: str | None = None,
        seed: int = 0,
        traffic: bool | int | str = False,
        **config: object,
    ):
        """`traffic`: with target groups (FakeTraffic); `config`: HELIX_ settings over sim_config's."""
        self._tmp = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="helix-faultsim-")
            state_dir = self._tmp.name
        self.cfg = sim_config(state_dir, table_name, **config)
        self.rng = random.Random(seed)
        self.cloud = FakeCloud(self.cfg.max_instances, self.rng)
        self.provider = FakeProvider(self.cloud)
        self.cloud.drain_timeout = self.cfg.drain_timeout
        if self.cfg.warm_pool_size:
            self.cloud.max_prepared = self.cfg.effective_max_prepared
        self.traffic = FakeTraffic(self.cloud) if traffic in (True, 1, "1") else None
        self.cloud.traffic = self.traffic
        # A fresh segment every time: rows a previous run left under the same name (Hypothesis runs
        # many schedules in one test) would otherwise speak for this run's instances.
        MetricsTable.remove(table_name)
        self.table = MetricsTable.open_or_create(table_name, 64)
        self.monitor = SimMonitor(self.cloud, self.table)
        self.report = RunReport()
        self.now = 0.0
        self.controller: Controller | None = None
        self.lock: HostLock | None = None
        self.resumes: list[tuple[float, str]] = []  # (when, process) suspended by a fault
        try:
            self._start_controller()
        except BaseException:
            self.close()
            MetricsTable.remove(table_name)
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.table.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- the controller's life -------------------------------------------------------------------

    def _start_controller(self) -> None:
        if self.lock is not None:
            self.lock.release()  # the kernel drops a dead process's flock
        self.lock = HostLock(self.cfg.state_dir, self.cfg.group_name)
        self.lock.acquire()
        self.controller = self.new_controller(self.table, self.provider, self.lock)
        self.controller.start()

    def new_controller(
        self, table: MetricsTable, provider: FakeProvider, fence: Fence, store: StateStore | None = None
    ) -> Controller:
        """The real controller as the process builds it, on the simulated clock."""
        return Controller(
            self.cfg,
            table,
            provider,
            build_policy(self.cfg.policy, self.cfg),
            clock=lambda: self.now,
            fence=fence,
            traffic=self.traffic,
            policy_factory=lambda lo, hi: build_policy(
                self.cfg.policy, self.cfg.replace(min_instances=lo, max_instances=hi)
            ),
            store=store,
        )

    def restart_controller(self) -> None:
        """SIGKILL and start again: nothing of the old object is kept but what it wrote to disk."""
        self.report.restarts += 1
        self.controller = None
        self._start_controller()

    def try_second_controller(self) -> None:
        second = HostLock(self.cfg.state_dir, self.cfg.group_name)
        try:
            second.acquire()
        except HostLockHeld:
            return
        second.release()
        self.report.violations.append(Violation(self.now, "a second controller took the host lock"))

    # -- faults ----------------------------------------------------------------------------------

    def ctl(self, op: str, reason: str = "", **args: Any) -> dict:
        """A helix-ctl request, checked as the control socket checks it, to the controller's handler."""
        assert self.controller is not None
        op, full, reason = validate({"op": op, "args": args, "reason": reason})
        return self.controller.handle_ctl(op, full, Caller(1, 0, "tester"), reason)

    def inject(self, fault: Fault) -> None:
        c, now = self.cloud, self.now
        kind = fault.kind
        if kind in ("lost_reply", "launch_error", "crash_before_launch", "crash_after_launch"):
            c.pending_launch_faults.extend([kind] * max(1, fault.value))
        elif kind == "restart":
            self.restart_controller()
        elif kind == "terminate_fail_once":
            c.terminate_fail_once += max(1, fault.value)
        elif kind == "terminate_fail_forever":
            running = [i for i in c.owned() if i.state == "running" and not i.unterminatable]
            if running:
                victim = self.rng.choice(running)
                victim.unterminatable = True
                if fault.value % 2:  # and sometimes it is the one that is sick
                    victim.agent_dead = True
        elif kind == "throttle":
            c.throttled_until = now + fault.duration
        elif kind == "list_lag":
            c.lag_until, c.lag = now + fault.duration, float(min(60, 5 + fault.value * 5))
        elif kind == "never_register":
            c.never_register += max(1, fault.value)
        elif kind == "slow_app":
            c.slow_app += max(1, fault.value)
        elif kind == "broken_image":
            c.broken_until = now + fault.duration
        elif kind in ("agent_dies", "app_dies"):
            running = [i for i in c.owned() if i.state == "running" and i.agent_at is not None]
            if running:
                victim = self.rng.choice(running)
                if kind == "agent_dies":
                    victim.agent_dead = True
                else:
                    victim.app_at = None
        elif kind == "monitor_down":
            self.monitor.down_until = now + fault.duration
        elif kind == "monitor_restart":
            self.monitor.started_at = now
        elif kind == "second_controller":
            self.try_second_controller()
        elif kind == "corrupt_row":
            self.monitor.corrupt_row(self.rng)
        elif kind == "corrupt_high_water":
            self.monitor.corrupt_high_water(now + fault.duration)
        elif kind == "load":
            self.monitor.load = max(0.1, fault.value / 10)
        elif kind == "foreign":
            c.add_foreign()
        elif kind == "lb_down":
            if self.traffic is not None:
                self.traffic.down_until = now + fault.duration
        elif kind == "lb_slow_drain":
            if self.traffic is not None:
                self.traffic.slow_drains, self.traffic.slow_minutes = 3, max(1, fault.value)
        elif kind == "stop_start_fails":
            c.stop_start_fails_until = now + fault.duration
        elif kind == "hook_hangs":
            c.hook_hangs += max(1, fault.value)
        elif kind == "hook_abandons":
            c.hook_abandons += max(1, fault.value)
        elif kind == "dies_draining":
            draining = [i for i, r in self.monitor.rows.items() if r.lifecycle == Lifecycle.DRAINING]
            if draining:
                c.instances[self.rng.choice(sorted(draining))].agent_dead = True
        elif kind in ("refresh", "override", "suspend"):
            self._operate(fault)
        else:
            raise ValueError(f"fault kind={kind!r}: expected one of {', '.join(FAULT_KINDS)}")

    def _operate(self, fault: Fault) -> None:
        c, cfg = self.cloud, self.cfg
        if self.controller is None:
            return  # helix-ctl finds no controller to talk to (a dead leader)
        try:
            if fault.kind == "refresh":
                status = self.ctl("status")
                if status["refresh"] is None or status["refresh"]["state"] not in (
                    "in-progress",
                    "checkpoint",
                    "rolling-back",
                ):
                    c.image = f"img-{c.launches + 2}"
                    if fault.value % 2:
                        c.bad_images.add(c.image)
                    self.ctl("refresh", action="start", warmup=5.0, max_healthy=100.0 + 50 * (fault.value % 3 == 2))
            elif fault.kind == "override":
                desired = max(cfg.min_instances, fault.value % (cfg.max_instances + 1))
                top = max(desired, cfg.max_instances - 2) if fault.value % 2 else None
                args: dict[str, Any] = {"desired": desired, "max": top, "for": float(max(1, fault.duration))}
                self.ctl("set-capacity", **args)
            elif fault.kind == "suspend":
                process = PROCESSES[fault.value % len(PROCESSES)]
                self.ctl("suspend", processes=[process])
                self.resumes.append((self.now + fault.duration, process))
        except CtlError:
            pass  # refused (e.g. a desired the bounds in force do not allow): nothing changed

    def end_faults(self) -> None:
        """Faults stop: the cloud behaves from now on (instances already broken stay broken)."""
        c = self.cloud
        c.pending_launch_faults.clear()
        c.terminate_fail_once = 0
        c.throttled_until = c.lag_until = 0.0
        c.never_register = c.slow_app = 0
        c.broken_until = -1.0
        c.broken_image = False
        c.hook_abandons = c.hook_hangs = 0
        c.stop_start_fails_until = -1.0
        if self.traffic is not None:
            self.traffic.down_until = -1.0
            self.traffic.slow_drains = 0
        for inst in c.instances.values():
            inst.unterminatable = False
        self.monitor.down_until = -1.0
        c.bad_images.clear()  # the bad release is fixed
        self.resumes = [(self.now, p) for _, p in self.resumes]  # resumed at the next step
        if self.monitor.hw_restore_at >= 0:
            self.monitor.hw_restore_at = self.now

    # -- running ---------------------------------------------------------------------------------

    def _advance_world(self) -> None:
        """What each simulated second does before the controller steps: the operator's resumes
        that fell due, then the cloud and the monitor move on."""
        due = [p for t, p in self.resumes if t <= self.now]
        if due and self.controller is not None:  # (a dead leader: once another leads)
            self.resumes = [(t, p) for t, p in self.resumes if t > self.now]
            self.ctl("resume", processes=due)
        self.cloud.advance(self.now)
        self.monitor.tick(self.now)

    def step(self) -> None:
        self._advance_world()
        assert self.controller is not None
        try:
            self.controller.step()
        except Crash:
            self.restart_controller()
        except Exception as exc:  # noqa: BLE001 - a step that raises is itself a violation
            self.report.violations.append(Violation(self.now, f"controller step raised {exc!r}"))
        self.report.steps += 1
        self.cloud.check_budget("after a step")
        billable = self.cloud.billable()
        self.report.instance_seconds += len(billable)
        self.report.instance_seconds_unhealthy += sum(1 for i in billable if not self.monitor.is_healthy(i.instance_id))
        if self.report.breaker_tripped_at is None and self.controller is not None and self.controller.breaker.tripped:
            self.report.breaker_tripped_at = self.now

    def run_until(self, until: float) -> None:
        while self.now < until:
            self.step()
            self.now += 1.0

    def converged(self) -> bool:
        """Faults over: the billable fleet is exactly the controller's desired count, all healthy."""
        status = self.table.snapshot().controller
        billable = self.cloud.billable()
        return (
            len(billable) == status.desired
            and not status.frozen
            and all(self.monitor.is_healthy(i.instance_id) for i in billable)
        )

    def run(self, faults: Sequence[Fault], faults_end: float, settle: float = 900.0) -> RunReport:
        """Run the schedule, then without faults until converged (for 30 s in a row) or `settle`."""
        by_time: dict[int, list[Fault]] = {}
        for fault in faults:
            by_time.setdefault(int(fault.at), []).append(fault)
        while self.now < faults_end:
            for fault in by_time.get(int(self.now), []):
                self.inject(fault)
            self.step()
            self.now += 1.0
        self.end_faults()
        stop_faults = self.now
        calm_since: float | None = None
        while self.now < stop_faults + settle:
            self.step()
            if self.converged():
                calm_since = self.now if calm_since is None else calm_since
                if self.now - calm_since >= 30:
                    self.report.converged_after = calm_since - stop_faults
                    break
            else:
                calm_since = None
            self.now += 1.0
        self.report.violations += self.cloud.violations
        self.report.worst_overshoot = self.cloud.worst_overshoot
        self.report.launches = self.cloud.launches
        return self.report


def activities(h: Harness) -> list[dict]:
    """The controller's activity log (HELIX_ACTIVITY_LOG must be set), one dict per line."""
    with open(h.cfg.activity_log, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def assert_clean(report: RunReport, *, converge: bool = True) -> None:
    assert report.violations == [], "\n".join(f"t={v.at:.0f}s: {v.what}" for v in report.violations[:10])
    if converge:
        assert report.converged_after is not None, "the fleet did not converge after the faults stopped"


def quiet_logs() -> dict[str, int]:
    """The harness runs thousands of steps: nothing below CRITICAL from the controller's loggers.
    Returns the levels before, for `restore_logs`."""
    before = {}
    for name in ("controller_asg", "controller_asg.providers.local"):
        before[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return before


def restore_logs(before: dict[str, int]) -> None:
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def unique_table_name() -> str:
    return f"helix-faultsim-{os.getpid()}-{random.getrandbits(32):08x}"


# -- several managers: the leader lease (issue 14) ------------------------------------------------

HA_FAULT_KINDS = (
    "leader_dies",  # the leader's controller is killed (kill -9); it restarts `duration` s later
    "leader_paused",  # the leader's controller is stopped (SIGSTOP) for `duration` s, then wakes as it was
    "store_cut",  # the leader cannot reach the lease store for `duration` s (it keeps stepping)
    "replies_lost",  # the leader's lease requests reach the store, their replies are lost, for `duration` s
)


class SimLease:
    """The lease item (DynamoDbLease's conditional writes, on the simulated clock)."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.holder = ""
        self.epoch = 0
        self.expires = -1.0

    def try_acquire(self, me: str, now: float) -> int:
        """The epoch `me` holds after the attempt, 0 when another live holder has it."""
        if self.holder == me and now < self.expires:
            self.expires = now + self.ttl
            return self.epoch
        if self.holder and now < self.expires:
            return 0
        self.holder, self.epoch, self.expires = me, self.epoch + 1, now + self.ttl
        return self.epoch


class SimLeaseFence:
    """LeaseFence's rule: act only until the last renewal + TTL - margin, by its own clock."""

    def __init__(self, lease: SimLease, me: str, clock: Callable[[], float], margin: float):
        self.lease, self.me, self.clock, self.margin = lease, me, clock, margin
        self._epoch = 0
        self.valid_until = -1.0

    def renew(self, now: float) -> None:
        epoch = self.lease.try_acquire(self.me, now)
        self._epoch = epoch
        if epoch:
            self.valid_until = now + self.lease.ttl - self.margin

    def renew_unanswered(self, now: float) -> None:
        """A request that reaches the store but whose reply is lost. As LeaseFence: it renews only
        while its last answered renewal holds; past that it may only take an expired lease anew."""
        if self._epoch and now < self.valid_until or self.lease.holder != self.me and now >= self.lease.expires:
            self.lease.try_acquire(self.me, now)

    def may_act(self) -> str:
        if self._epoch and self.clock() < self.valid_until:
            return ""
        return f"standby: {self.lease.holder or 'nobody'} holds the lease (epoch {self.lease.epoch})"

    @property
    def epoch(self) -> int:
        return self._epoch


class SimStore:
    """The state items in the lease's table: a write older than the stored epoch is refused."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, str]] = {}

    def view(self, fence: SimLeaseFence, reach: Callable[[], str] = lambda: "up") -> SimStoreView:
        return SimStoreView(self, fence, reach)


class SimStoreView:
    """`reach`: the manager's state: "cut" (a write never arrives), "unanswered" (it arrives, its
    reply does not), anything else (it works)."""

    def __init__(self, store: SimStore, fence: SimLeaseFence, reach: Callable[[], str]):
        self.store, self.fence, self.reach = store, fence, reach

    def load(self, name: str) -> str | None:
        item = self.store.items.get(name)
        return item[1] if item else None

    def save(self, name: str, text: str, *, durable: bool) -> None:
        epoch = self.fence.epoch
        stored = self.store.items.get(name)
        reach = self.reach()
        if reach == "cut":
            raise StoreError(f"state {name}: the store is unreachable (simulated)")
        if epoch <= 0 or (stored is not None and stored[0] > epoch):
            raise StaleEpoch(f"state {name}: epoch {epoch} is older than the stored {stored[0] if stored else 0}")
        self.store.items[name] = (epoch, text)
        if reach == "unanswered":
            raise StoreError(f"state {name}: the store's reply was lost (simulated)")


class LeasedProvider(FakeProvider):
    """One manager's view of the cloud: every call that changes it must come from the lease's
    current holder, under its epoch, before the lease expires (checked, never enforced)."""

    def __init__(self, cloud: FakeCloud, lease: SimLease, fence: SimLeaseFence):
        super().__init__(cloud)
        self.lease, self.fence = lease, fence

    def _check(self, what: str) -> None:
        lease, c = self.lease, self.cloud
        if lease.holder != self.fence.me or self.fence.epoch != lease.epoch or c.now >= lease.expires:
            c.violations.append(
                Violation(
                    c.now,
                    f"{self.fence.me} called {what} without the lease (its epoch {self.fence.epoch}, "
                    f"lease {lease.holder} epoch {lease.epoch})",
                )
            )

    def launch(
        self, count: int, token: str, config: LaunchConfig | None = None, *, epoch: int = 0
    ) -> list[ProviderInstance]:
        if count > 0:
            self._check(f"launch of {count}")
            if epoch != self.lease.epoch:
                self.cloud.violations.append(Violation(self.cloud.now, f"launch tagged epoch {epoch}"))
        return super().launch(count, token, config, epoch=epoch)

    def terminate(self, instance_ids: Sequence[str]) -> None:
        self._check(f"terminate of {', '.join(instance_ids)}")
        super().terminate(instance_ids)

    def stop(self, instance_ids: Sequence[str]) -> None:
        self._check("stop")
        super().stop(instance_ids)

    def start(self, instance_ids: Sequence[str]) -> None:
        self._check("start")
        super().start(instance_ids)


@dataclass
class Manager:
    name: str
    table: MetricsTable
    fence: SimLeaseFence
    controller: Controller | None = None
    state: str = "up"  # up | dead | paused | cut (no store) | unanswered (the store's replies lost)
    until: float = 0.0


class HAHarness(Harness):
    """`managers` managers (a MonitorS table and a controller each) on one simulated cloud, one
    lease and one state store; the faults of HA_FAULT_KINDS act on whoever leads."""

    def __init__(self, table_name: str, state_dir: str | None = None, *, managers: int = 2, **kwargs: Any):
        self.n_managers = managers
        self.managers: list[Manager] = []
        self.table_base = table_name
        super().__init__(table_name, state_dir, **kwargs)

    def close(self) -> None:
        for m in self.managers[1:]:
            m.table.close()
            MetricsTable.remove(m.table.name)
        if self.managers:
            self.table = self.managers[0].table  # the base harness's own, closed and removed by it
        super().close()

    def _start_controller(self) -> None:
        if not self.managers:
            self.lease = SimLease(self.cfg.lease_ttl)
            self.store = SimStore()
            for k in range(self.n_managers):
                table = self.table if k == 0 else MetricsTable.open_or_create(f"{self.table_base}-m{k + 1}", 64)
                if k:
                    self.monitor.mirrors.append(table)
                fence = SimLeaseFence(self.lease, f"m{k + 1}", lambda: self.now, self.cfg.lease_clock_margin)
                self.managers.append(Manager(f"m{k + 1}", table, fence))
            for m in self.managers:
                self._boot(m)
        self._lead()

    def _boot(self, m: Manager) -> None:
        """A fresh controller process for manager `m` (its fence starts over, as a new process's)."""
        m.fence = SimLeaseFence(self.lease, m.name, lambda: self.now, self.cfg.lease_clock_margin)
        m.fence.renew(self.now)
        m.controller = self.new_controller(
            m.table,
            LeasedProvider(self.cloud, self.lease, m.fence),
            m.fence,
            self.store.view(m.fence, lambda: m.state),
        )
        m.controller.start()
        m.state = "up"

    def leader(self) -> Manager:
        for m in self.managers:
            if self.lease.holder == m.name:
                return m
        return self.managers[0]

    def _lead(self) -> None:
        """`controller` and `table` name the leader's (ctl requests, convergence)."""
        m = self.leader()
        self.controller, self.table = m.controller, m.table

    def restart_controller(self) -> None:
        self.report.restarts += 1
        self._boot(self.leader())
        self._lead()

    def try_second_controller(self) -> None:
        """There is no host lock with a lease: every manager's controller runs, and the lease (whose
        holder every call is checked against) is what keeps all but one from acting."""

    def inject(self, fault: Fault) -> None:
        if fault.kind not in HA_FAULT_KINDS:
            super().inject(fault)
            return
        m = self.leader()
        if m.state != "up":
            return
        m.until = self.now + fault.duration
        if fault.kind == "leader_dies":
            m.state, m.controller = "dead", None
            self.report.restarts += 1
        elif fault.kind == "leader_paused":
            m.state = "paused"
        elif fault.kind == "replies_lost":
            m.state = "unanswered"
        else:
            m.state = "cut"

    def end_faults(self) -> None:
        super().end_faults()
        for m in self.managers:
            m.until = min(m.until, self.now)

    def step(self) -> None:
        for m in self.managers:
            if m.state != "up" and self.now >= m.until:
                if m.state == "dead":
                    self._boot(m)
                m.state = "up"
        for m in self.managers:
            if m.state == "up":
                m.fence.renew(self.now)
            elif m.state == "unanswered":
                m.fence.renew_unanswered(self.now)
        self._lead()
        self._advance_world()
        for m in self.managers:
            if m.state in ("up", "cut", "unanswered") and m.controller is not None:
                try:
                    m.controller.step()
                except Crash:
                    self._boot(m)
                except Exception as exc:  # noqa: BLE001 - a step that raises is itself a violation
                    self.report.violations.append(Violation(self.now, f"{m.name}'s step raised {exc!r}"))
        self._lead()
        self.report.steps += 1
        self.cloud.check_budget("after a step")
        billable = self.cloud.billable()
        self.report.instance_seconds += len(billable)
        self.report.instance_seconds_unhealthy += sum(1 for i in billable if not self.monitor.is_healthy(i.instance_id))
