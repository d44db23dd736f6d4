"""What to do this step, as data: a plan of actions, each with its cause. Pure.

The planners decide; they never act, never read a clock and never clamp to max: the controller's
one `apply` executes a plan through the launch gate and the terminate gate (dry run decided
there, once), so "never above max, never twice, never someone else's" holds whatever planned.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from controller_asg.fleet import FleetView
from controller_asg.health import HealthPlan
from controller_asg.policy.base import Decision
from controller_asg.termination import choose_victims
from shared.table import State

if TYPE_CHECKING:  # refresh.py builds on this module's Action
    from controller_asg.refresh import RefreshStep


class ActionKind(StrEnum):
    LAUNCH = "launch"  # `count` new instances (`replaces`: for a health replacement)
    TERMINATE = "terminate"  # scale-in or above max: `instance_ids`
    REPLACE = "replace"  # terminate one unhealthy instance; its LAUNCH follows in the same plan


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    cause: str
    count: int = 0
    instance_ids: tuple[str, ...] = ()
    replaces: str = ""  # LAUNCH: the id this launch replaces
    # TERMINATE/REPLACE: drained and terminated by then at the latest (epoch seconds; 0: the usual
    # HELIX_DRAIN_TIMEOUT from now). An interruption notice sets it.
    drain_by: float = 0.0


@dataclass(frozen=True)
class Plan:
    desired: int
    action: str  # the one word the table shows: hold | launch | terminate | replace | frozen
    reason: str
    actions: tuple[Action, ...] = ()
    notes: tuple[str, ...] = ()  # conditions worth one log line when they change


def plan_live(
    fleet: FleetView,
    decision: Decision,
    health: HealthPlan,
    *,
    termination_policy: str,
    breaker: str = "closed",
    ever_healthy: Collection[str] = (),
    refresh: RefreshStep | None = None,
) -> Plan:
    """The policy's desired count and the health plan, as actions.

    - Each replacement is a REPLACE (terminate) followed by a LAUNCH of one, in that order: the
      controller launches it only once the terminate was accepted.
    - `breaker` "tripped" (the churn breaker is open and no probe may go now): replacing means
      only terminating launches that never became healthy (they serve nothing and cost money),
      with nothing launched; `health` must have left out instances that were healthy once
      (`plan_replacements(skip=...)`): they are kept, as they may recover.
    - `breaker` "probe" (tripped, and one probe launch may go now): one replacement, as usual;
      its launch is the probe.
    - Then an instance refresh's batch (`refresh`, see refresh.py): REPLACE + LAUNCH pairs, which
      keep the count, and replacements launched first, which the fleet holds above desired
      (`refresh.extra`) until the instances they replace are taken out.
    - Then the policy's delta, counted on the fleet as it will be after all that; a scale-in takes
      instances the refresh has still to replace first.
    """
    desired = decision.desired
    actions: list[Action] = []
    notes: list[str] = []
    if health.note:
        notes.append(f"health: {health.note}")
    tripped = breaker == "tripped"
    replacements = health.replace[:1] if breaker == "probe" else health.replace
    replaced: set[str] = set()
    for repl in replacements:
        replaced.add(repl.instance_id)
        if tripped:
            actions.append(
                Action(
                    ActionKind.REPLACE,
                    f"{repl.cause}; a failed launch, not replaced while the churn breaker is tripped",
                    1,
                    (repl.instance_id,),
                    drain_by=repl.drain_by,
                )
            )
        else:
            actions.append(Action(ActionKind.REPLACE, repl.cause, 1, (repl.instance_id,), drain_by=repl.drain_by))
            actions.append(
                Action(ActionKind.LAUNCH, f"replacing {repl.instance_id}: {repl.cause}", 1, replaces=repl.instance_id)
            )
    if tripped:
        held = sorted(
            m.instance_id
            for m in fleet.members
            if m.instance_id in ever_healthy and m.row is not None and m.row.state != State.HEALTHY
        )
        if held:
            notes.append(
                f"churn breaker tripped: {', '.join(held)} not replaced until the next probe launch "
                "(healthy once; may recover)"
            )

    # Replacements keep the count (or, with the breaker tripped, lower it: refilled by the policy
    # when launches may go again, through the same gate).
    capacity = fleet.capacity - (len(replaced) if tripped else 0)
    target = desired
    if refresh is not None:
        healed = set(replaced)  # health replaces these this step already
        for action in refresh.actions:
            if action.kind == ActionKind.REPLACE and action.instance_ids[0] in healed:
                continue
            if action.replaces and action.replaces in healed:
                continue
            actions.append(action)
            if action.kind == ActionKind.REPLACE:
                replaced.add(action.instance_ids[0])
            elif action.kind == ActionKind.TERMINATE:
                replaced.update(action.instance_ids)
                capacity -= action.count
            elif action.kind == ActionKind.LAUNCH and not action.replaces:
                capacity += action.count
        target = desired + refresh.extra
    delta = target - capacity
    word = "hold"
    if delta > 0:
        word = "launch"
        actions.append(Action(ActionKind.LAUNCH, decision.reason, delta))
    elif delta < 0:
        candidates = [m for m in fleet.members if m.instance_id not in replaced]
        victims = choose_victims(candidates, -delta, termination_policy, refresh.outdated if refresh else ())
        if len(victims) < -delta:
            notes.append(f"want {-delta} fewer instances but only {len(victims)} are unprotected")
        if victims:
            word = "terminate"
            actions.append(
                Action(ActionKind.TERMINATE, decision.reason, len(victims), tuple(v.instance_id for v in victims))
            )
    if replaced and word == "hold":
        word = "replace"
    return Plan(desired, word, decision.reason, tuple(actions), tuple(notes))


def plan_frozen(fleet: FleetView, *, min_instances: int, max_instances: int, termination_policy: str, why: str) -> Plan:
    """Fail static: no metric-driven action, no health replacement; min and max still hold on the
    provider's own count (`why`: what froze us, for the reason text)."""
    capacity = fleet.capacity
    desired = min(max(capacity, min_instances), max_instances)
    actions: list[Action] = []
    if desired > capacity:
        actions.append(
            Action(
                ActionKind.LAUNCH,
                f"{capacity} instances, below HELIX_MIN_INSTANCES={min_instances} ({why})",
                desired - capacity,
            )
        )
    elif desired < capacity:
        victims = choose_victims(list(fleet.members), capacity - desired, termination_policy)
        if victims:
            actions.append(
                Action(
                    ActionKind.TERMINATE,
                    f"{capacity} instances, above HELIX_MAX_INSTANCES={max_instances} ({why})",
                    len(victims),
                    tuple(v.instance_id for v in victims),
                )
            )
    return Plan(desired, "frozen", f"{why}: holding the fleet, only min/max enforced", tuple(actions))
