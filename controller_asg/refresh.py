"""Instance refresh and max instance lifetime: replacing instances in batches. Pure.

A refresh (as EC2 Auto Scaling's StartInstanceRefresh, or a GCP rolling update) replaces every
instance that is *outdated* -- launched from another launch configuration than the refresh's
target, or (without skip-matching) launched before the refresh began -- in batches:

- at least `min_healthy` percent of the desired count stays in service (ready: serving and
  HEALTHY), rounded down: each batch takes out at most `in service - floor(desired x min%)`
  outdated instances at once, each replaced by a launch in the same step (drain applies: an
  instance that served leaves its target groups and runs its terminate hook first);
- with `max_healthy` above 100 a batch may also launch up to `floor(desired x max%) - desired`
  replacements *first* (never above the fleet's max unless `allow_above_max`), and takes the
  outdated instances they replace out only once those are in service: the fleet is held that
  many above desired meanwhile (`RefreshStep.extra`), so the policy does not scale them in;
- a batch is done when none of the new instances is still on its way and they have all been in
  service for `warmup` seconds; then the next batch;
- at each checkpoint percentage it pauses for `checkpoint_delay`;
- with `auto_rollback`, when new instances fail health (the churn breaker trips) it rolls back:
  the previous configuration becomes the target and the instances already replaced are replaced
  again (launches go through the breaker's probes like any other). No previous configuration
  known: it stops, failed.

A refresh that ends rolled back leaves the previous configuration pinned for new launches until
the settings' configuration changes again (the controller's rule, see `launch_config_for`).

Max instance lifetime (HELIX_MAX_INSTANCE_LIFETIME) is the same machinery with another notion of
outdated (older than the lifetime), no surge beyond the configured max-healthy, no checkpoints
and no rollback: a lifetime "refresh" starts by itself when an instance expires and no refresh
runs, and ends when none is expired.

Everything here is a function of (refresh record, fleet view, desired count, time): the
controller persists the record, applies the actions through its one act path (launch gate,
terminate gate, drain), and logs the progress lines.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from controller_asg.fleet import FleetMember, FleetView
from controller_asg.plan import Action, ActionKind
from controller_asg.providers.base import LaunchConfig


class RefreshState(StrEnum):
    IN_PROGRESS = "in-progress"
    CHECKPOINT = "checkpoint"  # paused at a checkpoint for its delay
    ROLLING_BACK = "rolling-back"
    SUCCESSFUL = "successful"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in (RefreshState.IN_PROGRESS, RefreshState.CHECKPOINT, RefreshState.ROLLING_BACK)


@dataclass(frozen=True)
class RefreshSpec:
    min_healthy: float = 90.0  # percent of desired kept in service
    max_healthy: float = 100.0  # percent of desired the fleet may reach with replacements launched first
    warmup: float = 60.0  # seconds a batch's new instances serve before the next batch
    checkpoints: tuple[float, ...] = ()  # percentages to pause at
    checkpoint_delay: float = 3600.0
    skip_matching: bool = True  # False: every instance launched before the refresh is replaced
    auto_rollback: bool = True
    allow_above_max: bool = False  # a surge may exceed the fleet's max

    def problems(self) -> list[str]:
        """One line per bad field, naming it, its value and what was expected."""
        out = []
        if not 0 <= self.min_healthy <= 100:
            out.append(f"min_healthy={self.min_healthy:g}: expected a percentage from 0 to 100")
        if not 100 <= self.max_healthy <= 200:
            out.append(f"max_healthy={self.max_healthy:g}: expected a percentage from 100 to 200")
        if self.min_healthy >= 100 and self.max_healthy <= 100:
            out.append(
                f"min_healthy={self.min_healthy:g}: expected below 100 unless max_healthy is above 100 "
                "(no instance could ever be taken out)"
            )
        if not 0 <= self.warmup <= 86400:
            out.append(f"warmup={self.warmup:g}: expected seconds from 0 to 86400")
        if not 0 <= self.checkpoint_delay <= 7 * 86400:
            out.append(f"checkpoint_delay={self.checkpoint_delay:g}: expected seconds from 0 to 604800")
        for pct in self.checkpoints:
            if not 0 < pct <= 100:
                out.append(f"checkpoints={pct:g}: expected percentages above 0 and at most 100")
        if list(self.checkpoints) != sorted(set(self.checkpoints)):
            out.append(f"checkpoints={','.join(f'{p:g}' for p in self.checkpoints)}: expected increasing percentages")
        return out


@dataclass
class Refresh:
    """One refresh (or the lifetime replacement), as persisted in the controller's state."""

    id: str
    kind: str  # "refresh" | "lifetime"
    spec: RefreshSpec
    target: dict[str, str]  # the LaunchConfig settings instances are moved to
    previous: dict[str, str] | None  # the configuration a rollback returns to (None: unknown)
    started_at: float
    who: str = ""
    reason: str = ""
    state: RefreshState = RefreshState.IN_PROGRESS
    total: int = 0  # outdated instances found (grows if more appear)
    replaced: int = 0  # outdated instances taken out
    batch_at: float = 0.0  # when the batch in flight began (0: none)
    ready_at: float = 0.0  # when all of its new instances were first seen in service
    surge: list[str] = field(default_factory=list)  # outdated ids to take out once the surge serves
    passed: list[float] = field(default_factory=list)  # checkpoints reached
    checkpoint_until: float = 0.0
    ended_at: float = 0.0
    detail: str = ""
    failed_digest: str = ""  # rolled back from this configuration (the pin holds while settings say it)

    @property
    def target_digest(self) -> str:
        return LaunchConfig.of(self.target).digest

    @property
    def percent(self) -> float:
        if self.state == RefreshState.SUCCESSFUL or self.state == RefreshState.ROLLED_BACK:
            return 100.0
        return 100.0 * self.replaced / self.total if self.total else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["state"] = self.state.value
        out["spec"]["checkpoints"] = list(self.spec.checkpoints)
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> Refresh:
        raw = dict(data)
        spec = dict(raw.pop("spec", {}))
        spec["checkpoints"] = tuple(float(p) for p in spec.get("checkpoints", ()))
        raw["state"] = RefreshState(raw.get("state", RefreshState.FAILED.value))
        previous = raw.get("previous")
        raw["previous"] = {str(k): str(v) for k, v in previous.items()} if isinstance(previous, dict) else None
        raw["target"] = {str(k): str(v) for k, v in dict(raw.get("target", {})).items()}
        return cls(spec=RefreshSpec(**spec), **raw)

    def status(self) -> dict:
        """What `helix-ctl status` / `refresh status` show."""
        checkpoint = ""
        if self.state == RefreshState.CHECKPOINT:
            checkpoint = f"paused at {self.passed[-1]:g}% until {self.checkpoint_until:.0f}"
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state.value,
            "percent": round(self.percent, 1),
            "replaced": self.replaced,
            "to_replace": self.total,
            "min_healthy": self.spec.min_healthy,
            "max_healthy": self.spec.max_healthy,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "checkpoint": checkpoint,
            "detail": self.detail,
            "target": LaunchConfig.of(self.target).describe(),
        }


