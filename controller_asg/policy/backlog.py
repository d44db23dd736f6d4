"""`backlog`: size the fleet to an external backlog (a queue's visible messages), as KEDA does:
desired = ceil(backlog / HELIX_EXTERNAL_TARGET), the backlog each instance is sized to work off.

Scale-out at once; scale-in only to the highest recommendation of the last `scale_in_window`
seconds (the window shared with every policy). Conservative rule: a backlog that could not be read
(None) is no opinion at all: hold the fleet, never scale in or out on a missing number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller_asg.policy.base import Decision, Observation
from controller_asg.policy.common import ScaleInWindow, ceil_units, clamp


@dataclass
class BacklogSettings:
    min_instances: int = 0
    max_instances: int = 10
    target: float = 100.0  # backlog per instance
    scale_in_window: float = 300.0


class Backlog:
    name = "backlog"

    def __init__(self, settings: BacklogSettings):
        self.s = settings
        self.window = ScaleInWindow(settings.scale_in_window, settings.min_instances, settings.max_instances)
        self.idle_since: float | None = None  # since when the backlog has been 0 (None: it is not)

    def decide(self, obs: Observation) -> Decision:
        s = self.s
        lo, hi, cap = s.min_instances, s.max_instances, obs.capacity
        self.window.seed(obs)
        backlog = obs.external
        if backlog is None:
            self.idle_since = None
            return Decision(clamp(cap, lo, hi), "backlog unknown (the external metric could not be read): holding")
        if backlog > 0:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = obs.now
        rec = clamp(ceil_units(backlog / s.target), lo, hi)
        self.window.push(obs.now, rec)
        what = f"backlog {backlog:g}, target {s.target:g} per instance"
        if rec >= cap:
            return Decision(rec, f"{what}: {rec} instance{'s' if rec != 1 else ''}" if rec > cap else what)
        allowed = clamp(int(self.window.allowed(obs.now, rec)), lo, hi)
        desired = clamp(min(cap, allowed), lo, hi)
        if desired < cap:
            return Decision(desired, f"{what}; the highest need of the last {s.scale_in_window:g} s is {allowed}")
        return Decision(desired, what)

    def idle_for(self, now: float) -> float:
        """Seconds the backlog has been 0 without a break (0 when it is not)."""
        return now - self.idle_since if self.idle_since is not None else 0.0

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        return None
