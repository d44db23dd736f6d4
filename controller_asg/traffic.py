"""Where an instance's traffic comes from: load-balancer target groups, or nothing to tell.

The third of Nomad Autoscaler's ideas beside the provider (how many instances) and the policy (how
many should there be): a *traffic* target is told when an instance may take requests and when it
must stop taking them, and says when it has drained. The controller calls it only from its act
path (controller_asg/controller.py), so "never orphan a registered instance" and "never terminate
undrained before the timeout" hold for every reason an instance is terminated.

`NoTraffic` is the answer when there is no load balancer to tell (the `local` provider, whose demo
balancer reads each row's lifecycle from the table, or EC2 without HELIX_EC2_TARGET_GROUPS).
`TargetGroups` (controller_asg/providers/elb.py) registers EC2 instances with ELBv2 target groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol


class TargetState(StrEnum):
    """An instance's state across every target group, the worst one winning (ELBv2's own names)."""

    UNUSED = "unused"  # registered nowhere (never, or deregistration complete): drained
    INITIAL = "initial"  # registered, first health checks running
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # failing the target group's health check
    DRAINING = "draining"  # deregistered, requests in flight still finishing (deregistration delay)
    UNAVAILABLE = "unavailable"  # the group's health checks are off, or the state is unknown


class TrafficError(Exception):
    """The load balancer's API failed (one line); the caller holds what depended on it."""


class Traffic(Protocol):
    name: str
    # False: nothing to register with; an instance serves once its launch hook said CONTINUE.
    enabled: bool

    def register(self, instance_ids: Sequence[str]) -> None:
        """Add these instances to every target group (idempotent). Raises TrafficError."""
        ...

    def deregister(self, instance_ids: Sequence[str]) -> None:
        """Remove them from every target group (idempotent; draining starts). Raises TrafficError."""
        ...

    def states(self, instance_ids: Sequence[str]) -> dict[str, TargetState]:
        """Each id's state across the groups, the worst winning: DRAINING anywhere beats everything,
        then UNHEALTHY, INITIAL, UNAVAILABLE, HEALTHY; UNUSED only when no group holds it. Raises
        TrafficError."""
        ...


class NoTraffic:
    name = "none"
    enabled = False

    def register(self, instance_ids: Sequence[str]) -> None:
        pass

    def deregister(self, instance_ids: Sequence[str]) -> None:
        pass

    def states(self, instance_ids: Sequence[str]) -> dict[str, TargetState]:
        return {instance_id: TargetState.UNUSED for instance_id in instance_ids}
