"""The churn breaker: launches that never become healthy slow launching down, then stop it.

Pure: the controller feeds it what it launched and what the fleet looks like each step, with the
time; it answers how many launches may go now. It is part of the launch gate (`gate.py`), so
every launch, whatever planned it, is held by it.

Rules, in the order they act:
- A launch *fails* when the instance is not HEALTHY by the end of its health grace (launch +
  HELIX_HEALTH_GRACE), or vanishes before it was ever HEALTHY without us terminating it. It
  *succeeds* the first time its row is HEALTHY.
- Per slot back-off. A failed launch leaves a slot to refill: refilling it waits
  `backoff(depth)`, doubling each time the same slot fails again (10 s, 20 s, 40 s … capped at
  BACKOFF_CAP). Launches beyond the failed slots (real scale-out) are not held.
- The breaker trips after HELIX_BREAKER_FAILURES consecutive failures, each within
  HELIX_BREAKER_WINDOW of the one before (ECS's deployment circuit breaker counts the same way):
  one loud log line, then no scale-out and no replacement launches beyond what HELIX_MIN_INSTANCES
  needs. Min is still kept (a tripped breaker never leaves the service down), but refilling a
  failed slot still waits its back-off, which is what bounds the cost of a broken image to a
  fraction of min. Above min, one probe launch is allowed at a time, `backoff(consecutive
  failures)` after the last failure, so a fixed image is noticed without an operator. Healthy
  instances are kept; launches that failed are terminated by the planner.
- It closes when any launched instance becomes HEALTHY, or when the operator resets it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

BACKOFF_BASE = 10.0
BACKOFF_CAP = 600.0
# Slots not refilled this long after they came due are forgotten (the fleet shrank meanwhile).
SLOT_EXPIRY = 1800.0


def backoff(depth: int) -> float:
    """Seconds to wait before refilling a slot whose launches failed `depth` times in a row."""
    if depth <= 0:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(depth - 1, 30))


@dataclass
class Watched:
    """A launch of ours not yet judged."""

    launched_at: float
    depth: int  # failures of the slot it refills (0: a fresh slot)
    pooled: bool = False  # a warm-pool launch: no fleet slot to refill


@dataclass
class Slot:
    depth: int
    not_before: float


@dataclass
class BreakerEvent:
    """Something the controller must say (and record in the activity log)."""

    kind: str  # "failed" | "healthy" | "tripped" | "closed"
    instance_id: str
    message: str


@dataclass
class ChurnBreaker:
    threshold: int = 3
    window: float = 1800.0
    consecutive: int = 0
    last_failure_at: float = 0.0
    tripped: bool = False
    tripped_at: float = 0.0
    watched: dict[str, Watched] = field(default_factory=dict)
    slots: list[Slot] = field(default_factory=list)

    # -- what happened -------------------------------------------------------------------------

    def launched(self, instances: list[tuple[str, float]], now: float, pooled: bool = False) -> None:
        """Instances a launch answered with, as (id, launched at): each not yet watched refills the
        slot that came due first, else a fresh one. `pooled`: warm-pool launches, judged for the
        streak like any launch but holding no fleet slot (their failures must not hand the fleet's
        refills fresh, short back-offs)."""
        due = sorted((s for s in self.slots if s.not_before <= now), key=lambda s: s.not_before)
        for instance_id, launched_at in instances:
            if instance_id in self.watched:
                continue
            depth = 0
            if pooled:
                self.watched[instance_id] = Watched(min(launched_at, now) if launched_at > 0 else now, 0, True)
                continue
            if due:
                slot = due.pop(0)
                self.slots.remove(slot)
                depth = slot.depth
            self.watched[instance_id] = Watched(min(launched_at, now) if launched_at > 0 else now, depth)

    def forget(self, instance_id: str) -> None:
        """We terminate it for a reason of our own (scale-in): no verdict."""
        self.watched.pop(instance_id, None)

    def observe(
        self, healthy: set[str], present: set[str], now: float, grace: float, grace_from: float = 0.0
    ) -> list[BreakerEvent]:
        """Judge watched launches: `healthy` are ids whose row is HEALTHY, `present` every id the
        provider still lists (not terminating). Grace counts from the launch, or from `grace_from`
        when later (MonitorS restarted, a freeze ended), as the health rules count it."""
        events: list[BreakerEvent] = []
        for instance_id, w in list(self.watched.items()):
            if instance_id in healthy:
                del self.watched[instance_id]
                events.append(BreakerEvent("healthy", instance_id, f"launch {instance_id} became healthy"))
                events += self._success(instance_id, now)
            elif instance_id not in present:
                del self.watched[instance_id]
                events += self._failure(instance_id, w, now, "it vanished before it was ever healthy")
            elif now - max(w.launched_at, grace_from) > grace:
                del self.watched[instance_id]
                events += self._failure(instance_id, w, now, f"it was not healthy within {grace:g}s of launch")
        self.slots = [s for s in self.slots if now - s.not_before < SLOT_EXPIRY]
        return events

    def reset(self, now: float, who: str) -> list[BreakerEvent]:
        was = self.tripped
        self.consecutive, self.tripped, self.slots = 0, False, []
        if not was:
            return []
        return [BreakerEvent("closed", "", f"churn breaker reset by {who}: launches and replacements resume")]

    def _success(self, instance_id: str, now: float) -> list[BreakerEvent]:
        was = self.tripped
        self.consecutive, self.tripped, self.slots = 0, False, []
        if was:
            return [
                BreakerEvent(
                    "closed",
                    instance_id,
                    f"churn breaker closed: launch {instance_id} became healthy; launches and replacements resume",
                )
            ]
        return []

    def _failure(self, instance_id: str, w: Watched, now: float, why: str) -> list[BreakerEvent]:
        if self.consecutive and now - self.last_failure_at > self.window:
            self.consecutive = 0  # the last failure is too old to be part of this streak
        self.consecutive += 1
        self.last_failure_at = now
        depth = w.depth + 1
        if not w.pooled:
            self.slots.append(Slot(depth, now + backoff(depth)))
        events = [
            BreakerEvent(
                "failed",
                instance_id,
                f"launch {instance_id} failed: {why} ({self.consecutive} in a row; refilling its "
                f"slot waits {backoff(depth):g}s)",
            )
        ]
        if not self.tripped and self.consecutive >= self.threshold:
            self.tripped, self.tripped_at = True, now
            events.append(
                BreakerEvent(
                    "tripped",
                    instance_id,
                    f"CHURN BREAKER TRIPPED: {self.consecutive} launches in a row never became healthy; no more "
                    "scale-out or replacement launches, failed launches are terminated, healthy instances kept; one "
                    "probe launch at a time with back-off; it closes when a launch becomes healthy or on "
                    "`python -m controller_asg.breaker_cli reset`",
                )
            )
        return events

    # -- what may go ---------------------------------------------------------------------------

    def allowed(self, wanted: int, now: float, below_min: int = 0) -> tuple[int, str]:
        """How many of `wanted` launches may go now, and why fewer when fewer. `below_min`: how
        many instances the fleet lacks to reach HELIX_MIN_INSTANCES."""
        if wanted <= 0:
            return 0, ""
        blocked = sum(1 for s in self.slots if s.not_before > now)
        if self.tripped:
            # Min is kept even now (a tripped breaker must never leave the service down), but only
            # as fast as the failed slots' back-off allows: that is what bounds the churn.
            refill = max(0, min(wanted, below_min) - blocked)
            if refill:
                return refill, f"churn breaker tripped: only refilling HELIX_MIN_INSTANCES ({refill} now)"
            if self.watched:
                return 0, "churn breaker tripped: a probe launch is still being judged"
            wait = self.last_failure_at + backoff(self.consecutive) - now
            if wait > 0:
                return 0, f"churn breaker tripped: next probe launch in {wait:.0f}s"
            return 1, "churn breaker tripped: one probe launch"
        if blocked:
            first = min(s.not_before for s in self.slots if s.not_before > now)
            return max(0, wanted - blocked), (
                f"{blocked} slot(s) of failed launches back off (next in {first - now:.0f}s)"
            )
        return wanted, ""

    # -- persistence ---------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any], threshold: int, window: float) -> ChurnBreaker:
        """Restore; anything malformed restores a closed breaker (the fleet's own health then
        decides again, at worst a few launches later)."""
        try:
            return cls(
                threshold=threshold,
                window=window,
                consecutive=max(0, int(state.get("consecutive", 0))),
                last_failure_at=float(state.get("last_failure_at", 0.0)),
                tripped=bool(state.get("tripped", False)),
                tripped_at=float(state.get("tripped_at", 0.0)),
                watched={
                    str(k): Watched(float(v["launched_at"]), max(0, int(v["depth"])), bool(v.get("pooled", False)))
                    for k, v in dict(state.get("watched", {})).items()
                },
                slots=[Slot(max(0, int(s["depth"])), float(s["not_before"])) for s in state.get("slots", [])],
            )
        except (TypeError, ValueError, KeyError, AttributeError):
            return cls(threshold=threshold, window=window)