@dataclass(frozen=True)
class RefreshStep:
    refresh: Refresh  # the updated record
    actions: tuple[Action, ...] = ()  # REPLACE + LAUNCH pairs, surge LAUNCHes, surge TERMINATEs
    extra: int = 0  # instances the fleet is held above desired (a surge waiting to take over)
    events: tuple[str, ...] = ()  # progress worth an activity entry (batch started, checkpoint, ended, …)
    outdated: tuple[str, ...] = ()  # still to replace: a scale-in takes these first


def outdated(
    refresh: Refresh, members: Collection[FleetMember], now: float, lifetime: float = 0.0
) -> list[FleetMember]:
    """The members this refresh still has to replace, in the order it takes them: those not
    serving first (replacing them costs no capacity), then the oldest."""
    if refresh.kind == "lifetime":
        found = [m for m in members if lifetime > 0 and now - m.instance.launched_at > lifetime]
    else:
        digest = refresh.target_digest
        found = [
            m
            for m in members
            if m.instance.config != digest
            or (not refresh.spec.skip_matching and m.instance.launched_at < refresh.started_at)
        ]
    return sorted(found, key=lambda m: (m.ready, m.instance.launched_at, m.instance_id))


def step_refresh(
    refresh: Refresh,
    fleet: FleetView,
    *,
    desired: int,
    max_instances: int,
    now: float,
    breaker_tripped: bool = False,
    suspended: bool = False,
    skip: Collection[str] = (),
    lifetime: float = 0.0,
) -> RefreshStep:
    """The refresh's next move. `skip`: instances another plan replaces this step (health)."""
    r = copy.deepcopy(refresh)
    if not r.state.active:
        return RefreshStep(r)
    events: list[str] = []
    members = [m for m in fleet.members if m.instance_id not in skip]
    old = outdated(r, members, now, lifetime)
    old_ids = {m.instance_id for m in old}
    new = [m for m in members if m.instance_id not in old_ids]
    surge_left = [i for i in r.surge if i in old_ids]
    r.total = max(r.total, r.replaced + len(old))

    # Rollback: new instances fail health (the churn breaker tripped on them).
    # (A rollback already under way goes on: the breaker's probes launch the good configuration.)
    if (
        breaker_tripped
        and r.kind == "refresh"
        and r.spec.auto_rollback
        and r.state != RefreshState.ROLLING_BACK
        and r.replaced + len(surge_left) > 0
    ):
        return _roll_back(r, now, "new instances fail health (the churn breaker tripped)")
    extra = len(surge_left)

    if breaker_tripped:
        # Replacements could not launch (only the breaker's probes may): taking instances out now
        # would only shrink the fleet.
        r.detail = "waiting: the churn breaker is tripped"
        return RefreshStep(r, extra=extra, outdated=tuple(old_ids))
    if suspended:
        r.detail = "suspended (helix-ctl resume refresh)"
        return RefreshStep(r, extra=extra, outdated=tuple(old_ids))
    if r.state == RefreshState.CHECKPOINT:
        if now < r.checkpoint_until:
            return RefreshStep(r, extra=extra, outdated=tuple(old_ids))
        r.state = RefreshState.IN_PROGRESS
        events.append(f"{r.kind} {r.id}: checkpoint at {r.passed[-1]:g}% passed, going on")

    actions: list[Action] = []
    if r.batch_at:
        coming = [m for m in new if not m.ready and not m.abandoned and m.instance.launched_at >= r.batch_at]
        if coming:
            r.detail = f"waiting for {len(coming)} new instance(s) to come into service"
            return RefreshStep(r, extra=extra, events=tuple(events), outdated=tuple(old_ids))
        if not r.ready_at:
            r.ready_at = now
        if now - r.ready_at < r.spec.warmup:
            r.detail = f"new instances warming up ({r.spec.warmup - (now - r.ready_at):.0f}s left)"
            return RefreshStep(r, extra=extra, events=tuple(events), outdated=tuple(old_ids))
        if surge_left:
            actions.append(
                Action(
                    ActionKind.TERMINATE,
                    f"{r.kind} {r.id}: replaced by instances launched first, now in service",
                    len(surge_left),
                    tuple(surge_left),
                )
            )
            r.replaced += len(surge_left)
            old = [m for m in old if m.instance_id not in surge_left]
        r.batch_at, r.ready_at, r.surge = 0.0, 0.0, []
        extra = 0

    if not old:
        if actions:  # the last surge goes this step; the end is declared on the next
            return RefreshStep(r, tuple(actions), 0, tuple(events), tuple(old_ids))
        return _finish(r, now, events)

    for pct in r.spec.checkpoints:
        if pct not in r.passed and r.percent >= pct and pct < 100:
            r.passed.append(pct)
            r.state = RefreshState.CHECKPOINT
            r.checkpoint_until = now + r.spec.checkpoint_delay
            r.detail = f"checkpoint at {pct:g}%: paused for {r.spec.checkpoint_delay:g}s"
            events.append(f"{r.kind} {r.id}: {r.detail} ({r.replaced} of {r.total} replaced)")
            return RefreshStep(r, tuple(actions), extra, tuple(events), tuple(old_ids))

    serving = sum(1 for m in members if m.ready)
    floor_healthy = math.floor(desired * r.spec.min_healthy / 100.0 + 1e-9)
    ceiling = math.floor(desired * r.spec.max_healthy / 100.0 + 1e-9)
    if not r.spec.allow_above_max:
        ceiling = min(ceiling, max_instances)
    # What a batch may take out at once, and what it may launch first.
    take_out = min(len(old), max(0, serving - floor_healthy))
    surge = min(len(old) - take_out, max(0, ceiling - max(desired, fleet.capacity)))
    if take_out + surge == 0:
        r.detail = (
            f"waiting: {serving} in service, at least {floor_healthy} must stay "
            f"({r.spec.min_healthy:g}% of {desired}) and no room to launch first"
        )
        return RefreshStep(r, tuple(actions), extra, tuple(events), tuple(old_ids))
    out, first = old[:take_out], old[take_out : take_out + surge]
    cause = f"{r.kind} {r.id}" + (
        f": older than HELIX_MAX_INSTANCE_LIFETIME={lifetime:g}s"
        if r.kind == "lifetime"
        else f" to {LaunchConfig.of(r.target).describe()}"
    )
    for m in out:
        actions.append(Action(ActionKind.REPLACE, cause, 1, (m.instance_id,)))
        actions.append(Action(ActionKind.LAUNCH, f"replacing {m.instance_id}: {cause}", 1, replaces=m.instance_id))
    if first:
        actions.append(Action(ActionKind.LAUNCH, f"{cause}: launched first, to replace {len(first)}", len(first)))
    r.replaced += len(out)
    r.surge = [m.instance_id for m in first]
    r.batch_at, r.ready_at = now, 0.0
    r.detail = (
        f"batch: {len(out)} out now, {len(first)} launched first; {len(old) - len(out) - len(first)} left after it"
    )
    events.append(
        f"{r.kind} {r.id}: batch of {len(out) + len(first)} "
        f"({', '.join(m.instance_id for m in out + first)}); {serving} in service, at least {floor_healthy} kept"
    )
    return RefreshStep(r, tuple(actions), extra + len(first), tuple(events), tuple(old_ids))


