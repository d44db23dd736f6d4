"""The control loop: every interval, read the table and the provider, decide, act, report.

Everything that decides is pure and lives elsewhere (policy/, fleet.py, health.py,
termination.py); this module does the I/O around it and holds the few facts that must outlive
one step: in-flight launches, replacements under way, whether we are frozen.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from controller_asg.activity import Activity, ActivityLog
from controller_asg.fleet import FleetView, build_fleet
from controller_asg.health import plan_replacements
from controller_asg.policy.base import Policy
from controller_asg.providers.base import LaunchError, Provider, ProviderInstance
from controller_asg.termination import choose_victims
from shared.config import Config
from shared.table import ControllerStatus, MetricsTable, Snapshot

log = logging.getLogger("controller_asg")

# Fail static when MonitorS's heartbeat is older than this many poll intervals.
MONITOR_STALE_INTERVALS = 3.0
# A launch the provider has answered may take a while to show in its listing (EC2's
# DescribeInstances is eventually consistent): count it as capacity for this long meanwhile.
LAUNCH_VISIBILITY_SECONDS = 120.0
HISTORY_SAVE_SECONDS = 60.0


@dataclass
class _PendingLaunch:
    token: str
    count: int
    reason: str
    action: str  # launch | replace


class Controller:
    def __init__(self, cfg: Config, table: MetricsTable, provider: Provider, policy: Policy, *,
                 dry_run: bool = False, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.table = table
        self.provider = provider
        self.policy = policy
        self.dry_run = dry_run
        self.clock = clock
        self.activity = ActivityLog(cfg.activity_log)
        self.state_dir = os.path.join(cfg.state_dir, "controller")
        self.intent_path = os.path.join(self.state_dir, "launch-intent.json")
        self.history_path = cfg.history_file or os.path.join(cfg.state_dir, "history.json")
        self.frozen = False
        self._recent: dict[str, tuple[ProviderInstance, float]] = {}  # launched, maybe not listed yet
        self._replacing: set[str] = set()  # instances launched as replacements, until in service
        self._retry: _PendingLaunch | None = None
        self._last_status = ControllerStatus(pid=os.getpid(), policy=getattr(policy, "name", cfg.policy))
        self._last_logged: tuple = ()  # the last dry-run activity said
        self._once_key: tuple = ()  # the last repeated warning said
        self._last_error = ("", 0.0)
        self._history_saved_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Restore what must survive a restart: the policy's history and an unfinished launch."""
        os.makedirs(self.state_dir, exist_ok=True)
        self._load_history()
        try:
            with open(self.intent_path, encoding="utf-8") as fh:
                intent = json.load(fh)
            self._retry = _PendingLaunch(str(intent["token"]), int(intent["count"]),
                                         str(intent.get("reason", "resuming a launch interrupted by a restart")),
                                         str(intent.get("action", "launch")))
            log.info("resuming launch %s of %d interrupted by a restart (idempotent: nothing doubles)",
                     self._retry.token, self._retry.count)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable launch intent %s: %s", self.intent_path, exc)
            self._clear_intent()
        owned = self.provider.list_instances()
        live = [i for i in owned if i.state != "terminating"]
        log.info("adopted %d instance(s) the %s provider owns%s", len(live), self.provider.name,
                 f": {', '.join(i.instance_id for i in live)}" if live else "")

    def run(self, stop: threading.Event) -> None:
        interval = self.cfg.effective_control_interval
        next_tick = time.monotonic()
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the controller
                self._log_error(f"control step failed: {exc!r}")
            next_tick += interval
            delay = next_tick - time.monotonic()
            if delay < 0:  # we fell behind (slow provider call): do not try to catch up in a burst
                next_tick = time.monotonic()
                delay = 0
            stop.wait(delay)
        self._save_history()

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> None:
        now = self.clock()
        snap = self.table.snapshot()
        if self._retry is not None and not self.dry_run:
            self._launch(self._retry, now)
        try:
            owned = self.provider.list_instances()
        except Exception as exc:  # noqa: BLE001 - the cloud API is down: hold everything
            self._log_error(f"cannot list the {self.provider.name} provider's instances ({exc}); holding")
            self._write_status(now, self._last_status.desired, "hold", "cannot list instances; holding")
            return
        owned = self._with_recent_launches(owned, now)
        fleet = build_fleet(snap, owned, now)
        self._replacing &= {m.instance_id for m in fleet.pending}

        monitor_ok = snap.monitor.alive(now, MONITOR_STALE_INTERVALS)
        self._track_freeze(monitor_ok, snap, now, fleet)
        if self.frozen:
            self._step_frozen(fleet, now)
        else:
            self._step_live(fleet, snap, now)
        if now - self._history_saved_at >= HISTORY_SAVE_SECONDS:
            self._save_history()
            self._history_saved_at = now

    def _step_live(self, fleet: FleetView, snap: Snapshot, now: float) -> None:
        cfg = self.cfg
        poll_interval = snap.monitor.poll_interval or cfg.poll_interval
        decision = self.policy.decide(fleet.observation(cfg.warmup, poll_interval))
        desired = decision.desired

        plan = plan_replacements(fleet, grace=cfg.effective_health_grace, app_down_after=cfg.app_down_after,
                                 desired=desired, in_flight=len(self._replacing),
                                 max_unhealthy_fraction=cfg.max_unhealthy_fraction,
                                 monitor_started_at=snap.monitor.started_at)
        if plan.note:
            self._log_once(("health-note", plan.note), logging.WARNING, f"health: {plan.note}")
        replaced = {r.instance_id for r in plan.replace}
        for repl in plan.replace:
            self._record(Activity(now, "replace", 1, repl.cause, [repl.instance_id], desired, fleet.capacity,
                                  self.dry_run))
        if plan.replace and not self.dry_run:
            self._terminate(sorted(replaced))
            self._launch(_PendingLaunch(self._new_token(), len(replaced),
                                        f"replacing {', '.join(sorted(replaced))}", "replace"), now)

        delta = desired - fleet.capacity
        action = "hold"
        if delta > 0:
            action = "launch"
            self._record(Activity(now, "launch", delta, decision.reason, [], desired, fleet.capacity, self.dry_run))
            if not self.dry_run:
                self._launch(_PendingLaunch(self._new_token(), delta, decision.reason, "launch"), now)
        elif delta < 0:
            candidates = [m for m in fleet.members if m.instance_id not in replaced]
            victims = choose_victims(candidates, -delta, cfg.termination_policy)
            if len(victims) < -delta:
                self._log_once(("protected", desired), logging.WARNING,
                               f"want {-delta} fewer instances but only {len(victims)} are unprotected")
            if victims:
                action = "terminate"
                ids = [v.instance_id for v in victims]
                self._record(Activity(now, "terminate", len(ids), decision.reason, ids, desired, fleet.capacity,
                                      self.dry_run))
                if not self.dry_run:
                    self._terminate(ids)
        if plan.replace and action == "hold":
            action = "replace"
        self._write_status(now, desired, action, decision.reason, fleet)

    def _step_frozen(self, fleet: FleetView, now: float) -> None:
        """Fail static: no metric-driven action; min/max still hold on the provider's own count."""
        cfg = self.cfg
        desired = min(max(fleet.capacity, cfg.min_instances), cfg.max_instances)
        reason = "MonitorS is not responding: holding the fleet, only min/max enforced"
        action = "frozen"
        if desired > fleet.capacity:
            why = f"{fleet.capacity} instances, below HELIX_MIN_INSTANCES={cfg.min_instances} (metrics frozen)"
            self._record(Activity(now, "launch", desired - fleet.capacity, why, [], desired, fleet.capacity,
                                  self.dry_run))
            if not self.dry_run:
                self._launch(_PendingLaunch(self._new_token(), desired - fleet.capacity, why, "launch"), now)
        elif desired < fleet.capacity:
            victims = choose_victims(list(fleet.members), fleet.capacity - desired, cfg.termination_policy)
            why = f"{fleet.capacity} instances, above HELIX_MAX_INSTANCES={cfg.max_instances} (metrics frozen)"
            ids = [v.instance_id for v in victims]
            if ids:
                self._record(Activity(now, "terminate", len(ids), why, ids, desired, fleet.capacity, self.dry_run))
                if not self.dry_run:
                    self._terminate(ids)
        self._write_status(now, desired, action, reason, fleet)

    def _track_freeze(self, monitor_ok: bool, snap: Snapshot, now: float, fleet: FleetView) -> None:
        if not monitor_ok and not self.frozen:
            self.frozen = True
            mon = snap.monitor
            age = "never written" if not mon.heartbeat else f"{now - mon.heartbeat:.1f}s old"
            self._record(Activity(now, "freeze", 0,
                                  f"MonitorS heartbeat is {age} (more than {MONITOR_STALE_INTERVALS:g} poll "
                                  "intervals): no scale-in, no health replacement until it is back; min/max "
                                  "still enforced", [], self._last_status.desired, fleet.capacity, self.dry_run))
        elif monitor_ok and self.frozen:
            self.frozen = False
            self._record(Activity(now, "resume", 0, "MonitorS heartbeat is fresh again: scaling resumes", [],
                                  self._last_status.desired, fleet.capacity, self.dry_run))

    # -- acting ----------------------------------------------------------------------------------

    def _new_token(self) -> str:
        return f"{self.cfg.group_name[:24]}-{uuid.uuid4().hex[:20]}"

    def _launch(self, launch: _PendingLaunch, now: float) -> None:
        self._save_intent(launch)
        try:
            launched = self.provider.launch(launch.count, launch.token)
        except LaunchError as exc:  # definitive (every zone refused): decide afresh next step
            self._log_error(f"launch of {launch.count} failed: {exc}")
            self._retry = None
            self._clear_intent()
            return
        except Exception as exc:  # noqa: BLE001 - maybe a lost reply: retry with the same token
            self._log_error(f"launch of {launch.count} did not complete ({exc!r}); retrying with the same token")
            self._retry = launch
            return
        self._retry = None
        self._clear_intent()
        for inst in launched:
            self._recent[inst.instance_id] = (inst, now + LAUNCH_VISIBILITY_SECONDS)
            if launch.action == "replace":
                self._replacing.add(inst.instance_id)
        log.info("launched %s", ", ".join(f"{i.instance_id} in {i.zone}" for i in launched) or "nothing")

    def _terminate(self, ids: list[str]) -> None:
        for instance_id in ids:
            self._recent.pop(instance_id, None)
        try:
            self.provider.terminate(ids)
        except Exception as exc:  # noqa: BLE001 - the next step sees what is still there
            self._log_error(f"terminate of {', '.join(ids)} failed: {exc}")

    def _with_recent_launches(self, owned: list[ProviderInstance], now: float) -> list[ProviderInstance]:
        listed = {i.instance_id for i in owned}
        for instance_id, (inst, until) in list(self._recent.items()):
            if instance_id in listed or now > until:
                del self._recent[instance_id]
            else:
                owned.append(inst)
        return owned

    # -- reporting -------------------------------------------------------------------------------

    def _record(self, activity: Activity) -> None:
        if self.dry_run:
            # Nothing changes in a dry run, so the same decision comes back every step: say it once.
            key = (activity.action, activity.count, tuple(activity.instance_ids))
            if key == self._last_logged:
                return
            self._last_logged = key
        self.activity.record(activity)

    def _write_status(self, now: float, desired: int, action: str, reason: str, fleet: FleetView | None = None) -> None:
        status = ControllerStatus(
            pid=os.getpid(), desired=desired,
            in_service=len(fleet.in_service) if fleet else self._last_status.in_service,
            pending=len(fleet.pending) if fleet else self._last_status.pending,
            heartbeat=now, decision_at=now, frozen=self.frozen, dry_run=self.dry_run, action=action,
            reason=reason, policy=getattr(self.policy, "name", self.cfg.policy)[:16])
        self.table.write_controller(status)
        self._last_status = status

    def _log_once(self, key: tuple, level: int, message: str) -> None:
        if key != self._once_key:
            self._once_key = key
            log.log(level, message)

    def _log_error(self, message: str) -> None:
        # The same error every second is one line a minute, not sixty.
        last, at = self._last_error
        now = time.monotonic()
        if message != last or now - at > 60:
            log.error(message)
            self._last_error = (message, now)

    # -- persistence -----------------------------------------------------------------------------

    def _save_intent(self, launch: _PendingLaunch) -> None:
        _write_json(self.intent_path, {"token": launch.token, "count": launch.count, "reason": launch.reason,
                                       "action": launch.action})

    def _clear_intent(self) -> None:
        try:
            os.unlink(self.intent_path)
        except FileNotFoundError:
            pass

    def _load_history(self) -> None:
        try:
            with open(self.history_path, encoding="utf-8") as fh:
                state = json.load(fh)
            self.policy.import_state(state)
            log.info("policy history restored from %s", self.history_path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - a corrupt history costs learning, not the fleet
            log.warning("ignoring unreadable policy history %s: %s", self.history_path, exc)

    def _save_history(self) -> None:
        try:
            _write_json(self.history_path, self.policy.export_state())
        except Exception as exc:  # noqa: BLE001
            self._log_error(f"cannot save policy history to {self.history_path}: {exc}")


def _write_json(path: str, data: object) -> None:
    """Write-then-rename, so a crash mid-write leaves the old file, never half a new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

