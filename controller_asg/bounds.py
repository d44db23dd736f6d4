"""Min/max/desired that change at run time (a schedule, an operator's override) around a policy
built with fixed ones.

    policy = BoundedPolicy(lambda lo, hi: make_policy(cfg.replace(min_instances=lo, max_instances=hi)),
                           cfg.min_instances, cfg.max_instances)
    policy.set_bounds(4, 10, None, 'scheduled action "business"')
    decision = policy.decide(obs)

`BoundedPolicy` is a Policy (`name`, `decide`, `export_state`, `import_state`):
- `set_bounds(min, max, desired, why)`: from the next decision on, decisions stay within
  [min, max], and a `desired` (not None) pins the count. `why` says who set them, for the reasons.
  When min or max differ from the current ones, the inner policy is rebuilt by the factory and its
  learned state (`export_state`, e.g. the predictive policy's recent days) carried over with
  `import_state`; what is not in that state starts afresh, as after a controller restart (the
  scale-in window is seeded with the fleet it finds, so a rebuild never scales in at once). The
  same bounds again, or only another desired or why, rebuild nothing.
- `decide(obs)`: the inner policy always decides (it keeps learning from every observation, pinned
  or not). With a pin, the decision is the pin clamped to [min, max], its reason naming the pin and
  `why`. Otherwise the inner decision clamped to [min, max]; the reason names the bound and `why`
  when the bound changed the decision, or when the fleet was outside the bounds and the decision is
  the bound itself (a raised min or a lowered max taking effect).
- `export_state`/`import_state`: the inner policy's, unchanged (the saved history keeps its format).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controller_asg.policy.base import Decision, Observation, Policy

CONFIGURED = "HELIX_MIN_INSTANCES/HELIX_MAX_INSTANCES"


class BoundedPolicy:
    """A policy whose min/max/desired can change at run time; see the module's doc."""

    def __init__(
        self, factory: Callable[[int, int], Policy], min_instances: int, max_instances: int, why: str = CONFIGURED
    ):
        _check(min_instances, max_instances)
        self._factory = factory
        self._inner = factory(min_instances, max_instances)
        self.name: str = self._inner.name
        self._min, self._max = min_instances, max_instances
        self._desired: int | None = None
        self._why = why

    @property
    def inner(self) -> Policy:
        """The policy built for the bounds in force."""
        return self._inner

    @property
    def bounds(self) -> tuple[int, int, int | None, str]:
        """(min, max, desired or None, why) in force."""
        return self._min, self._max, self._desired, self._why

    def set_bounds(self, min_instances: int, max_instances: int, desired: int | None, why: str) -> None:
        """Bounds for the next decisions (ValueError unless 0 <= min <= max and desired >= 0)."""
        _check(min_instances, max_instances)
        if desired is not None and desired < 0:
            raise ValueError(f"desired={desired}: expected 0 or more")
        if (min_instances, max_instances) != (self._min, self._max):
            state = self._inner.export_state()
            self._inner = self._factory(min_instances, max_instances)
            self._inner.import_state(state)
            self._min, self._max = min_instances, max_instances
        self._desired, self._why = desired, why

    def decide(self, obs: Observation) -> Decision:
        inner = self._inner.decide(obs)
        lo, hi = self._min, self._max
        if self._desired is not None:
            pinned = max(lo, min(hi, self._desired))
            return Decision(pinned, f"desired {pinned} set by {self._why} (the policy would choose {inner.desired})")
        want = max(lo, min(hi, inner.desired))
        if want > inner.desired or (want == lo and obs.capacity < lo):
            return Decision(want, f"{inner.reason}; min {lo} set by {self._why}")
        if want < inner.desired or (want == hi and obs.capacity > hi):
            return Decision(want, f"{inner.reason}; max {hi} set by {self._why}")
        return inner

    def export_state(self) -> dict[str, Any]:
        return self._inner.export_state()

    def import_state(self, state: dict[str, Any]) -> None:
        self._inner.import_state(state)


def _check(lo: int, hi: int) -> None:
    if not 0 <= lo <= hi:
        raise ValueError(f"min={lo} max={hi}: expected 0 <= min <= max")