def start_rollback(refresh: Refresh, now: float, why: str) -> Refresh:
    """`helix-ctl refresh rollback`: the previous configuration becomes the target (or the refresh
    fails when it is unknown)."""
    return _roll_back(copy.deepcopy(refresh), now, why).refresh


def cancel(refresh: Refresh, now: float, why: str) -> Refresh:
    r = copy.deepcopy(refresh)
    r.state, r.ended_at, r.detail, r.surge = RefreshState.CANCELLED, now, why, []
    return r


def _roll_back(r: Refresh, now: float, why: str) -> RefreshStep:
    if r.previous is None:
        r.state, r.ended_at, r.surge = RefreshState.FAILED, now, []
        r.detail = f"{why}; cannot roll back: the previous launch configuration is not known"
        return RefreshStep(r, events=(f"{r.kind} {r.id} failed: {r.detail}",))
    r.failed_digest = r.target_digest
    r.target, r.previous = r.previous, r.target
    r.state = RefreshState.ROLLING_BACK
    r.spec = RefreshSpec(**{**asdict(r.spec), "skip_matching": True, "checkpoints": ()})
    r.total, r.replaced, r.batch_at, r.ready_at, r.surge, r.passed = 0, 0, 0.0, 0.0, [], []
    r.detail = f"{why}: rolling back to {LaunchConfig.of(r.target).describe()}"
    return RefreshStep(r, events=(f"{r.kind} {r.id}: {r.detail}",))


def _finish(r: Refresh, now: float, events: list[str]) -> RefreshStep:
    r.state = RefreshState.ROLLED_BACK if r.state == RefreshState.ROLLING_BACK else RefreshState.SUCCESSFUL
    r.ended_at = now
    r.detail = f"{r.replaced} instance(s) replaced in {now - r.started_at:.0f}s"
    events.append(f"{r.kind} {r.id} {r.state.value}: {r.detail}")
    return RefreshStep(r, events=tuple(events))


def launch_config_for(refresh: Refresh | None, settings: LaunchConfig) -> LaunchConfig:
    """What a launch uses now: an active refresh's target; after a rollback, the configuration it
    rolled back to, for as long as the settings still name the one that failed; else the settings'."""
    if refresh is None:
        return settings
    if refresh.state.active:
        return LaunchConfig.of(refresh.target)
    if refresh.state == RefreshState.ROLLED_BACK and refresh.failed_digest == settings.digest:
        return LaunchConfig.of(refresh.target)
    return settings
