"""Emulations of the policies people would otherwise use, for the simulator and `make bench`.

Each is a pure policy like Helix's own (time and observations passed in), so the simulator runs it
exactly as it runs `target`. They follow the public documentation as closely as it allows; every
modelling assumption is written beside the code that makes it. They are not offered to the live
controller (`HELIX_POLICY`), only to `python -m controller_asg.simulate --policy NAME`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from controller_asg.policy.base import Decision, Observation
from controller_asg.policy.common import WindowMax, ceil_units, clamp


@dataclass
class Limits:
    min_instances: int = 1
    max_instances: int = 10


class SeedLoop:
    """The seed project's loop: every 10 s, mean CPU above 0.7 launches ONE instance and blocks
    until it runs; below 0.3 it terminates one (the seed terminates the oldest; the simulator
    bills per second and all instances carry equal load, so which one does not change the figures).

    Assumptions: "blocks until it runs" = no decision at all while a launch is pending; the mean
    is over the in-service instances' CPU as the seed read it (warm-up not excluded: the seed had
    no warm-up notion, so warming instances are counted at their measured CPU; here the
    observation leaves them out, which is equivalent because all instances carry equal load).
    """

    name = "seed"
    period = 10.0

    def __init__(self, limits: Limits, upper: float = 0.7, lower: float = 0.3):
        self.l, self.upper, self.lower = limits, upper, lower
        self._next = float("-inf")

    def decide(self, obs: Observation) -> Decision:
        if obs.pending:
            return Decision(
                clamp(obs.capacity, self.l.min_instances, self.l.max_instances), "blocked until the launch runs"
            )
        if obs.now < self._next or not obs.cpu_samples:
            return Decision(clamp(obs.capacity, self.l.min_instances, self.l.max_instances), "waiting")
        self._next = obs.now + self.period
        mean = sum(obs.cpu_samples) / len(obs.cpu_samples)
        if mean > self.upper:
            return Decision(
                clamp(obs.capacity + 1, self.l.min_instances, self.l.max_instances),
                f"mean CPU {mean:.2f} > {self.upper}",
            )
        if mean < self.lower:
            return Decision(
                clamp(obs.capacity - 1, self.l.min_instances, self.l.max_instances),
                f"mean CPU {mean:.2f} < {self.lower}",
            )
        return Decision(clamp(obs.capacity, self.l.min_instances, self.l.max_instances), f"mean CPU {mean:.2f}")

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        return None


class AwsTargetTracking:
    """EC2 Auto Scaling target tracking on ASGAverageCPUUtilization at `target` (default 0.5).

    From the EC2 Auto Scaling documentation, with these modelling assumptions:
    - CloudWatch gets 1-minute datapoints (detailed monitoring): the average of the group's CPU
      over each minute. Instances in their warm-up (300 s, "default instance warmup") are not
      counted in the aggregate. Datapoints are available at the end of their minute (no extra
      CloudWatch delay is modelled, which flatters AWS slightly).
    - The scale-out alarm (AlarmHigh) fires after 3 consecutive datapoints above the target and
      invokes the policy every minute while it stays in ALARM; the scale-in alarm (AlarmLow) fires
      after 15 consecutive datapoints below 90% of the target (the threshold AWS creates).
    - Scale-out: desired = ceil(n × metric / target) with n the warmed-up in-service instances;
      capacity still warming up counts towards it, so it only launches beyond what is warming.
    - Scale-in: the same formula, and never while any instance is pending or warming up.
    """

    name = "aws-target-tracking"

    def __init__(self, limits: Limits, target: float = 0.5, warmup: float = 300.0):
        self.l, self.target, self.warmup = limits, target, warmup
        self._minute: int | None = None
        self._acc = 0.0
        self._acc_n = 0
        self._acc_instances = 0
        self._points: deque[tuple[float, int]] = deque(maxlen=15)  # (metric, warmed instances)
        self._launched: deque[float] = deque()  # launch times still inside their warm-up

    def _clamp(self, n: int) -> int:
        return clamp(n, self.l.min_instances, self.l.max_instances)

    def decide(self, obs: Observation) -> Decision:
        minute = int(obs.now // 60)
        if self._minute is None:
            self._minute = minute
        if minute != self._minute:
            if self._acc_n:
                self._points.append((self._acc / self._acc_n, round(self._acc_instances / self._acc_n)))
            self._minute, self._acc, self._acc_n, self._acc_instances = minute, 0.0, 0, 0
            decision = self._evaluate(obs)
        else:
            decision = None
        # AWS's warm-up is its own 300 s from launch, not Helix's; count our launches' warm-up here.
        while self._launched and obs.now - self._launched[0] >= self.warmup:
            self._launched.popleft()
        warmed = obs.in_service - min(obs.in_service, max(0, len(self._launched) - obs.pending))
        if warmed > 0 and obs.cpu_samples:
            self._acc += sum(obs.cpu_samples) / len(obs.cpu_samples)
            self._acc_n += 1
            self._acc_instances += warmed
        if decision is None:
            decision = Decision(self._clamp(obs.capacity), "no alarm")
        for _ in range(decision.desired - obs.capacity):
            self._launched.append(obs.now)
        return decision

    def _evaluate(self, obs: Observation) -> Decision | None:
        pts = self._points
        if len(pts) >= 3 and all(m > self.target for m, _ in list(pts)[-3:]):
            metric, warmed = pts[-1]
            want = ceil_units(max(1, warmed) * metric / self.target)
            return Decision(
                self._clamp(max(obs.capacity, want)), f"AlarmHigh: CPU {metric:.2f} > {self.target} for 3 min"
            )
        if len(pts) == 15 and all(m < 0.9 * self.target for m, _ in pts):
            if self._launched or obs.pending:
                return Decision(self._clamp(obs.capacity), "AlarmLow, but instances are warming up")
            metric, warmed = pts[-1]
            want = ceil_units(max(1, warmed) * metric / self.target)
            return Decision(
                self._clamp(min(obs.capacity, want)), f"AlarmLow: CPU {metric:.2f} < {0.9 * self.target:.2f} for 15 min"
            )
        return None

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        return None


class K8sHpa:
    """The Kubernetes HorizontalPodAutoscaler algorithm (autoscaling/v2 defaults) driving VMs.

    From the Kubernetes documentation and the controller's source, with these assumptions:
    - Sync period and metric resolution 15 s: every 15 s it reads the latest CPU sample.
    - usageRatio = mean / target; no change while |ratio − 1| ≤ 0.1 (tolerance).
    - Not-ready instances (pending launches, warming up) count at 0% CPU when scaling up and are
      left out when scaling down; missing metrics count at 100% of target when scaling down and 0%
      when scaling up; the ratio is recomputed and the change dropped if it flips direction.
    - desired = ceil(ratio × instances counted).
    - Scale-up limited per 15 s period to max(+100%, +4) of the current count (default policy).
    - Scale-down: 300 s stabilization (the highest recommendation of the last 300 s), then at most
      −100% per period (i.e. no extra limit).
    """

    name = "k8s-hpa"
    period = 15.0

    def __init__(self, limits: Limits, target: float = 0.5, tolerance: float = 0.1, stabilization: float = 300.0):
        self.l, self.target, self.tol = limits, target, tolerance
        self._next = float("-inf")
        self._recs = WindowMax(stabilization)
        self.stabilization = stabilization

    def _clamp(self, n: int) -> int:
        return clamp(n, self.l.min_instances, self.l.max_instances)

    def decide(self, obs: Observation) -> Decision:
        current = obs.capacity
        if obs.now < self._next:
            return Decision(self._clamp(current), "between syncs")
        self._next = obs.now + self.period
        known = len(obs.cpu_samples)
        if not known:
            self._recs.push(obs.now, current)
            return Decision(self._clamp(current), "no metrics")
        total = sum(obs.cpu_samples)
        ratio = total / known / self.target
        not_ready = obs.warming + obs.pending
        rec = current
        if ratio > 1 + self.tol:
            n = known + obs.missing + not_ready
            new_ratio = total / n / self.target
            if new_ratio > 1 + self.tol:
                rec = ceil_units(new_ratio * n)
        elif ratio < 1 - self.tol:
            n = known + obs.missing
            new_ratio = (total + obs.missing * self.target) / n / self.target
            if new_ratio < 1 - self.tol:
                rec = ceil_units(new_ratio * n)
        rec = self._clamp(rec)
        self._recs.push(obs.now, rec)
        why = f"mean CPU {total / known:.2f} over {known}, target {self.target}"
        if rec > current:
            return Decision(self._clamp(min(rec, max(2 * current, current + 4))), why)
        stabilized = int(self._recs.max(obs.now, rec))
        return Decision(self._clamp(min(current, stabilized)), why)

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        return None
