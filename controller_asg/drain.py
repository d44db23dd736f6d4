"""Drain before terminate: when an instance that served may finally be terminated. Pure.

An instance that served requests is not terminated the moment the controller decides to. It is
*draining*: billable, never capacity, and on its way out in three steps, all on the act path:

1. It leaves every target group (the load balancer stops sending it requests; those in flight
   get the group's deregistration delay). Until that call succeeds, it is never terminated: an
   instance terminated while still registered would leave the load balancer pointing at nothing
   (the load balancer's API failing holds the terminate, however long).
2. Its terminate hook runs (MonitorS asks its agent, seeing the drain deadline on the roster);
   the row's lifecycle goes DRAINING, then DRAINED with the hook's result.
3. Once both are done, it is terminated. Neither waits past its limit: the hook until the drain
   deadline, the load balancer until HELIX_DRAIN_TIMEOUT after it was deregistered (never past an
   interruption's own deadline). An instance whose agent cannot be asked (unhealthy, or no row)
   has no hook to wait for, and one that vanished needs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller_asg.traffic import TargetState
from shared.table import InstanceRow, Lifecycle, State


@dataclass
class Drain:
    since: float  # when the controller decided to terminate it
    deadline: float  # the terminate hook's limit (and the drain deadline on the roster)
    cause: str
    hard_deadline: float = 0.0  # > 0: an interruption notice's limit, nothing waits past it
    left_traffic_at: float = 0.0  # when it left every target group (0: not yet)
    error: str = ""  # the load balancer's last error while leaving


def start_drain(now: float, cause: str, drain_timeout: float, drain_by: float = 0.0) -> Drain:
    """A drain starting now: `drain_timeout` for the hook, or less when `drain_by` (> 0) says so."""
    deadline = min(now + drain_timeout, drain_by) if drain_by > 0 else now + drain_timeout
    return Drain(since=now, deadline=deadline, cause=cause, hard_deadline=max(0.0, drain_by))


def hook_verdict(drain: Drain, row: InstanceRow | None, now: float, table_read: bool = True) -> str:
    """Why the terminate hook no longer holds the terminate, or '' while it does. `table_read`
    False: the table could not be read, so nothing is known of the hook but its deadline."""
    if not table_read:
        if now >= drain.deadline:
            return f"the metrics table is unreadable and the drain timed out after {now - drain.since:.0f}s"
        return ""
    if row is None:
        return "no agent to ask"
    if row.lifecycle == Lifecycle.DRAINED:
        detail = f" ({row.hook_detail})" if row.hook_detail else ""
        return f"terminate hook {row.hook_result.label}{detail}"
    if row.state == State.UNHEALTHY:
        return "its agent does not answer"
    if now >= drain.deadline:
        return f"terminate hook still running after {now - drain.since:.0f}s: terminating anyway"
    return ""


def traffic_verdict(drain: Drain, target: TargetState | None, now: float, drain_timeout: float) -> str:
    """Why the load balancer no longer holds the terminate, or '' while it does. `target`: the
    instance's state across its target groups (None: unknown, the load balancer's API failed)."""
    if not drain.left_traffic_at:
        return ""
    if target == TargetState.UNUSED:
        return "drained from its target groups"
    limit = drain.left_traffic_at + drain_timeout
    if drain.hard_deadline > 0:
        limit = min(limit, drain.hard_deadline)
    if now >= limit:
        seen = "state unknown" if target is None else f"still {target.value}"
        return f"target groups {seen} at the drain timeout: terminating anyway"
    return ""
