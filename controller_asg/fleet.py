"""Joining what the provider owns with what MonitorS sees: one record per owned instance.

Pure: a table snapshot, the provider's list and the time go in; a FleetView comes out. The
conservative rules of what counts as capacity and whose CPU counts are written down here, where
they act.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from controller_asg.policy.base import Observation
from controller_asg.providers.base import ProviderInstance
from shared.table import InstanceRow, Lifecycle, Snapshot, State

# Metrics older than this many poll intervals are "missing" (the agent answered once, then not).
STALE_METRICS_INTERVALS = 3.0


@dataclass(frozen=True)
class FleetMember:
    instance: ProviderInstance
    row: InstanceRow | None  # None: not registered with MonitorS (yet, or any more)
    # With load-balancer target groups: it has joined them (the controller registered it). Without
    # any, always True: the launch hook's CONTINUE is what puts an instance in service.
    in_traffic: bool = True
    # HELIX_HEALTH_SOURCES=agent,elb: a target group's health check fails it.
    lb_unhealthy: bool = False

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

    @property
    def prepared(self) -> bool:
        """Polled at least once and past its launch hook: it may take traffic. REGISTERING has not
        answered a poll yet; NONE and PREPARING have not finished the launch hook; ABANDONED failed it."""
        return (
            self.row is not None
            and self.row.state in (State.HEALTHY, State.UNHEALTHY, State.APP_DOWN)
            and self.row.lifecycle == Lifecycle.IN_SERVICE
        )

    @property
    def in_service(self) -> bool:
        # Prepared and, with target groups, in them: only then does it serve requests, so only then
        # is it capacity that the policy may count as serving (and whose CPU it may read).
        return self.prepared and self.in_traffic

    @property
    def ready(self) -> bool:
        """Serving and healthy: what a launch must reach to count as a success."""
        return self.in_service and self.row is not None and self.row.state == State.HEALTHY

    @property
    def abandoned(self) -> bool:
        """Its launch hook said ABANDON or timed out: a failed launch, whatever its polls say."""
        return self.row is not None and self.row.lifecycle == Lifecycle.ABANDONED

    @property
    def cpu(self) -> float | None:
        return self.row.cpu if self.row is not None and self.row.last_metrics > 0 else None


def grace_started(member: FleetMember, monitor_started_at: float) -> float:
    """When an instance's health grace began: its launch, or MonitorS's start when later (a
    MonitorS restarted with a fresh table must not make every instance look unregistered).

    An instance counts as in service from its launch, as in EC2 Auto Scaling: its grace covers
    the agent registering *and* the app starting (like ASG's HealthCheckGracePeriod, or a
    Kubernetes startupProbe), so a slow app is not replaced while it starts."""
    return max(member.instance.launched_at, monitor_started_at)


def grace_expired(member: FleetMember, now: float, grace: float, monitor_started_at: float) -> bool:
    return now - grace_started(member, monitor_started_at) > grace


@dataclass(frozen=True)
class FleetView:
    now: float
    members: tuple[FleetMember, ...]  # every owned instance that is not being terminated
    # Listed as terminating, or condemned by the controller (its terminate not yet confirmed):
    # billable until gone, never capacity.
    terminating: tuple[ProviderInstance, ...]
    unowned_rows: tuple[InstanceRow, ...]  # registered with MonitorS, not owned by this provider

    @property
    def in_service(self) -> list[FleetMember]:
        return [m for m in self.members if m.in_service]

    @property
    def pending(self) -> list[FleetMember]:
        return [m for m in self.members if not m.in_service]

    @property
    def capacity(self) -> int:
        return len(self.members)

    def observation(
        self, warmup: float, poll_interval: float, grace: float = float("inf"), monitor_started_at: float = 0.0
    ) -> Observation:
        """Reduce to what a policy sees. The rules, as Kubernetes' HPA states them for pods:
        - only in-service, HEALTHY instances past HELIX_WARMUP with fresh metrics give CPU samples;
        - instances inside the warm-up count as capacity, their CPU is left out (a booting app's
          CPU says nothing about steady load);
        - in-service instances with no usable metrics (unhealthy, app down, stale) are `missing`:
          the policy treats them as at target when scaling in and as 0 when scaling out;
        - `pending` is only launches still inside their health grace: one that missed it is a
          failed launch, not capacity about to serve, so it never holds a scale-in (a broken image
          must not pin the fleet at max). It still counts as capacity until it is replaced. One
          whose launch hook abandoned is not pending either.
        - an instance is in service only once its launch hook said CONTINUE (and, with target
          groups, once it joined them); its warm-up counts from then.
        """
        samples: list[float] = []
        rps: list[float] = []
        mem: list[float] = []
        missing = warming = 0
        stale_after = STALE_METRICS_INTERVALS * poll_interval
        for member in self.in_service:
            row = member.row
            assert row is not None
            fresh = row.last_metrics > 0 and self.now - row.last_metrics <= stale_after
            if row.state != State.HEALTHY or not fresh:
                missing += 1
            elif self.now - max(row.registered_at, row.lifecycle_at) < warmup:  # warm-up from entering service
                warming += 1
            else:
                samples.append(min(1.0, max(0.0, float(row.cpu))))
                rps.append(max(0.0, float(row.rps)))
                mem.append(min(1.0, max(0.0, float(row.mem))))
        in_service = len(self.in_service)
        pending = sum(
            1 for m in self.pending if not m.abandoned and not grace_expired(m, self.now, grace, monitor_started_at)
        )
        return Observation(
            now=self.now,
            capacity=self.capacity,
            in_service=in_service,
            pending=pending,
            cpu_samples=tuple(samples),
            missing=missing,
            warming=warming,
            rps_samples=tuple(rps),
            mem_samples=tuple(mem),
        )


def build_fleet(
    snapshot: Snapshot | None,
    instances: list[ProviderInstance],
    now: float,
    condemned: Collection[str] = (),
    in_traffic: Collection[str] | None = None,
    lb_unhealthy: Collection[str] = (),
) -> FleetView:
    """`snapshot` None: the table could not be read (every instance looks unregistered).
    `condemned`: ids the controller decided to terminate (draining, or its terminate not confirmed
    yet); they count with the terminating ones, never as capacity. `in_traffic`: with target
    groups, the ids registered with them (None: there are none to join)."""
    rows = {row.instance_id: row for row in snapshot.instances()} if snapshot is not None else {}
    members, terminating = [], []
    for inst in sorted(instances, key=lambda i: (i.launched_at, i.instance_id)):
        if inst.state == "terminating" or inst.instance_id in condemned:
            terminating.append(inst)
        else:
            joined = in_traffic is None or inst.instance_id in in_traffic
            members.append(FleetMember(inst, rows.get(inst.instance_id), joined, inst.instance_id in lb_unhealthy))
    owned = {i.instance_id for i in instances}
    unowned = tuple(row for row_id, row in rows.items() if row_id not in owned)
    return FleetView(now, tuple(members), tuple(terminating), unowned)
