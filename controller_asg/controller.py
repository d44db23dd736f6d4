"""The control loop: every interval, read the table and the provider, plan, apply, report.

Everything that decides is pure and lives elsewhere (policy/, fleet.py, health.py, plan.py,
refresh.py, operator.py, termination.py, gate.py, breaker.py). This module does the I/O around
it, and `apply` is the one act path: every launch and every terminate, whatever planned it (the
policy, health, an instance refresh or lifetime, min/max while frozen), goes through it, past the
fence (the host lock, or the leader lease: a standby decides and acts on nothing), the launch
budget (`gate.Budget`: never above the max in force, counting in-doubt and not-yet-listed
launches and terminating instances) and the churn breaker, and through the terminate gate (only
instances the provider lists as ours). Dry run is decided there, once.

What must outlive one step (launches in doubt, instances we are terminating, replacements in
flight, the breaker, operator overrides, suspended processes, refresh progress) is kept in the
state store (statestore.py: `<HELIX_STATE_DIR>/controller/state.json`, or the lease's table),
written before a launch call and after every change, so a restart or a new leader resumes
without doubling. helix-ctl's requests (`handle_ctl`) run between two steps, under `lock`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from controller_asg.activity import Activity, ActivityLog
from controller_asg.bounds import BoundedPolicy
from controller_asg.breaker import BreakerEvent, ChurnBreaker
from controller_asg.ctlserver import Caller, CtlError
from controller_asg.drain import Drain, hook_verdict, start_drain, traffic_verdict
from controller_asg.external import ExternalMetric
from controller_asg.fleet import FleetMember, FleetView, build_fleet
from controller_asg.gate import TOKEN_HEX, Budget, Intent, token_prefix, valid_token
from controller_asg.health import HealthPlan, plan_replacements
from controller_asg.hostlock import AlwaysFence, Fence
from controller_asg.operator import (
    PROCESSES,
    Bounds,
    Override,
    Scheduled,
    check_override,
    parse_processes,
    resolve_bounds,
)
from controller_asg.plan import Action, ActionKind, Plan, plan_frozen, plan_live
from controller_asg.policy.base import Decision, Policy
from controller_asg.prom import ControllerMetrics
from controller_asg.providers.base import LaunchConfig, LaunchError, Provider, ProviderInstance
from controller_asg.refresh import (
    Refresh,
    RefreshSpec,
    RefreshState,
    RefreshStep,
    cancel,
    launch_config_for,
    outdated,
    start_rollback,
    step_refresh,
)
from controller_asg.statestore import FileStore, StateStore
from controller_asg.traffic import NoTraffic, TargetState, Traffic, TrafficError
from shared import schedule
from shared.config import Config
from shared.table import (
    ControllerStatus,
    InstanceRow,
    Lifecycle,
    MetricsTable,
    RosterEntry,
    Snapshot,
    State,
    check_private,
)

log = logging.getLogger("controller_asg")

# Fail static when MonitorS's heartbeat is older than this many poll intervals.
MONITOR_STALE_INTERVALS = 3.0
# A launch the provider has answered may take a while to show in its listing (EC2's
# DescribeInstances is eventually consistent): count it (capacity, and billable) this long meanwhile.
LAUNCH_VISIBILITY_SECONDS = 300.0
HISTORY_SAVE_SECONDS = 60.0
# A terminate the provider accepted is sent again if the instance is still listed as running
# this long after; one that failed is retried with back-off up to the cap.
TERMINATE_RECHECK_SECONDS = 30.0
TERMINATE_BACKOFF_CAP = 300.0
BREAKER_RESET_FILE = "breaker-reset"
BOOT_SAMPLES = 20  # launches whose launch-to-in-service time the learned boot time is the median of


@dataclass
class _Condemned:
    """An instance we decided to terminate whose terminate is not confirmed yet (the provider does
    not list it as terminating): billable, never capacity, retried with back-off."""

    since: float
    cause: str
    attempts: int = 0  # failed terminate calls in a row
    next_try: float = 0.0
    error: str = ""


class Controller:
    def __init__(
        self,
        cfg: Config,
        table: MetricsTable,
        provider: Provider,
        policy: Policy,
        *,
        dry_run: bool = False,
        clock: Callable[[], float] = time.time,
        fence: Fence | None = None,
        traffic: Traffic | None = None,
        external: ExternalMetric | None = None,
        policy_factory: Callable[[int, int], Policy] | None = None,
        store: StateStore | None = None,
    ):
        self.cfg = cfg
        self.table = table
        self.provider = provider
        self.traffic: Traffic = traffic or NoTraffic()
        self.external = external  # HELIX_EXTERNAL_METRIC (a queue's backlog), read once per step
        # Min/max/desired change at run time (an override, a schedule): the policy is rebuilt for
        # new bounds by `policy_factory` (without one, it keeps its own and is only clamped).
        configured = (cfg.min_instances, cfg.max_instances)
        self.policy = BoundedPolicy(
            lambda lo, hi: policy if policy_factory is None or (lo, hi) == configured else policy_factory(lo, hi),
            *configured,
        )
        self.dry_run = dry_run
        self.clock = clock
        self.fence: Fence = fence or AlwaysFence()
        self.activity = ActivityLog(cfg.activity_log)
        self.state_dir = os.path.join(cfg.state_dir, "controller")
        self.state_path = os.path.join(self.state_dir, "state.json")
        self.legacy_intent_path = os.path.join(self.state_dir, "launch-intent.json")
        self.reset_path = os.path.join(self.state_dir, BREAKER_RESET_FILE)
        self.history_path = cfg.history_file or os.path.join(cfg.state_dir, "history.json")
        # Where the state and the history live: these files, or with HELIX_LEASE the lease's table
        # (statestore.py), so that they move with the leader.
        self.store: StateStore = store or FileStore(cfg.state_dir, self.history_path)
        self.frozen = False
        self._unfrozen_at = 0.0
        self.breaker = ChurnBreaker(cfg.breaker_failures, cfg.breaker_window)
        self._intents: dict[str, Intent] = {}  # launches in doubt, by token
        self._recent: dict[str, tuple[ProviderInstance, str, float]] = {}  # answered, maybe not listed yet
        self._condemned: dict[str, _Condemned] = {}
        self._drains: dict[str, Drain] = {}  # deciding to terminate an instance that served: see drain.py
        self._in_traffic: set[str] = set()  # registered with the target groups (by us)
        # The warm pool (HELIX_WARM_POOL_SIZE): instances launched to be prepared and stopped, not
        # capacity until a scale-out starts them; and when each started one left it (its health
        # grace counts from then, not from its launch long ago).
        self._pool: set[str] = set()
        self._started_at: dict[str, float] = {}
        # Launch-to-in-service times of our own cold launches (the policy plans a boot time ahead
        # with HELIX_LAUNCH_LEAD=0), and the launches not in service yet.
        self._booting: dict[str, float] = {}
        self._boot_samples: list[float] = []
        self._replacing: dict[str, float] = {}  # replacement id -> launched at, until healthy or its grace ends
        self._ever_healthy: set[str] = set()
        # Ids seen healthy that are gone since, and when they went (in memory only): a launch the
        # restored state still watches is not judged failed for having died after it served.
        self._healthy_then_gone: dict[str, float] = {}
        self._saved_state = ""
        self._last_status = ControllerStatus(
            pid=os.getpid(), policy=getattr(policy, "name", cfg.policy)[:16], max_instances=cfg.max_instances
        )
        self._last_logged: tuple = ()  # the last dry-run activity said
        self._said: dict[str, str] = {}  # topic -> the last thing said about it (log once per change)
        self._last_error = ("", 0.0)
        self._history_saved_at = 0.0
        # Operator control (helix-ctl): a step and a request never interleave.
        self.lock = threading.RLock()
        self._override: Override | None = None
        self._suspended: set[str] = set()
        self._refresh: Refresh | None = None  # the last instance refresh (helix-ctl refresh)
        self._lifetime: Refresh | None = None  # HELIX_MAX_INSTANCE_LIFETIME's replacement, while one runs
        self._known_configs: dict[str, dict[str, str]] = {}  # digest -> LaunchConfig settings we launched from
        self._ctl_schedule: dict[str, str] = {}  # scheduled actions added with helix-ctl: name -> its text
        self._bounds = Bounds(cfg.min_instances, cfg.max_instances, None, "settings")
        self._fleet_counts = {"capacity": 0, "draining": 0}
        self._leader_epoch = 0  # the lease epoch whose state this controller restored (HELIX_LEASE)
        self._last_members: tuple[FleetMember, ...] = ()  # the last step's fleet (a refresh starts from it)
        self.metrics: ControllerMetrics | None = None  # when served (controller_asg/prom.py)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Restore what must survive a restart: the policy's history, launches in doubt, instances
        being terminated, replacements in flight and the breaker."""
        os.makedirs(self.state_dir, exist_ok=True)
        self.check_state_files()
        self._load_history()
        self._load_state()
        try:
            owned = self.provider.list_instances()
        except Exception as exc:  # noqa: BLE001 - the cloud API is down at start: the steps hold until it is back
            log.error(
                "cannot list the %s provider's instances at start (%s); holding until it answers",
                self.provider.name,
                exc,
            )
            return
        live = [i for i in owned if i.state != "terminating"]
        log.info(
            "adopted %d instance(s) the %s provider owns%s",
            len(live),
            self.provider.name,
            f": {', '.join(i.instance_id for i in live)}" if live else "",
        )

    def check_state_files(self) -> None:
        """Refuse (NotPrivate, one line naming it) a state file this user does not own or others may
        read or write: whoever can write it can plant a launch intent or a breaker state."""
        for path in (self.state_path, self.history_path, self.legacy_intent_path):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                check_private(fd, path, "controller state file")
            finally:
                os.close(fd)

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> None:
        """Step every control interval until `stop`; `tick` after each step (the systemd watchdog
        ping: a step that hangs on a cloud call or a lock stops the pings)."""
        interval = self.cfg.effective_control_interval
        next_tick = time.monotonic()
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the controller
                self._log_error(f"control step failed: {exc!r}")
            if tick is not None:
                tick()
            next_tick += interval
            delay = next_tick - time.monotonic()
            if delay < 0:  # we fell behind (slow provider call): do not try to catch up in a burst
                next_tick = time.monotonic()
                delay = 0
            stop.wait(delay)
        self.save_history()

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> None:
        with self.lock:
            started = time.monotonic()
            self._step()
            if self.metrics is not None:
                self.metrics.observe_step(time.monotonic() - started)

    def _step(self) -> None:
        now = self.clock()
        self._follow_lease(now)
        self._take_reset_request(now)
        self._update_bounds(now)
        snap = self._read_table()
        try:
            listed = self.provider.list_instances()
        except Exception as exc:  # noqa: BLE001 - the cloud API is down: hold everything
            self._log_error(f"cannot list the {self.provider.name} provider's instances ({exc}); holding")
            self._write_status(now, self._last_status.desired, "hold", "cannot list instances; holding")
            return
        self._settle(listed, now)
        known = listed + [inst for inst, _, _ in self._recent.values()]
        # Warm-pool and stopped instances are not capacity; one that left the pool is judged from
        # its start, not its launch.
        serving = [
            dataclasses.replace(i, launched_at=max(i.launched_at, self._started_at.get(i.instance_id, 0.0)))
            for i in known
            if i.instance_id not in self._pool and i.state != "stopped"
        ]
        targets = self._target_states(serving)
        lb_unhealthy = (
            {i for i, t in targets.items() if t == TargetState.UNHEALTHY} if "elb" in self.cfg.health_sources else set()
        )
        fleet = build_fleet(
            snap,
            serving,
            now,
            condemned=set(self._condemned) | set(self._drains),
            in_traffic=self._in_traffic if self.traffic.enabled else None,
            lb_unhealthy=lb_unhealthy,
        )
        grace = self.cfg.effective_health_grace
        why_frozen = self._why_frozen(snap, now)
        self._track_freeze(why_frozen, now, fleet)
        # Health grace restarts with MonitorS, and after a freeze: nobody could register meanwhile.
        grace_from = max(snap.monitor.started_at if snap is not None else now, self._unfrozen_at)
        self._track_health(fleet, now, grace, grace_from, judge=not why_frozen, listed=listed, snap=snap)
        if why_frozen:
            plan = plan_frozen(
                fleet,
                min_instances=self._bounds.min,
                max_instances=self._bounds.max,
                termination_policy=self.cfg.termination_policy,
                why=why_frozen,
            )
        else:
            assert snap is not None
            plan = self._plan_live(fleet, snap, now, grace, grace_from)
        self.apply(plan, fleet, listed, now, snap, targets)
        # After acting: the roster carries this step's drain requests to MonitorS at once.
        self._publish_roster(known, now)
        self._write_status(now, plan.desired, plan.action, plan.reason, fleet, snap, self._budget(listed).billable)
        self._fleet_counts = {"capacity": fleet.capacity, "draining": len(self._drains)}
        self._last_members = fleet.members
        self._observe_metrics(plan, fleet)
        self._save_state()
        if now - self._history_saved_at >= HISTORY_SAVE_SECONDS:
            self.save_history()
            self._history_saved_at = now

    def _plan_live(self, fleet: FleetView, snap: Snapshot, now: float, grace: float, monitor_started: float) -> Plan:
        cfg = self.cfg
        poll_interval = snap.monitor.poll_interval or cfg.poll_interval
        obs = fleet.observation(cfg.warmup, poll_interval, grace, monitor_started)
        obs = dataclasses.replace(obs, boot_time=self._boot_time(fleet, now))
        if self.external is not None:
            obs = dataclasses.replace(obs, external=self._read_external(now))
        decision = self.policy.decide(obs)
        if "scale-in" in self._suspended and decision.desired < fleet.capacity <= self._bounds.max:
            decision = Decision(
                fleet.capacity,
                f"scale-in suspended (helix-ctl resume scale-in); the policy says {decision.desired}: {decision.reason}",
            )
        # While the breaker is tripped, an instance that was healthy once is replaced only by the
        # next probe launch (one at a time, when its back-off allows); until then it is kept, and it
        # must not take the place of failed launches (terminated without replacement) in the plan.
        tripped = self.breaker.tripped
        probe = tripped and self.breaker.allowed(1, fleet.now)[0] == 1
        held = self._ever_healthy if tripped and not probe else set()
        if "replace-unhealthy" in self._suspended:
            health = HealthPlan((), 0, "replace-unhealthy suspended (helix-ctl resume replace-unhealthy)")
        else:
            health = plan_replacements(
                fleet,
                grace=grace,
                app_down_after=cfg.app_down_after,
                desired=decision.desired,
                in_flight=len(self._replacing),
                max_unhealthy_fraction=cfg.max_unhealthy_fraction,
                monitor_started_at=monitor_started,
                skip=held,
            )
        refresh = self._refresh_step(fleet, decision.desired, now, {r.instance_id for r in health.replace})
        return plan_live(
            fleet,
            decision,
            health,
            termination_policy=cfg.termination_policy,
            breaker=("probe" if probe else "tripped") if tripped else "closed",
            ever_healthy=self._ever_healthy,
            refresh=refresh,
        )

    # -- instance refresh and max lifetime (refresh.py decides) ------------------------------------

    def _settings_config(self) -> LaunchConfig:
        return self.provider.launch_config()

    def _launch_config(self) -> LaunchConfig:
        """What the next launch uses: a refresh's target, a rollback's pin, or the settings'."""
        active = self._lifetime if self._lifetime is not None and self._refresh is None else self._refresh
        return launch_config_for(active, self._settings_config())

    def _refresh_step(self, fleet: FleetView, desired: int, now: float, skip: set[str]) -> RefreshStep | None:
        lifetime = self.cfg.max_instance_lifetime
        active = self._refresh if self._refresh is not None and self._refresh.state.active else None
        expired = lifetime > 0 and any(now - m.instance.launched_at > lifetime for m in fleet.members)
        if active is None and self._lifetime is None and expired:
            self._lifetime = Refresh(
                id=f"lifetime-{uuid.uuid4().hex[:8]}",
                kind="lifetime",
                spec=RefreshSpec(
                    min_healthy=self.cfg.min_healthy_percentage,
                    max_healthy=self.cfg.max_healthy_percentage,
                    warmup=self.cfg.effective_refresh_warmup,
                    auto_rollback=False,
                ),
                target=self._launch_config().as_dict(),
                previous=None,
                started_at=now,
                who="HELIX_MAX_INSTANCE_LIFETIME",
            )
        if active is None:
            active = self._lifetime
        if active is None:
            return None
        step = step_refresh(
            active,
            fleet,
            desired=desired,
            max_instances=self._bounds.max,
            now=now,
            breaker_tripped=self.breaker.tripped,
            suspended="refresh" in self._suspended,
            skip=skip,
            lifetime=lifetime,
        )
        kind = step.refresh.kind
        for event in step.events:
            self._record(Activity(now, kind, 0, event, [], desired, fleet.capacity, self.dry_run))
        if kind == "lifetime":
            self._lifetime = step.refresh if step.refresh.state.active else None
        else:
            self._refresh = step.refresh
        self._say(
            f"{kind}:detail",
            f"{kind} {step.refresh.id}: {step.refresh.detail}" if step.refresh.detail else "",
            logging.INFO,
        )
        return step

    def _boot_time(self, fleet: FleetView, now: float) -> float:
        """The median launch-to-in-service time of our last BOOT_SAMPLES cold launches (0: none yet).
        A launch that never comes into service within an hour says nothing about boot times."""
        present = {m.instance_id: m for m in fleet.members}
        for instance_id, launched_at in list(self._booting.items()):
            member = present.get(instance_id)
            if member is not None and member.in_service:
                self._boot_samples = (self._boot_samples + [max(0.0, now - launched_at)])[-BOOT_SAMPLES:]
                del self._booting[instance_id]
            elif (member is None and instance_id not in self._recent) or now - launched_at > 3600:
                del self._booting[instance_id]
        if not self._boot_samples:
            return 0.0
        ordered = sorted(self._boot_samples)
        return ordered[len(ordered) // 2]

    def _read_external(self, now: float) -> float | None:
        """The external metric, or None (the backlog policy then holds). A failed read falls back
        to the last good value while it is younger than three control intervals: one slow answer
        from a queue should not freeze its signal."""
        assert self.external is not None
        reading = self.external.read(now)
        self._say("external", reading.error and f"external metric: {reading.error}", logging.WARNING)
        if reading.value is not None:
            return reading.value
        if reading.last_good is not None and reading.age <= 3 * self.cfg.effective_control_interval:
            return reading.last_good
        return None

    def _read_table(self) -> Snapshot | None:
        """A snapshot, or None when the table cannot be read (the step then fails static). Bad rows
        are left out by the snapshot and reported here once per change."""
        try:
            snap = self.table.snapshot()
        except Exception as exc:  # noqa: BLE001 - a broken table must never stop min/max or the heartbeat
            self._say("table", f"cannot read the metrics table ({exc!r}): failing static", logging.ERROR)
            return None
        problems = snap.problems
        self._say(
            "table",
            f"metrics table: {len(problems)} bad row(s) left out: {'; '.join(problems[:3])}" if problems else "",
            logging.WARNING,
        )
        return snap

    def _publish_roster(self, known: list[ProviderInstance], now: float) -> None:
        """Tell MonitorS which instances this group owns and where (it registers only those, from
        there). Published every step, dry run included: it changes nothing in the cloud."""
        entries = []
        for inst in known:
            try:
                digest = bytes.fromhex(inst.secret_digest) if inst.secret_digest else b""
                drain = self._drains.get(inst.instance_id)
                entry = RosterEntry(inst.instance_id, inst.address, digest, drain.deadline if drain else 0.0)
                entry.to_record()
            except ValueError as exc:
                self._say(f"roster:{inst.instance_id}", f"{inst.instance_id} left off the roster: {exc}", logging.ERROR)
                continue
            entries.append(entry)
        try:
            self.table.publish_roster(entries, now)
        except Exception as exc:  # noqa: BLE001 - agents then wait to register; the fleet is still governed
            self._say("roster", f"cannot publish the roster to the table: {exc!r}", logging.ERROR)
        else:
            self._say("roster", "", logging.INFO)

    def _why_frozen(self, snap: Snapshot | None, now: float) -> str:
        if snap is None:
            return "the metrics table cannot be read"
        if not snap.monitor.alive(now, MONITOR_STALE_INTERVALS):
            return "MonitorS is not responding"
        return ""

    def _track_freeze(self, why: str, now: float, fleet: FleetView) -> None:
        if why and not self.frozen:
            self.frozen = True
            self._record(
                Activity(
                    now,
                    "freeze",
                    0,
                    f"{why} (heartbeat older than {MONITOR_STALE_INTERVALS:g} poll intervals, or no "
                    "table): no scale-in, no health replacement until it is back; min/max still "
                    "enforced",
                    [],
                    self._last_status.desired,
                    fleet.capacity,
                    self.dry_run,
                )
            )
        elif not why and self.frozen:
            self.frozen = False
            self._unfrozen_at = now
            self._record(
                Activity(
                    now,
                    "resume",
                    0,
                    "MonitorS heartbeat is fresh again: scaling resumes",
                    [],
                    self._last_status.desired,
                    fleet.capacity,
                    self.dry_run,
                )
            )

    def _settle(self, listed: list[ProviderInstance], now: float) -> None:
        """Fold the provider's listing into what we remember: launches now listed, terminates now
        confirmed (listed as terminating, or gone)."""
        by_id = {i.instance_id: i for i in listed}
        for instance_id, (_, _, until) in list(self._recent.items()):
            if instance_id in by_id or now > until:
                del self._recent[instance_id]
        for instance_id in list(self._condemned):
            inst = by_id.get(instance_id)
            if instance_id not in self._recent and (inst is None or inst.state == "terminating"):
                del self._condemned[instance_id]
        for instance_id in list(self._drains):
            if instance_id not in by_id and instance_id not in self._recent:
                # It went by itself while draining: nothing left to terminate. (If it was still in
                # its target groups, `_leave_traffic_of_gone` takes it out.)
                log.info("%s vanished while draining: nothing left to terminate", instance_id)
                del self._drains[instance_id]

    def _track_health(
        self,
        fleet: FleetView,
        now: float,
        grace: float,
        grace_from: float,
        judge: bool,
        listed: list[ProviderInstance] | None = None,
        snap: Snapshot | None = None,
    ) -> None:
        """Who has been HEALTHY, which replacements are still in flight, and the breaker's verdicts
        (none while frozen: with no fresh rows every launch would look like a failure). A warm-pool
        launch is judged like any other: it succeeds once prepared (or stopped, which only a
        prepared one is), so a broken image trips the breaker whether it fills the pool or the fleet."""
        present = {m.instance_id for m in fleet.members}
        # Healthy means serving: past its launch hook (and in its target groups), and HEALTHY.
        healthy = {m.instance_id for m in fleet.members if m.ready}
        if self._pool and listed is not None:
            rows = {r.instance_id: r for r in snap.instances()} if snap is not None else {}
            for inst in listed:
                if inst.instance_id in self._pool:
                    present.add(inst.instance_id)
                    if inst.state == "stopped" or _prepared(rows.get(inst.instance_id)):
                        healthy.add(inst.instance_id)
        ever = self._ever_healthy | healthy
        kept = present | set(self._condemned)
        # Healthy once and gone since: remembered a while (not saved), for the verdicts below.
        for instance_id in ever - kept:
            self._healthy_then_gone[instance_id] = now
        self._healthy_then_gone = {
            i: t for i, t in self._healthy_then_gone.items() if now - t <= LAUNCH_VISIBILITY_SECONDS
        }
        self._ever_healthy = ever & kept
        # A replacement is in flight until it is HEALTHY or its own grace is over; then it is
        # just another instance, so a stuck one never blocks healing.
        for instance_id, launched_at in list(self._replacing.items()):
            if instance_id in healthy or instance_id not in present or now - max(launched_at, grace_from) > grace:
                del self._replacing[instance_id]
        if judge:
            # A watched launch seen healthy before (by this controller as a standby, before the
            # state it restored was saved) was a success, even if it is gone by now.
            for event in self.breaker.observe(
                healthy | ever | set(self._healthy_then_gone), present, now, grace, grace_from
            ):
                self._breaker_event(event, now, fleet)

    def _breaker_event(self, event: BreakerEvent, now: float, fleet: FleetView) -> None:
        if event.kind == "healthy":
            log.debug(event.message)
            return
        action = {"failed": "launch-failed", "tripped": "breaker-tripped", "closed": "breaker-closed"}[event.kind]
        ids = [event.instance_id] if event.instance_id else []
        self._record(
            Activity(now, action, 0, event.message, ids, self._last_status.desired, fleet.capacity, self.dry_run)
        )

    # -- the one act path ------------------------------------------------------------------------

    def apply(
        self,
        plan: Plan,
        fleet: FleetView,
        listed: list[ProviderInstance],
        now: float,
        snap: Snapshot | None = None,
        targets: dict[str, TargetState] | None = None,
    ) -> None:
        """Execute `plan`: resume launches in doubt, retry pending terminates, then every action in
        order, each through its gate; then move traffic (instances that finished preparing join
        their target groups; draining ones leave them, and are terminated once drained). Only here
        is dry run decided. `snap`/`targets`: this step's rows and target states (drains read them)."""
        for note in plan.notes:
            self._say(f"note:{note.split(':')[0]}", note, logging.WARNING)
        fenced = "" if self.dry_run else self.fence.may_act()
        self._say("fence", f"not acting: {fenced}" if fenced else "", logging.WARNING)
        if fenced:
            # A standby (or a leader whose lease lapsed): it decides every step, with its history
            # current, and acts on nothing: no launch, no terminate, no drain, no traffic change.
            return
        if not self.dry_run:
            for intent in list(self._intents.values()):
                self._launch(intent, listed, now, resumed=True)
            self._retry_terminates(now)
        owned = {i.instance_id for i in listed} | set(self._recent)
        accepted: set[str] = set()  # REPLACE targets whose terminate went through
        for action in plan.actions:
            if action.kind in (ActionKind.TERMINATE, ActionKind.REPLACE) and "terminate" in self._suspended:
                self._say(
                    f"suspended:{action.kind.value}:{','.join(action.instance_ids)}",
                    f"not terminating {', '.join(action.instance_ids)}: terminate suspended "
                    f"(helix-ctl resume terminate); wanted: {action.cause}",
                    logging.WARNING,
                )
                continue
            if action.kind in (ActionKind.TERMINATE, ActionKind.REPLACE):
                accepted |= self._apply_terminate(action, owned, plan, fleet, now)
            elif action.replaces and action.replaces not in accepted:
                self._say(
                    f"replace:{action.replaces}",
                    f"replacement of {action.replaces} waits: its terminate did not go through (retried with back-off)",
                    logging.WARNING,
                )
            else:
                self._apply_launch(action, listed, plan, fleet, now)
        if not self.dry_run and not self.fence.may_act():
            self._join_traffic(fleet, listed)
            rows = {r.instance_id: r for r in snap.instances()} if snap is not None else None
            self._advance_drains(rows, dict(targets or {}), now, fleet)
            self._tend_pool(rows, listed, now, plan, fleet)

    def _apply_terminate(self, action: Action, owned: set[str], plan: Plan, fleet: FleetView, now: float) -> set[str]:
        # The terminate gate: only instances the provider lists as ours (or that we launched and
        # it does not list yet). Planners only pick from the fleet, so a refusal here is a bug.
        ids = [i for i in action.instance_ids if i in owned]
        refused = [i for i in action.instance_ids if i not in owned]
        if refused:
            self._log_error(f"terminate gate: refusing {', '.join(refused)}: not listed as instances of this group")
        if not ids:
            return set()
        self._record(
            Activity(now, action.kind.value, len(ids), action.cause, ids, plan.desired, fleet.capacity, self.dry_run)
        )
        if self.dry_run:
            return set(ids)
        if action.kind == ActionKind.TERMINATE:
            for instance_id in ids:
                self.breaker.forget(instance_id)  # our own choice, not a verdict on the launch
        # An instance that served (or is in its target groups) drains first; it is as good as gone
        # for the plan (condemned: billable, never capacity), so a replacement may launch meanwhile.
        served = {m.instance_id for m in fleet.members if m.prepared} | self._in_traffic
        draining = [i for i in ids if i in served and (self.cfg.drain_timeout > 0 or i in self._in_traffic)]
        for instance_id in draining:
            self._drains[instance_id] = start_drain(now, action.cause[:200], self.cfg.drain_timeout, action.drain_by)
        if draining:
            log.info(
                "draining %s before terminating it (at most %gs): %s",
                ", ".join(draining),
                self._drains[draining[0]].deadline - now,
                action.cause,
            )
            self._save_state()
        at_once = [i for i in ids if i not in draining]
        if at_once and not self._terminate(at_once, action.cause, now):
            return set(draining)
        return set(ids)

    # -- traffic: join once prepared, leave and drain before terminate ------------------------------

    def _target_states(self, known: list[ProviderInstance]) -> dict[str, TargetState]:
        """Each instance's state in the target groups ({} without any, or when the API fails: then
        nothing joins, nothing is judged by them, and drains wait for their timeout)."""
        if not self.traffic.enabled:
            return {}
        ids = sorted({i.instance_id for i in known} | self._in_traffic | set(self._drains))
        try:
            states = self.traffic.states(ids)
        except TrafficError as exc:
            self._say("traffic", f"cannot read the target groups ({exc}); drains wait for their timeout", logging.ERROR)
            return {}
        self._say("traffic", "", logging.INFO)
        return states

    def _join_traffic(self, fleet: FleetView, listed: list[ProviderInstance]) -> None:
        if not self.traffic.enabled:
            return
        joining = sorted(m.instance_id for m in fleet.members if m.prepared and m.instance_id not in self._in_traffic)
        if joining:
            try:
                self.traffic.register(joining)
            except TrafficError as exc:
                self._say(
                    "traffic:join", f"cannot add {', '.join(joining)} to the target groups ({exc})", logging.ERROR
                )
            else:
                self._say("traffic:join", "", logging.INFO)
                self._in_traffic.update(joining)
                log.info("%s joined the target groups: in service", ", ".join(joining))
                self._save_state()
        # One that vanished while registered (died, or terminated by someone else) is taken out,
        # so the load balancer is never left pointing at an instance that is gone.
        present = {i.instance_id for i in listed} | set(self._recent)
        gone = sorted(self._in_traffic - present - set(self._drains))
        if gone:
            try:
                self.traffic.deregister(gone)
            except TrafficError as exc:
                self._say(
                    "traffic:gone",
                    f"cannot remove {', '.join(gone)} (gone) from the target groups ({exc})",
                    logging.ERROR,
                )
            else:
                self._in_traffic.difference_update(gone)
                self._save_state()

    def _advance_drains(
        self, rows: dict[str, InstanceRow] | None, targets: dict[str, TargetState], now: float, fleet: FleetView
    ) -> None:
        """`rows` None: the table is unreadable (hooks are judged by their deadline alone)."""
        leaving = sorted(i for i, d in self._drains.items() if not d.left_traffic_at)
        if leaving:
            try:
                self.traffic.deregister(leaving)
            except TrafficError as exc:
                for instance_id in leaving:
                    self._drains[instance_id].error = str(exc)[:200]
                self._say(
                    "traffic:leave",
                    f"holding the terminate of {', '.join(leaving)}: cannot remove it from the target groups ({exc})",
                    logging.ERROR,
                )
            else:
                self._say("traffic:leave", "", logging.INFO)
                for instance_id in leaving:
                    self._drains[instance_id].left_traffic_at = now
                    self._drains[instance_id].error = ""
                    self._in_traffic.discard(instance_id)
                    # Just deregistered: what the target groups said a moment ago is out of date.
                    targets.pop(instance_id, None)
        done: list[tuple[str, str]] = []
        for instance_id, drain in self._drains.items():
            target = targets.get(instance_id) if self.traffic.enabled else TargetState.UNUSED
            lb = traffic_verdict(drain, target, now, self.cfg.drain_timeout)
            hook = ""
            if lb:
                row = rows.get(instance_id) if rows is not None else None
                hook = hook_verdict(drain, row, now, table_read=rows is not None)
            if lb and hook:
                done.append((instance_id, f"{hook}; {lb}" if self.traffic.enabled else hook))
        for instance_id, why in done:
            drain = self._drains.pop(instance_id)
            self._record(
                Activity(
                    now,
                    "drained",
                    1,
                    f"drained in {now - drain.since:.1f}s ({why}); terminating: {drain.cause}",
                    [instance_id],
                    self._last_status.desired,
                    fleet.capacity,
                    self.dry_run,
                )
            )
            self._terminate([instance_id], drain.cause, now)
        if leaving or done:
            self._save_state()

    def _apply_launch(
        self, action: Action, listed: list[ProviderInstance], plan: Plan, fleet: FleetView, now: float
    ) -> None:
        # Warm instances first: they serve in seconds, a launch only after its boot.
        started = self._start_warm(action, listed, plan, fleet, now)
        if started >= action.count:
            return
        action = dataclasses.replace(action, count=action.count - started)
        below_min = max(0, self._bounds.min - fleet.capacity - started)
        count, why = self._launch_gate(action.count, listed, now, below_min=below_min)
        if count < action.count:
            self._say("launch-gate", f"launch of {action.count} cut to {count}: {why}", logging.WARNING)
        else:
            self._say("launch-gate", "", logging.INFO)
        if count <= 0:
            return
        self._record(
            Activity(now, ActionKind.LAUNCH.value, count, action.cause, [], plan.desired, fleet.capacity, self.dry_run)
        )
        if self.dry_run:
            return
        config = self._launch_config().as_dict()
        self._launch(
            Intent(self.new_token(), count, action.cause[:300], action.replaces, now, config=config), listed, now
        )

    def _budget(self, listed: list[ProviderInstance]) -> Budget:
        recent = {instance_id: token for instance_id, (_, token, _) in self._recent.items()}
        max_prepared = self.cfg.effective_max_prepared if self.cfg.warm_pool_size > 0 or self._pool else 0
        return Budget.build(self._bounds.max, listed, recent, list(self._intents.values()), max_prepared)

    # -- the warm pool ----------------------------------------------------------------------------

    def _start_warm(
        self, action: Action, listed: list[ProviderInstance], plan: Plan, fleet: FleetView, now: float
    ) -> int:
        """Start up to `action.count` stopped warm-pool instances (oldest first) through the fence
        and the budget (each started one is billed for compute again); how many were started."""
        stopped = sorted(
            (i for i in listed if i.instance_id in self._pool and i.state == "stopped"),
            key=lambda i: (i.launched_at, i.instance_id),
        )
        if not stopped:
            return 0
        fenced = "" if self.dry_run else self.fence.may_act()
        if fenced or "launch" in self._suspended:
            return 0
        count = self._budget(listed).allow_start(min(action.count, len(stopped)))
        if count <= 0:
            return 0
        ids = [i.instance_id for i in stopped[:count]]
        self._record(Activity(now, "start-warm", count, action.cause, ids, plan.desired, fleet.capacity, self.dry_run))
        if self.dry_run:
            return count
        try:
            self.provider.start(ids)
        except Exception as exc:  # noqa: BLE001 - launch cold instead; the pool instances stay stopped
            self._log_error(f"cannot start warm-pool instance(s) {', '.join(ids)} ({exc}); launching instead")
            return 0
        for instance_id in ids:
            self._pool.discard(instance_id)
            self._started_at[instance_id] = now
            if action.replaces:
                self._replacing.setdefault(instance_id, now)
        _restate(listed, ids, "pending")
        self._save_state()
        return count

    def _tend_pool(
        self,
        rows: dict[str, InstanceRow] | None,
        listed: list[ProviderInstance],
        now: float,
        plan: Plan,
        fleet: FleetView,
    ) -> None:
        """Keep HELIX_WARM_POOL_SIZE instances prepared and stopped: stop pool launches once their
        launch hook said CONTINUE; terminate those that abandoned it or never got there within the
        health grace; launch more when the pool is short (through the launch gate, like any launch:
        running instances stay within HELIX_MAX_INSTANCES, every instance within the prepared cap)."""
        by_id = {i.instance_id: i for i in listed}
        self._pool &= set(by_id) | set(self._recent)
        self._started_at = {i: t for i, t in self._started_at.items() if i in by_id}
        # An instance of ours stopped outside the pool (by hand, or the pool shrank) is not capacity
        # and would bill its disks forever: the pool adopts it while short, else it goes.
        strays = sorted(
            i
            for i, inst in by_id.items()
            if inst.state == "stopped" and i not in self._pool and i not in self._condemned and i not in self._drains
        )
        for instance_id in strays[: max(0, self.cfg.warm_pool_size - len(self._pool))]:
            self._pool.add(instance_id)
            log.info("warm pool: adopted %s, found stopped", instance_id)
        gone = [i for i in strays if i not in self._pool]
        if gone:
            self._record(
                Activity(
                    now,
                    "terminate",
                    len(gone),
                    "stopped outside the warm pool",
                    gone,
                    plan.desired,
                    fleet.capacity,
                    self.dry_run,
                )
            )
            self._terminate(gone, "stopped outside the warm pool", now)
        to_stop, failed = [], []
        for instance_id in sorted(self._pool):
            inst = by_id.get(instance_id)
            if inst is None or inst.state in ("stopped", "terminating"):
                continue
            row = rows.get(instance_id) if rows is not None else None
            if _prepared(row):
                to_stop.append(instance_id)
            elif (row is not None and row.lifecycle == Lifecycle.ABANDONED) or (
                rows is not None and now - inst.launched_at > self.cfg.effective_health_grace
            ):
                failed.append(instance_id)
        if to_stop and not self.fence.may_act():
            try:
                self.provider.stop(to_stop)
            except Exception as exc:  # noqa: BLE001 - retried next step; meanwhile they run (billed, not capacity)
                self._say("pool:stop", f"cannot stop warm-pool instance(s) {', '.join(to_stop)} ({exc})", logging.ERROR)
            else:
                self._say("pool:stop", "", logging.INFO)
                log.info("warm pool: %s prepared and stopped", ", ".join(to_stop))
                _restate(listed, to_stop, "stopped")
        if failed:
            self._pool.difference_update(failed)
            self._record(
                Activity(
                    now,
                    "terminate",
                    len(failed),
                    "warm-pool launch never prepared (launch hook abandoned, or not within the health grace)",
                    failed,
                    plan.desired,
                    fleet.capacity,
                    self.dry_run,
                )
            )
            self._terminate(failed, "warm-pool launch never prepared", now)
        in_doubt = sum(it.count for it in self._intents.values() if it.warm)
        short = self.cfg.warm_pool_size - len(self._pool) - in_doubt
        if short <= 0:
            return
        count, why = self._launch_gate(short, listed, now)
        self._say(
            "pool:refill",
            f"warm pool short by {short}, launching {count}: {why}" if count < short else "",
            logging.INFO,
        )
        if count > 0:
            cause = f"keeping the warm pool at HELIX_WARM_POOL_SIZE={self.cfg.warm_pool_size}"
            self._record(Activity(now, "launch-warm", count, cause, [], plan.desired, fleet.capacity, self.dry_run))
            config = self._launch_config().as_dict()
            self._launch(Intent(self.new_token(), count, cause, "", now, warm=True, config=config), listed, now)

    def _launch_gate(
        self, wanted: int, listed: list[ProviderInstance], now: float, token: str = "", below_min: int = 0
    ) -> tuple[int, str]:
        """How many of `wanted` may launch now, and why fewer. Every launch asks here."""
        fenced = "" if self.dry_run else self.fence.may_act()
        if fenced:
            return 0, f"not acting: {fenced}"
        if "launch" in self._suspended:
            return 0, "launch suspended (helix-ctl resume launch)"
        budget = self._budget(listed)
        count = budget.allow(wanted, token)
        why = ""
        if count < wanted:
            why = (
                f"{budget.billable - budget.in_doubt.get(token, 0)} instance(s) may be billed "
                f"({budget.listed} listed, {budget.unlisted} launched not yet listed, "
                f"{sum(budget.in_doubt.values())} in doubt), "
                + (
                    f"HELIX_MAX_INSTANCES={budget.max_instances}"
                    if self._bounds.source == "settings"
                    else f"max {budget.max_instances} ({self._bounds.source})"
                )
            )
        if not token:  # a launch in doubt was already let through; finishing it starts nothing new
            allowed, breaker_why = self.breaker.allowed(count, now, below_min)
            if allowed < count:
                count, why = allowed, breaker_why
        return count, why

    def new_token(self) -> str:
        return f"{token_prefix(self.cfg.group_name)}{uuid.uuid4().hex[:TOKEN_HEX]}"

    def _launch(self, intent: Intent, listed: list[ProviderInstance], now: float, resumed: bool = False) -> None:
        """One launch call under `intent`, recorded before the call so a crash at any point leaves
        it in doubt (resumed under the same token, never launched twice)."""
        if resumed:
            # What the intent may still add is checked afresh against the budget; cut to 0, the
            # call only looks up what it launched, which resolves the doubt.
            budget = self._budget(listed)
            seen = intent.count - budget.in_doubt.get(intent.token, 0)
            extra, why = self._launch_gate(budget.in_doubt.get(intent.token, 0), listed, now, intent.token)
            if extra < budget.in_doubt.get(intent.token, 0):
                self._say(
                    f"intent:{intent.token}",
                    f"resumed launch {intent.token} cut to {seen + extra}: {why}",
                    logging.WARNING,
                )
            count = seen + extra
            if why.startswith("not acting"):
                return
        else:
            count = intent.count
        config = LaunchConfig.of(intent.config) if intent.config else self._settings_config()
        self._known_configs[config.digest] = config.as_dict()
        self._intents[intent.token] = intent
        self._save_state(durable=True)
        # Checked again right before the call (after the intent is in the store): a lease can lapse
        # in the middle of a step, and the next leader resumes the intent under the same token.
        fenced = self.fence.may_act()
        if fenced:
            self._say("fence", f"not acting: {fenced}", logging.WARNING)
            return
        try:
            launched = self.provider.launch(count, intent.token, config, epoch=self._epoch())
        except LaunchError as exc:
            # Definitive for this call only. A first call launched nothing; a retry of a launch in
            # doubt may still have instances from the earlier call that the listing does not show
            # yet, so its doubt is kept until the listing has had time to show them.
            if resumed and now - intent.created_at <= LAUNCH_VISIBILITY_SECONDS:
                self._log_error(
                    f"resumed launch {intent.token} refused ({exc}); still in doubt until the listing "
                    "can show what its first call launched"
                )
                return
            self._log_error(f"launch of {count} failed: {exc}")
            del self._intents[intent.token]
            self._save_state()
            return
        except Exception as exc:  # noqa: BLE001 - maybe a lost reply: in doubt, resumed next step
            self._log_error(
                f"launch {intent.token} of {count} did not complete ({exc!r}); in doubt: counted as "
                "billable and retried with the same token"
            )
            return
        del self._intents[intent.token]
        for inst in launched:
            self._recent[inst.instance_id] = (inst, intent.token, now + LAUNCH_VISIBILITY_SECONDS)
            if intent.warm:
                self._pool.add(inst.instance_id)
            else:
                self._booting[inst.instance_id] = inst.launched_at or now
            if intent.replaces:
                self._replacing.setdefault(inst.instance_id, inst.launched_at or now)
        # Every answered instance is judged once, from its own launch time (a resumed launch's
        # instances may be listed, even healthy, by now: healthy ones pass at once).
        self.breaker.launched(
            [(i.instance_id, i.launched_at) for i in launched if i.instance_id not in self._ever_healthy],
            now,
            pooled=intent.warm,
        )
        self._save_state()
        if launched or not resumed:
            log.info(
                "launched %s%s",
                ", ".join(f"{i.instance_id} in {i.zone}" for i in launched) or "nothing",
                f" (resumed launch {intent.token})" if resumed else "",
            )

    def _terminate(self, ids: list[str], cause: str, now: float) -> bool:
        # Checked again right before the call: a lease can lapse in the middle of a step.
        fenced = self.fence.may_act()
        if fenced:
            self._say("fence", f"not acting: {fenced}", logging.WARNING)
            return False
        for instance_id in ids:
            self._condemned.setdefault(instance_id, _Condemned(now, cause[:200]))
        try:
            self.provider.terminate(ids)
        except Exception as exc:  # noqa: BLE001 - kept condemned; retried with back-off, never replaced meanwhile
            for instance_id in ids:
                c = self._condemned[instance_id]
                c.attempts += 1
                c.next_try = now + min(TERMINATE_BACKOFF_CAP, self.cfg.effective_control_interval * 2**c.attempts)
                c.error = str(exc)[:200]
            self._say(
                f"terminate:{','.join(ids)}",
                f"terminate of {', '.join(ids)} failed ({exc}); retrying with "
                f"back-off, next in {self._condemned[ids[0]].next_try - now:.0f}s",
                logging.ERROR,
            )
            self._save_state()
            return False
        for instance_id in ids:
            c = self._condemned[instance_id]
            c.attempts, c.error, c.next_try = 0, "", now + TERMINATE_RECHECK_SECONDS
            self._recent.pop(instance_id, None)
        self._save_state()
        return True

    def _retry_terminates(self, now: float) -> None:
        fenced = self.fence.may_act()
        due = sorted(i for i, c in self._condemned.items() if c.next_try <= now)
        if due and not fenced:
            self._terminate(due, self._condemned[due[0]].cause, now)

    # -- reporting -------------------------------------------------------------------------------

    def _record(self, activity: Activity) -> None:
        if self.dry_run:
            # Nothing changes in a dry run, so the same decision comes back every step: say it once.
            key = (activity.action, activity.count, tuple(activity.instance_ids))
            if key == self._last_logged:
                return
            self._last_logged = key
        self.activity.record(activity)

    def _write_status(
        self,
        now: float,
        desired: int,
        action: str,
        reason: str,
        fleet: FleetView | None = None,
        snap: Snapshot | None = None,
        billable: int | None = None,
    ) -> None:
        status = ControllerStatus(
            pid=os.getpid(),
            desired=desired,
            in_service=len(fleet.in_service) if fleet else self._last_status.in_service,
            pending=len(fleet.pending) if fleet else self._last_status.pending,
            heartbeat=now,
            decision_at=now,
            frozen=self.frozen,
            dry_run=self.dry_run,
            action=action,
            reason=reason,
            policy=getattr(self.policy, "name", self.cfg.policy)[:16],
            breaker=self.breaker.tripped,
            breaker_failures=self.breaker.consecutive,
            billable=self._last_status.billable if billable is None else billable,
            max_instances=self.cfg.max_instances,
            table_problems=len(snap.problems) if snap is not None else self._last_status.table_problems,
        )
        try:
            self.table.write_controller(status)
        except Exception as exc:  # noqa: BLE001 - a broken table must not stop the loop
            self._say("table-write", f"cannot write the controller's status to the table: {exc!r}", logging.ERROR)
        self._last_status = status

    def _say(self, topic: str, message: str, level: int) -> None:
        """Log `message` once per change of what is said about `topic` ('' = the condition ended)."""
        if self._said.get(topic, "") == message:
            return
        self._said[topic] = message
        if message:
            log.log(level, message)

    def _log_error(self, message: str) -> None:
        # The same error every second is one line a minute, not sixty.
        last, at = self._last_error
        now = time.monotonic()
        if message != last or now - at > 60:
            log.error(message)
            self._last_error = (message, now)

    # -- the leader lease (HELIX_LEASE): standby, then leader --------------------------------------

    def _epoch(self) -> int:
        return self.fence.epoch

    def _follow_lease(self, now: float) -> None:
        """On becoming the leader (a new epoch we hold), take the state the last leader left in the
        store before acting: its launches in doubt (resumed under the same tokens), terminates and
        drains in flight, the breaker, overrides, suspended processes and refresh progress. The
        policy's history is this controller's own: it decided every step as a standby."""
        epoch = self._epoch()
        if not epoch or epoch == self._leader_epoch or self.fence.may_act():
            return
        # What this controller saw healthy itself is kept: the last leader's saved view may lag (a
        # verdict it had no time to save), and a launch seen healthy must not count as failed.
        seen_healthy = self._ever_healthy | set(self._healthy_then_gone)
        self._reset_persisted()
        self._load_state()
        self._ever_healthy |= seen_healthy
        self._leader_epoch = epoch
        log.warning(
            "leader now (epoch %d): state restored from the store (%d launch(es) in doubt, %d terminate(s) "
            "and %d drain(s) in flight)",
            epoch,
            len(self._intents),
            len(self._condemned),
            len(self._drains),
        )

    def _reset_persisted(self) -> None:
        self._intents.clear()
        self._recent.clear()
        self._condemned.clear()
        self._drains.clear()
        self._in_traffic = set()
        self._pool = set()
        self._started_at, self._booting, self._boot_samples, self._replacing = {}, {}, [], {}
        self._ever_healthy = set()
        self._override, self._suspended, self._refresh, self._lifetime = None, set(), None, None
        self._known_configs, self._ctl_schedule = {}, {}
        self.breaker = ChurnBreaker(self.cfg.breaker_failures, self.cfg.breaker_window)
        self._saved_state = ""

    # -- operator control: bounds, overrides, suspended processes (helix-ctl) ----------------------

    def _schedule(self) -> tuple[schedule.ScheduledAction, ...]:
        """HELIX_SCHEDULE's actions, then those added with helix-ctl (parsed when added)."""
        added = tuple(a for text in self._ctl_schedule.values() for a in schedule.parse_schedule(text))
        return tuple(self.cfg.schedule) + added

    def _scheduled(self, now: float) -> Scheduled | None:
        actions = self._schedule()
        if not actions or "scheduled" in self._suspended:
            return None
        current = schedule.active(actions, now)
        if current is None:
            return None
        a = current.action
        return Scheduled(a.name, a.min, a.max, a.desired)

    def _update_bounds(self, now: float, quiet: bool = False) -> None:
        """The bounds in force (operator.py's precedence): an override that expired is dropped
        (one activity entry), and a change reaches the policy and the log."""
        if self._override is not None and self._override.expired(now):
            gone, self._override = self._override, None
            self._record(
                Activity(
                    now,
                    "override-expired",
                    0,
                    f"capacity override by {gone.who} expired" + (f" ({gone.reason})" if gone.reason else ""),
                    [],
                    self._last_status.desired,
                    self._fleet_counts["capacity"],
                    self.dry_run,
                )
            )
        bounds = resolve_bounds(
            self.cfg.min_instances, self.cfg.max_instances, self._scheduled(now), self._override, now
        )
        if bounds == self._bounds:
            return
        before, self._bounds = self._bounds, bounds
        self.policy.set_bounds(bounds.min, bounds.max, bounds.desired, bounds.source)
        if not quiet:
            self._record(
                Activity(
                    now,
                    "bounds",
                    0,
                    f"now {bounds.describe()}; were {before.describe()}",
                    [],
                    self._last_status.desired,
                    self._fleet_counts["capacity"],
                    self.dry_run,
                )
            )

    def _observe_metrics(self, plan: Plan, fleet: FleetView) -> None:
        if self.metrics is None:
            return
        active = self._active_refresh()
        self.metrics.observe_status(
            desired=plan.desired,
            in_service=len(fleet.in_service),
            pending=len(fleet.pending),
            draining=len(self._drains),
            frozen=self.frozen,
            breaker=self.breaker.tripped,
            min_=self._bounds.min,
            max_=self._bounds.max,
            suspended=self._suspended,
            refresh_percent=active.percent if active is not None else None,
        )

    def _active_refresh(self) -> Refresh | None:
        if self._refresh is not None and self._refresh.state.active:
            return self._refresh
        return self._lifetime

    def ctl_status(self) -> dict:
        """`helix-ctl status`: what the last step saw and what steers the next."""
        now = self.clock()
        st = self._last_status
        actions = self._schedule()
        upcoming = schedule.next_fire(actions, now) if actions else None
        shown = self._refresh if self._refresh is not None else self._lifetime
        if self._lifetime is not None and (self._refresh is None or not self._refresh.state.active):
            shown = self._lifetime
        return {
            "desired": st.desired,
            "in_service": st.in_service,
            "pending": st.pending,
            "draining": len(self._drains),
            "capacity": self._fleet_counts["capacity"],
            "frozen": self.frozen,
            "dry_run": self.dry_run,
            "policy": st.policy,
            "breaker": {"tripped": self.breaker.tripped, "failures": self.breaker.consecutive},
            "suspended": sorted(self._suspended, key=PROCESSES.index),
            "bounds": {
                "min": self._bounds.min,
                "max": self._bounds.max,
                "desired": self._bounds.desired,
                "source": self._bounds.source,
            },
            "override": self._override.to_json() if self._override is not None else None,
            "refresh": shown.status() if shown is not None else None,
            "next_scheduled": (
                {
                    "name": upcoming[0].name,
                    "at": upcoming[1],
                    "min": upcoming[0].min,
                    "max": upcoming[0].max,
                    "desired": upcoming[0].desired,
                }
                if upcoming is not None
                else None
            ),
            "lifetime": self.cfg.max_instance_lifetime,
            "action": st.action,
            "reason": st.reason,
        }

    def handle_ctl(self, op: str, args: dict, caller: Caller, reason: str) -> dict:
        """One helix-ctl request (ctlserver.py has checked its shape). Runs between two steps;
        every change is one activity entry naming who asked and why, and is saved at once."""
        if op == "history":
            return {"entries": self._history(args)}
        with self.lock:
            now = self.clock()
            if op == "status":
                return self.ctl_status()
            fenced = self.fence.may_act()
            if fenced and not (op in ("refresh", "schedule") and args["action"] in ("status", "list")):
                # A standby's change would live only in its memory (it writes nothing to the store).
                raise CtlError(f"{fenced}: run helix-ctl on the manager that holds the lease", code="refused")
            who = f"{caller.user} (uid {caller.uid}, pid {caller.pid})"
            why = f": {reason}" if reason else ""
            if op == "set-capacity":
                message = self._set_capacity(args, caller.user, reason, now)
            elif op in ("suspend", "resume"):
                message = self._suspend(op, args["processes"])
            elif op == "schedule":
                if args["action"] == "list":
                    return {"actions": self._schedule_list(now)}
                message = self._schedule_change(args, now)
            elif op == "refresh":
                if args["action"] == "status":
                    shown = self._refresh if self._refresh is not None else self._lifetime
                    return {"refresh": shown.status() if shown is not None else None}
                message = self._refresh_request(args, caller.user, reason, now)
            else:
                raise CtlError(f"op={op!r}: expected a known operation")
            self._record(
                Activity(
                    now,
                    op if op not in ("refresh", "schedule") else f"{op}-{args['action']}",
                    0,
                    f"{message}; by {who}{why}",
                    [],
                    self._last_status.desired,
                    self._fleet_counts["capacity"],
                    self.dry_run,
                )
            )
            self._save_state()
            return {"message": message, "status": self.ctl_status()}

    def _set_capacity(self, args: dict, user: str, reason: str, now: float) -> str:
        if args["clear"]:
            if self._override is None:
                raise CtlError("clear: there is no capacity override to clear")
            self._override = None
            self._update_bounds(now, quiet=True)
            return f"capacity override cleared: {self._bounds.describe()}"
        without = resolve_bounds(self.cfg.min_instances, self.cfg.max_instances, self._scheduled(now), None, now)
        problems = check_override(without, args["min"], args["max"], args["desired"])
        if problems:
            raise CtlError(problems[0])
        until = now + args["for"] if args["for"] else None
        self._override = Override(args["min"], args["max"], args["desired"], until, user, reason, now)
        self._update_bounds(now, quiet=True)
        expiry = f" for {args['for']:g}s" if until else " until cleared"
        return f"capacity override{expiry}: {self._bounds.describe()}"

    def _suspend(self, op: str, names: list[str]) -> str:
        processes, problems = parse_processes(names)
        if problems:
            raise CtlError(problems[0])
        if op == "suspend":
            self._suspended.update(processes)
        else:
            self._suspended.difference_update(processes)
        shown = ", ".join(sorted(self._suspended, key=PROCESSES.index)) or "none"
        return f"{'suspended' if op == 'suspend' else 'resumed'} {', '.join(processes)}; suspended now: {shown}"

    def _schedule_list(self, now: float) -> list[dict]:
        out = []
        for action in self._schedule():
            source = "ctl" if action.name in self._ctl_schedule else "settings"
            text = self._ctl_schedule.get(action.name, "")
            out.append(
                {
                    "name": action.name,
                    "source": source,
                    "spec": text or action.describe(),
                    "next": schedule.fire_after(action, now),
                }
            )
        return out

    def _schedule_change(self, args: dict, now: float) -> str:
        if args["action"] == "remove":
            name = args["name"]
            if name not in self._ctl_schedule:
                where = (
                    " (it is in HELIX_SCHEDULE: edit the settings)"
                    if any(a.name == name for a in self.cfg.schedule)
                    else ""
                )
                raise CtlError(f"name={name!r}: expected a scheduled action added with helix-ctl{where}")
            del self._ctl_schedule[name]
            self._update_bounds(now, quiet=True)
            return f"scheduled action {name!r} removed"
        try:
            [action] = schedule.parse_schedule(args["spec"]) or [None]
        except schedule.ScheduleError as exc:
            raise CtlError(f"spec={args['spec']!r}: expected {exc}") from None
        except ValueError:
            raise CtlError(f"spec={args['spec']!r}: expected exactly one scheduled action") from None
        if action is None:
            raise CtlError(f"spec={args['spec']!r}: expected exactly one scheduled action")
        if any(a.name == action.name for a in self._schedule()):
            raise CtlError(f"name={action.name!r}: expected a name no scheduled action has yet")
        self._ctl_schedule[action.name] = args["spec"]
        self._update_bounds(now, quiet=True)
        upcoming = schedule.fire_after(action, now)
        return (
            f"scheduled action {action.describe()} added; next fires at {upcoming:.0f}"
            if upcoming
            else (f"scheduled action {action.describe()} added; it never fires again")
        )

    def _refresh_request(self, args: dict, user: str, reason: str, now: float) -> str:
        action = args["action"]
        current = self._refresh if self._refresh is not None and self._refresh.state.active else None
        if action == "start":
            if current is not None:
                raise CtlError(f"refresh {current.id} is {current.state.value}: cancel it first")
            cfg = self.cfg
            spec = RefreshSpec(
                min_healthy=cfg.min_healthy_percentage if args["min_healthy"] is None else args["min_healthy"],
                max_healthy=cfg.max_healthy_percentage if args["max_healthy"] is None else args["max_healthy"],
                warmup=cfg.effective_refresh_warmup if args["warmup"] is None else args["warmup"],
                checkpoints=tuple(args["checkpoints"] or ()),
                checkpoint_delay=3600.0 if args["checkpoint_delay"] is None else args["checkpoint_delay"],
                skip_matching=args["skip_matching"],
                auto_rollback=args["auto_rollback"],
                allow_above_max=args["allow_above_max"],
            )
            problems = spec.problems()
            if problems:
                raise CtlError(problems[0])
            target = self._settings_config()
            members = self._last_members
            refresh = Refresh(
                id=f"refresh-{uuid.uuid4().hex[:8]}",
                kind="refresh",
                spec=spec,
                target=target.as_dict(),
                previous=None,
                started_at=now,
                who=user,
                reason=reason,
            )
            old = outdated(refresh, members, now)
            digests = Counter(m.instance.config for m in old if m.instance.config)
            if digests:
                refresh.previous = self._known_configs.get(digests.most_common(1)[0][0])
            refresh.total = len(old)
            self._refresh = refresh
            self._lifetime = None  # a refresh replaces expired instances too, and it goes first
            known = (
                ""
                if refresh.previous is not None or not old
                else "; the previous configuration is unknown: no rollback"
            )
            return (
                f"refresh {refresh.id} started: {len(old)} instance(s) to replace with {target.describe()} "
                f"(min healthy {spec.min_healthy:g}%, max healthy {spec.max_healthy:g}%, warm-up {spec.warmup:g}s){known}"
            )
        if current is None:
            raise CtlError(f"action={action}: expected a refresh in progress (there is none)")
        if action == "cancel":
            self._refresh = cancel(current, now, f"cancelled by {user}")
            return f"refresh {current.id} cancelled at {current.percent:.0f}%: instances already replaced stay"
        self._refresh = start_rollback(current, now, f"rollback asked by {user}")
        if self._refresh.state == RefreshState.FAILED:
            raise CtlError(f"refresh {current.id}: cannot roll back: the previous launch configuration is not known")
        return f"refresh {current.id} rolling back to {LaunchConfig.of(self._refresh.target).describe()}"

    def _history(self, args: dict) -> list[dict]:
        """The activity log's entries (HELIX_ACTIVITY_LOG), newest last, filtered."""
        path = self.cfg.activity_log
        if not path:
            raise CtlError("history: HELIX_ACTIVITY_LOG is not set, so no activity is kept", code="refused")
        out: list[dict] = []
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(entry, dict):
                        continue
                    if args.get("since") is not None and float(entry.get("time", 0)) < args["since"]:
                        continue
                    if args.get("action") and entry.get("action") != args["action"]:
                        continue
                    out.append(entry)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CtlError(f"history: cannot read {path}: {exc.strerror}", code="internal") from None
        return out[-int(args.get("limit") or 100) :]

    # -- operator requests -----------------------------------------------------------------------

    def _take_reset_request(self, now: float) -> None:
        """`python -m controller_asg.breaker_cli reset` leaves a request file; consume it."""
        try:
            with open(self.reset_path, encoding="utf-8") as fh:
                who = fh.read(200).strip() or "the operator"
            os.unlink(self.reset_path)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._say("reset", f"cannot read the breaker reset request {self.reset_path}: {exc}", logging.ERROR)
            return
        events = self.breaker.reset(now, who)
        if not events:
            log.info("breaker reset requested by %s: it was not tripped", who)
        for event in events:
            self._record(
                Activity(
                    now,
                    "breaker-closed",
                    0,
                    event.message,
                    [],
                    self._last_status.desired,
                    self._last_status.in_service + self._last_status.pending,
                    self.dry_run,
                )
            )
        self._save_state()

    # -- persistence -----------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "intents": [asdict(it) for it in self._intents.values()],
            "recent": {
                i: {"instance": asdict(inst), "token": token, "until": until}
                for i, (inst, token, until) in self._recent.items()
            },
            "condemned": {i: asdict(c) for i, c in self._condemned.items()},
            "drains": {i: asdict(d) for i, d in self._drains.items()},
            "in_traffic": sorted(self._in_traffic),
            "pool": sorted(self._pool),
            "started_at": self._started_at,
            "booting": self._booting,
            "boot_samples": self._boot_samples,
            "replacing": self._replacing,
            "ever_healthy": sorted(self._ever_healthy),
            "breaker": self.breaker.export_state(),
            "override": self._override.to_json() if self._override is not None else None,
            "suspended": sorted(self._suspended),
            "refresh": self._refresh.to_json() if self._refresh is not None else None,
            "lifetime": self._lifetime.to_json() if self._lifetime is not None else None,
            "known_configs": self._known_configs,
            "ctl_schedule": self._ctl_schedule,
        }

    def _save_state(self, durable: bool = False) -> None:
        """Write the state when it changed. `durable`: before a launch call, the intent must be
        on disk (fsync) or the call must not happen. Not while fenced: a standby's view is not the
        leader's state (and a deposed leader must not overwrite its successor's)."""
        if self.dry_run or self.fence.may_act():
            return
        text = json.dumps(self._state(), sort_keys=True)
        if text == self._saved_state:
            return
        try:
            self.store.save("state", text, durable=durable)
        except OSError as exc:
            if durable:
                raise  # no launch without its intent on disk
            self._log_error(f"cannot save the controller state to {self.state_path}: {exc}")
            return
        self._saved_state = text

    def _load_state(self) -> None:
        state: dict = {}
        try:
            text = self.store.load("state")
            state = json.loads(text) if text is not None else {}
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable controller state %s: %s", self.state_path, exc)
            state = {}
        self._load_operator_state(state)
        intents = list(state.get("intents", []) or [])
        try:  # the single-intent file of earlier versions
            with open(self.legacy_intent_path, encoding="utf-8") as fh:
                old = json.load(fh)
            intents.append(
                {"token": old.get("token"), "count": old.get("count"), "cause": old.get("reason", ""), "replaces": ""}
            )
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable launch intent %s: %s", self.legacy_intent_path, exc)
        for raw in intents:
            intent = self._valid_intent(raw)
            if intent is not None:
                self._intents[intent.token] = intent
                log.info(
                    "resuming launch %s of %d interrupted by a restart (same token: nothing doubles)",
                    intent.token,
                    intent.count,
                )
        try:
            for i, r in dict(state.get("recent", {})).items():
                self._recent[str(i)] = (ProviderInstance(**r["instance"]), str(r["token"]), float(r["until"]))
            for i, c in dict(state.get("condemned", {})).items():
                self._condemned[str(i)] = _Condemned(**c)
            for i, d in dict(state.get("drains", {})).items():
                self._drains[str(i)] = Drain(**d)
            self._in_traffic = {str(i) for i in state.get("in_traffic", [])}
            self._pool = {str(i) for i in state.get("pool", [])}
            self._started_at = {str(i): float(t) for i, t in dict(state.get("started_at", {})).items()}
            self._booting = {str(i): float(t) for i, t in dict(state.get("booting", {})).items()}
            self._boot_samples = [float(t) for t in list(state.get("boot_samples", []))][-BOOT_SAMPLES:]
            self._replacing = {str(i): float(t) for i, t in dict(state.get("replacing", {})).items()}
            self._ever_healthy = {str(i) for i in state.get("ever_healthy", [])}
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("ignoring part of the controller state %s: %s", self.state_path, exc)
        self.breaker = ChurnBreaker.from_state(
            dict(state.get("breaker", {}) or {}), self.cfg.breaker_failures, self.cfg.breaker_window
        )
        if self.breaker.tripped:
            log.warning(
                "the churn breaker is still tripped (%d launches in a row failed); "
                "`python -m controller_asg.breaker_cli reset` closes it",
                self.breaker.consecutive,
            )
        self._save_state()
        try:
            os.unlink(self.legacy_intent_path)
        except FileNotFoundError:
            pass

    def _load_operator_state(self, state: dict) -> None:
        """The override, suspended processes, refreshes and known configurations: each part that
        does not parse is dropped with one warning (the fleet is then steered by the settings)."""
        try:
            raw = state.get("override")
            self._override = Override.from_json(raw) if isinstance(raw, dict) else None
        except (TypeError, ValueError) as exc:
            log.warning("ignoring the saved capacity override: %s", exc)
        suspended = state.get("suspended", [])
        self._suspended = {str(p) for p in suspended if p in PROCESSES} if isinstance(suspended, list) else set()
        for key in ("refresh", "lifetime"):
            raw = state.get(key)
            try:
                value = Refresh.from_json(raw) if isinstance(raw, dict) else None
            except (TypeError, ValueError, KeyError) as exc:
                log.warning("ignoring the saved %s: %s", key, exc)
                value = None
            setattr(self, f"_{key}", value)
        added = state.get("ctl_schedule", {})
        for name, text in added.items() if isinstance(added, dict) else ():
            try:
                schedule.parse_schedule(str(text))
            except schedule.ScheduleError as exc:
                log.warning("dropping the scheduled action %r added with helix-ctl: %s", name, exc)
                continue
            self._ctl_schedule[str(name)] = str(text)
        configs = state.get("known_configs", {})
        if isinstance(configs, dict):
            self._known_configs = {
                str(d): {str(k): str(v) for k, v in c.items()} for d, c in configs.items() if isinstance(c, dict)
            }
        self._update_bounds(self.clock(), quiet=True)
        if self._suspended:
            log.warning("suspended processes (helix-ctl resume): %s", ", ".join(sorted(self._suspended)))
        if self._refresh is not None and self._refresh.state.active:
            log.info("resuming instance refresh %s (%s)", self._refresh.id, self._refresh.state.value)

    def _valid_intent(self, raw: object) -> Intent | None:
        """A resumed intent is trusted only in shape (the gate still checks what it may add)."""
        if not isinstance(raw, dict):
            log.warning("dropping a launch intent that is not an object: %r", raw)
            return None
        token, count = raw.get("token"), raw.get("count")
        if not valid_token(token, self.cfg.group_name):
            log.warning(
                "dropping launch intent %r: token=%r, expected %s followed by %d hex digits",
                raw,
                token,
                token_prefix(self.cfg.group_name),
                TOKEN_HEX,
            )
            return None
        ceiling = max(self.cfg.max_instances, self._bounds.max)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= ceiling:
            log.warning(
                "dropping launch intent %s: count=%r, expected an integer from 1 to HELIX_MAX_INSTANCES=%d",
                token,
                count,
                ceiling,
            )
            return None
        assert isinstance(token, str)
        config = raw.get("config") or {}
        if not isinstance(config, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in config.items()
        ):
            log.warning(
                "launch intent %s: config=%r is not a map of strings; launching from the settings'", token, config
            )
            config = {}
        return Intent(
            token,
            count,
            str(raw.get("cause", ""))[:300] or "resuming a launch interrupted by a restart",
            str(raw.get("replaces", ""))[:128],
            # Unknown (an older state file): as if made now, so its doubt lasts the full window.
            float(raw["created_at"]) if isinstance(raw.get("created_at"), (int, float)) else self.clock(),
            config=config,
        )

    def _load_history(self) -> None:
        try:
            text = self.store.load("history")
            if text is None:
                return
            self.policy.import_state(json.loads(text))
            log.info(
                "policy history restored from %s",
                self.history_path if isinstance(self.store, FileStore) else "the store",
            )
        except Exception as exc:  # noqa: BLE001 - a corrupt history costs learning, not the fleet
            log.warning("ignoring unreadable policy history %s: %s", self.history_path, exc)

    def save_history(self) -> None:
        if self.fence.may_act():
            return  # a standby's history is its own; the leader's is the one kept
        try:
            self.store.save("history", json.dumps(self.policy.export_state()), durable=True)
        except Exception as exc:  # noqa: BLE001
            self._log_error(f"cannot save policy history to {self.history_path}: {exc}")


def _restate(listed: list[ProviderInstance], ids: list[str], state: str) -> None:
    """This step's listing, as the calls just made it: every later gate in the step (the budget
    above all) must see a started instance as billed and a stopped one as not, not the listing's
    stale view (which let the pool refill launch past max in the same step as a start)."""
    changed = set(ids)
    for k, inst in enumerate(listed):
        if inst.instance_id in changed:
            listed[k] = dataclasses.replace(inst, state=state)


def _prepared(row: InstanceRow | None) -> bool:
    """A warm-pool launch is ready to stop once its launch hook said CONTINUE and it is healthy."""
    return row is not None and row.lifecycle == Lifecycle.IN_SERVICE and row.state == State.HEALTHY
