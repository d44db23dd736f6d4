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
from controller_asg.policy.common import WindowMax, ceil_units, clamp


@dataclass
class TargetSettings:
    min_instances: int = 1
    max_instances: int = 10
    cpu_target: float = 0.5
    tolerance: float = 0.1
    scale_in_window: float = 300.0


class TargetTracking:
    name = "target"

    def __init__(self, settings: TargetSettings):
        self.s = settings
        self._recent = WindowMax(settings.scale_in_window)
        self._started = False

    def recommend(self, obs: Observation) -> tuple[int, str]:
        """The raw recommendation (before the scale-in window and clamping) and its reason."""
        s = self.s
        known = len(obs.cpu_samples)
        if known + obs.missing == 0:
            # Nothing measured (all warming, or none in service): hold what we have.
            return (
                obs.capacity,
                f"no CPU metrics yet ({obs.in_service} in service, {obs.warming} warming, {obs.pending} pending)",
            )
        total = sum(obs.cpu_samples)
        # Warming instances serve traffic too, so the fleet's size is every in-service instance.
        n = obs.in_service
        mean_known = total / known if known else s.cpu_target
        # Conservative rule for instances without a usable CPU figure (missing metrics, and those
        # still warming up, whose CPU is left out), as Kubernetes' HPA does for missing and
        # not-ready pods: when scaling out they count as idle (0), so silence never launches and a
        # fresh instance's lagging sample never launches twice; when scaling in they count as at
        # target, so silence never terminates.
        unmeasured = obs.missing + obs.warming
        mean_out = total / (known + unmeasured)
        mean_in = (total + s.cpu_target * unmeasured) / (known + unmeasured)
        what = (
            f"mean CPU {mean_known:.2f} over {known} in-service instance{'s' if known != 1 else ''}"
            + (f" ({obs.missing} without metrics)" if obs.missing else "")
            + f", target {s.cpu_target:.2f}"
        )
        if known and mean_out / s.cpu_target > 1 + s.tolerance:
            want = ceil_units(n * mean_out / s.cpu_target)
            return want, what
        if mean_in / s.cpu_target < 1 - s.tolerance:
            return ceil_units(n * mean_in / s.cpu_target), what
        return obs.capacity, what + f" (within ±{s.tolerance:.2f})"

    def _window_seed(self, obs: Observation) -> None:
        self._recent.push(obs.now, min(max(obs.capacity, self.s.min_instances), self.s.max_instances))

    def decide(self, obs: Observation) -> Decision:
        s = self.s
        rec, what = self.recommend(obs)
        if not self._started and self.s.scale_in_window > 0:
            # A (re)started policy has seen nothing yet: the fleet it finds counts as the first
            # recommendation, so a restart never scales in before a full window has been observed.
            self._started = True
            self._window_seed(obs)
        rec = clamp(rec, s.min_instances, s.max_instances)
        self._recent.push(obs.now, rec)
        if rec > obs.capacity:
            return Decision(rec, what)
        # Scale in only as far as the highest recommendation of the window allows.
        allowed = clamp(int(self._recent.max(obs.now, rec)), s.min_instances, s.max_instances)
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
