"""`threshold`: the seed's behaviour (issue 4 §2).

Mean CPU above `cpu_upper` adds `step` instances, below `cpu_lower` removes `step`, then nothing
happens for `cooldown` seconds. Pending launches count as capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller_asg.policy.base import Decision, Observation
from controller_asg.policy.common import clamp


@dataclass
class ThresholdSettings:
    min_instances: int = 1
    max_instances: int = 10
    cpu_upper: float = 0.7
    cpu_lower: float = 0.3
    step: int = 1
    cooldown: float = 60.0


class Threshold:
    name = "threshold"

    def __init__(self, settings: ThresholdSettings):
        self.s = settings
        self._last_action: float | None = None

    def decide(self, obs: Observation) -> Decision:
        s = self.s
        lo, hi = s.min_instances, s.max_instances
        if not lo <= obs.capacity <= hi:
            return Decision(clamp(obs.capacity, lo, hi), f"keep within [{lo}, {hi}]")
        if self._last_action is not None and obs.now - self._last_action < s.cooldown:
            return Decision(obs.capacity, f"cooldown: {s.cooldown - (obs.now - self._last_action):.0f} s left")
        known = len(obs.cpu_samples)
        if known + obs.missing == 0:
            return Decision(obs.capacity, "no CPU metrics yet")
        total = sum(obs.cpu_samples)
        # Missing metrics, conservatively: idle when deciding to add (silence never launches),
        # at the middle of the band when deciding to remove (silence never terminates).
        mean_out = total / (known + obs.missing)
        mean_in = (total + obs.missing * (s.cpu_upper + s.cpu_lower) / 2) / (known + obs.missing)
        shown = total / known if known else 0.0
        what = f"mean CPU {shown:.2f} over {known} in-service instance{'s' if known != 1 else ''}"
        if known and mean_out > s.cpu_upper:
            desired = clamp(obs.capacity + s.step, lo, hi)
            if desired != obs.capacity:
                self._last_action = obs.now
            return Decision(desired, what + f", above {s.cpu_upper:.2f}")
        if mean_in < s.cpu_lower:
            desired = clamp(obs.capacity - s.step, lo, hi)
            if desired != obs.capacity:
                self._last_action = obs.now
            return Decision(desired, what + f", below {s.cpu_lower:.2f}")
        return Decision(obs.capacity, what + f", within [{s.cpu_lower:.2f}, {s.cpu_upper:.2f}]")

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        return None
