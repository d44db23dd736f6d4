"""`target`: target tracking on the mean CPU of in-service, healthy, warmed-up instances (issue 4 §2).

    desired = ceil(n × mean / target), no change while mean/target is within 1 ± tolerance.

Scale-out happens at once and as far as the formula says; scale-in only to the highest
recommendation of the last `scale_in_window` seconds, so a dip never drops capacity that the next
minute needs again. Pending launches count as capacity (a spike never launches twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller_asg.policy.base import Decision, Observation
from controller_asg.policy.common import ScaleInWindow, ceil_units, clamp, describe, needs, no_metrics


@dataclass
class TargetSettings:
    min_instances: int = 1
    max_instances: int = 10
    cpu_target: float = 0.5
    tolerance: float = 0.1
    scale_in_window: float = 300.0
    metric: str = "CPU"  # what the samples measure, for the reason text
    unit_scale: float = 1.0  # a sample × this is in the metric's own unit (for the reason text)


class TargetTracking:
    name = "target"

    def __init__(self, settings: TargetSettings):
        self.s = settings
        self.window = ScaleInWindow(settings.scale_in_window, settings.min_instances, settings.max_instances)

    def recommend(self, obs: Observation) -> tuple[int, str]:
        """The raw recommendation (before the scale-in window and clamping) and its reason."""
        s = self.s
        need = needs(obs, s.cpu_target)  # the conservative rules for unmeasured instances live there
        if need is None:
            return obs.capacity, no_metrics(obs, s.metric)  # nothing measured: hold what we have
        n = obs.in_service
        what = describe(obs, need.total, need.known, s.cpu_target, s.metric, s.unit_scale)
        if need.known and need.mean_up / s.cpu_target > 1 + s.tolerance:
            return ceil_units(need.up), what
        if n and need.down / n < 1 - s.tolerance:
            return ceil_units(need.down), what
        return obs.capacity, what + f" (within ±{s.tolerance:.2f})"

    def decide(self, obs: Observation) -> Decision:
        s = self.s
        rec, what = self.recommend(obs)
        self.window.seed(obs)
        rec = clamp(rec, s.min_instances, s.max_instances)
        self.window.push(obs.now, rec)
        if rec > obs.capacity:
            return Decision(rec, what)
        # Scale in only as far as the highest recommendation of the window allows.
        allowed = clamp(int(self.window.allowed(obs.now, rec)), s.min_instances, s.max_instances)
        desired = clamp(min(obs.capacity, allowed), s.min_instances, s.max_instances)
        if desired < obs.capacity:
            return Decision(desired, what + f"; highest need in the last {s.scale_in_window:g} s is {allowed}")
        if obs.capacity != desired:  # outside [min, max]
            return Decision(desired, f"keep within [{s.min_instances}, {s.max_instances}]; " + what)
        return Decision(desired, what)

    def export_state(self) -> dict[str, Any]:
        # Recommendations older than the window are useless after a restart; nothing to keep.
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        return None
