"""Which instances to replace, and how many at once. Pure: the fleet view and the time go in.

Rules, in the order they act:
- Nothing is a candidate inside its health grace (HELIX_HEALTH_GRACE seconds from its launch, or
  from MonitorS's start when later; see `fleet.grace_started`): an app that needs a while after
  its agent starts is not replaced while it starts, whatever its row says meanwhile.
- After the grace, an instance is a candidate when its agent has not registered; when MonitorS
  marks it unhealthy; or when its app has been down for HELIX_APP_DOWN_AFTER polls.
- At most 10% of desired (at least 1) replacements are in flight at a time, so a bad image or a
  bad release never cycles the whole fleet at once.
- When more than HELIX_MAX_UNHEALTHY_FRACTION of in-service instances look unhealthy at once, the
  likelier cause is the monitoring path or the network, not the instances: replace at most one
  per interval.
- A launch whose hook said ABANDON (or timed out) is a failed launch at once, grace or not.
- With HELIX_HEALTH_SOURCES=agent,elb, an in-service instance its target group fails is unhealthy.
- An instance EC2 says it will interrupt (or recommends rebalancing) is replaced at once and
  drained before its time; these are announcements, not health, so the limits above do not apply.
- (Fail static, in the controller: while MonitorS's heartbeat is stale nothing is replaced.)
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from controller_asg.fleet import FleetMember, FleetView, grace_expired
from shared.table import Notice, State


@dataclass(frozen=True)
class Replacement:
    instance_id: str
    cause: str
    # > 0: it must be drained and terminated by then (an interruption notice's time); 0: the usual
    # HELIX_DRAIN_TIMEOUT.
    drain_by: float = 0.0


@dataclass(frozen=True)
class HealthPlan:
    replace: tuple[Replacement, ...]
    candidates: int  # how many looked replaceable before the limits
    note: str = ""  # why fewer than the candidates are replaced, in plain words


# An interrupted instance is drained this long before EC2 takes it (its two-minute warning), so the
# terminate hook ends while the instance still runs.
NOTICE_MARGIN_SECONDS = 15.0


def _cause(member: FleetMember, now: float, grace: float, monitor_started_at: float, app_down_after: int) -> str:
    row = member.row
    if member.abandoned and row is not None:
        # The launch hook's verdict needs no grace: it already had its own timeout.
        detail = f" ({row.hook_detail})" if row.hook_detail else ""
        return f"its launch hook ended {row.hook_result.label}{detail}: a failed launch"
    if not grace_expired(member, now, grace, monitor_started_at):
        return ""
    if row is None:
        return f"its agent has not registered within {grace:g}s of launch"
    if row.state == State.UNHEALTHY:
        return f"MonitorS marks it unhealthy after {row.failures} failed polls in a row"
    if row.state == State.APP_DOWN and row.app_down_polls >= app_down_after:
        detail = f" ({row.app_detail})" if row.app_detail else ""
        return f"its app has been down for {row.app_down_polls} polls{detail}"
    if member.lb_unhealthy and member.in_service:
        return "its target group's health check fails it"
    return ""


def _notice(member: FleetMember) -> Replacement | None:
    """EC2 announced it will take the instance (Spot interruption) or that it may (rebalance
    recommendation): replace it now, and drain it before it goes, as ASG's capacity rebalancing does.
    Not health evidence, so never limited by the per-interval budget or the mass-failure guard."""
    row = member.row
    if row is None or row.notice == Notice.NONE:
        return None
    if row.notice == Notice.INTERRUPTION:
        when = f" at {row.notice_at:.0f}" if row.notice_at > 0 else ""
        drain_by = max(0.0, row.notice_at - NOTICE_MARGIN_SECONDS) if row.notice_at > 0 else 0.0
        return Replacement(member.instance_id, f"EC2 interruption notice: it goes{when}", drain_by)
    return Replacement(member.instance_id, "EC2 rebalance recommendation: elevated risk of interruption")


def plan_replacements(
    fleet: FleetView,
    *,
    grace: float,
    app_down_after: int,
    desired: int,
    in_flight: int,
    max_unhealthy_fraction: float,
    monitor_started_at: float,
    skip: Collection[str] = (),
) -> HealthPlan:
    """`skip`: ids not to replace whatever their health. They take no place in the per-interval
    budget, but still count as sick for the mass-failure guard: their health is evidence too."""
    found = []
    announced = []
    for member in fleet.members:
        if member.instance_id in skip:
            continue
        notice = _notice(member)
        if notice is not None:
            announced.append(notice)
            continue
        cause = _cause(member, fleet.now, grace, monitor_started_at, app_down_after)
        if cause:
            found.append(Replacement(member.instance_id, cause))
    if not found:
        return HealthPlan(tuple(announced), len(announced))

    at_once = max(1, math.floor(0.1 * desired))
    budget = max(0, at_once - in_flight)
    note = ""
    if budget < len(found):
        note = f"{len(found)} need replacing, {in_flight} replacement(s) in flight, at most {at_once} at a time"
    in_service = fleet.in_service
    sick = sum(1 for m in in_service if m.row is not None and m.row.state in (State.UNHEALTHY, State.APP_DOWN))
    # One sick instance is just a sick instance, whatever the fleet's size.
    if sick >= 2 and sick / len(in_service) > max_unhealthy_fraction:
        budget = min(budget, 1)
        note = (
            f"{sick} of {len(in_service)} in-service instances look unhealthy at once "
            f"(more than {max_unhealthy_fraction:.0%}): likely a monitoring or network fault, "
            "replacing at most one per interval"
        )
    return HealthPlan(tuple(announced) + tuple(found[:budget]), len(announced) + len(found), note)
