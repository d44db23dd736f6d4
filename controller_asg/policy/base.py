"""The policy contract: a pure function of (observation, its own remembered state) to a decision.

Policies do no I/O and never read a clock: the time comes in the observation, so the live
controller and the simulator run the very same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Observation:
    """What the controller knows at `now`, already reduced from the metrics table and the provider."""

    now: float
    # Instances the fleet has: in service plus pending launches (not those being terminated).
    # Pending launches count as capacity so a spike never launches twice.
    capacity: int
    in_service: int  # registered with MonitorS and polled
    pending: int  # launched, not in service yet
    # CPU (0..1) of each in-service, healthy, warmed-up instance with fresh metrics.
    cpu_samples: tuple[float, ...]
    # In-service instances without usable metrics (stale, failing polls): the HPA rule treats them
    # as at target when scaling in and as 0 when scaling out.
    missing: int = 0
    # In-service instances inside HELIX_WARMUP: they count as capacity, their CPU is left out.
    warming: int = 0
    # The same instances' other per-instance metrics, in the order of `cpu_samples`: requests per
    # second (the app's own counter) and memory in use (0..1).
    rps_samples: tuple[float, ...] = ()
    mem_samples: tuple[float, ...] = ()
    # The external metric on the manager (a queue's backlog), None when there is none or it could
    # not be read just now.
    external: float | None = None
    # Launch-to-in-service time the controller measured on its own recent launches (the median; 0:
    # none measured yet), for a policy that plans a boot time ahead.
    boot_time: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int  # always within [min, max]
    reason: str  # plain words, for the log and the table ("mean CPU 0.83 over 4 …, target 0.50")


class Policy(Protocol):
    name: str

    def decide(self, obs: Observation) -> Decision: ...

    def export_state(self) -> dict[str, Any]:
        """What the policy has learned (history), JSON-serialisable, to survive a restart."""
        ...

    def import_state(self, state: dict[str, Any]) -> None: ...
