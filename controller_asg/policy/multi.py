"""Several signals, one fleet: one recommender per metric, the largest recommendation wins.

As Kubernetes' HPA ("the maximum replica count across all metrics"), EC2 Auto Scaling and GCP
managed instance groups (the largest capacity wins), and Nomad Autoscaler (the safest). Each
per-instance metric (CPU, requests per second, memory) runs its own copy of the configured policy
on its own samples, expressed in the policy's CPU terms (a sample at that metric's target reads as
the CPU target), so the very same code, smoothing, scale-in window and history apply to each. The
external metric (a queue's backlog) runs `backlog`. Every recommender sees every observation, so
its state stays current whichever wins.

Scale to zero (HELIX_MIN_INSTANCES=0 with an external metric), as KEDA does: the backlog (and, when
scaled on, requests) is the work; CPU and memory say how hard the instances work, not whether there
is any. When the backlog has been empty, and no instance has served a request, for a whole
scale-in window, the fleet goes to zero whatever the idle instances' CPU says (an idle instance's
CPU never quite reaches 0, so it would hold one forever). A backlog that appears again wakes an
empty fleet through the backlog's own recommendation (at least one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller_asg.policy.backlog import Backlog
from controller_asg.policy.base import Decision, Observation, Policy


@dataclass
class Member:
    label: str  # what it measures, in reasons ("CPU", "requests/s", "memory", "backlog")
    policy: Policy
    # Its samples, already in the policy's CPU terms (None: the observation as it is).
    samples: Callable[[Observation], tuple[float, ...]] | None = None


class MultiMetric:
    def __init__(self, members: list[Member], min_instances: int, scale_in_window: float):
        if not members:
            raise ValueError("members: expected at least one metric")
        self.members = members
        self.name = "+".join([members[0].policy.name] + [m.label for m in members[1:]])
        self.min_instances = min_instances
        self.scale_in_window = scale_in_window
        self._served_at: float | None = None  # when an instance last served a request (requests/s > 0)

    def decide(self, obs: Observation) -> Decision:
        decisions: list[tuple[Member, Decision]] = []
        for member in self.members:
            seen = obs if member.samples is None else dataclasses.replace(obs, cpu_samples=member.samples(obs))
            decisions.append((member, member.policy.decide(seen)))
        if any(v > 0 for v in obs.rps_samples) and any(m.label == "requests/s" for m in self.members):
            self._served_at = obs.now
        backlog = next((m.policy for m in self.members if isinstance(m.policy, Backlog)), None)
        quiet = self._served_at is None or obs.now - self._served_at >= self.scale_in_window
        if (
            backlog is not None
            and self.min_instances == 0
            and obs.capacity > 0
            and quiet
            and backlog.idle_for(obs.now) >= self.scale_in_window
        ):
            served = "" if self._served_at is None else " and no request"
            return Decision(0, f"no backlog{served} for {backlog.idle_for(obs.now):.0f} s: scaling to zero")
        # The largest wins; on a tie the first (CPU), so a single metric reads as it always did.
        winner, decision = max(decisions, key=lambda pair: pair[1].desired)
        if len(decisions) == 1:
            return decision
        others = ", ".join(f"{m.label} {d.desired}" for m, d in decisions if m is not winner)
        return Decision(decision.desired, f"{winner.label} wins ({others}): {decision.reason}")

    def export_state(self) -> dict[str, Any]:
        return {"members": {m.label: m.policy.export_state() for m in self.members}}

    def import_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            return
        members = state.get("members")
        if not isinstance(members, dict):
            # History saved before other metrics were configured: it is the CPU policy's.
            self.members[0].policy.import_state(state)
            return
        for member in self.members:
            saved = members.get(member.label)
            if isinstance(saved, dict):
                member.policy.import_state(saved)
