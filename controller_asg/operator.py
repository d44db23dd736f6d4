"""What an operator steers at run time: capacity overrides, suspended processes, and the bounds
they make together with the settings and the schedule. Pure.

Precedence, field by field (min, max, desired), strongest first:
  1. an operator override (`helix-ctl set-capacity`), until it expires or is cleared;
  2. the scheduled action in force (HELIX_SCHEDULE), unless the `scheduled` process is suspended;
  3. the settings (HELIX_MIN_INSTANCES, HELIX_MAX_INSTANCES; no desired).
When the two bounds then cross (an override's min above a schedule's max, say), the stronger
source's bound wins and the other moves to meet it. A desired count, when one is set, pins the
fleet (within the bounds) and the policy's recommendation is only logged.

The configured max is a ceiling an override may raise only by saying so (`--max`); a desired or
min above the max in force is refused, not clamped, so a typo never launches a fleet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# As EC2 Auto Scaling's suspend-processes, for what Helix does.
PROCESSES = ("launch", "terminate", "replace-unhealthy", "scale-in", "scheduled", "refresh")


@dataclass(frozen=True)
class Override:
    min: int | None
    max: int | None
    desired: int | None
    until: float | None  # epoch seconds; None: until cleared
    who: str
    reason: str
    set_at: float

    def expired(self, now: float) -> bool:
        return self.until is not None and now >= self.until

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Override:
        def count(key: str) -> int | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000:
                raise ValueError(f"override {key}={value!r}: expected an integer from 0 to 100000 or null")
            return value

        until = data.get("until")
        return cls(
            count("min"),
            count("max"),
            count("desired"),
            float(until) if until is not None else None,
            str(data.get("who", ""))[:200],
            str(data.get("reason", ""))[:500],
            float(data.get("set_at", 0.0)),
        )


@dataclass(frozen=True)
class Scheduled:
    """The scheduled action in force, reduced to what it sets."""

    name: str
    min: int | None
    max: int | None
    desired: int | None


@dataclass(frozen=True)
class Bounds:
    min: int
    max: int
    desired: int | None  # pinned count, within [min, max]; None: the policy decides
    source: str  # plain words: "settings", "schedule 'night'", "override by alice until …"

    def describe(self) -> str:
        pinned = f", desired {self.desired}" if self.desired is not None else ""
        return f"min {self.min}, max {self.max}{pinned} ({self.source})"


def resolve_bounds(
    cfg_min: int, cfg_max: int, scheduled: Scheduled | None, override: Override | None, now: float
) -> Bounds:
    """The bounds in force at `now` (an expired override counts as none)."""
    if override is not None and override.expired(now):
        override = None
    layers: list[tuple[int, str, int | None, int | None, int | None]] = [(0, "settings", cfg_min, cfg_max, None)]
    if scheduled is not None:
        layers.append((1, f"schedule {scheduled.name!r}", scheduled.min, scheduled.max, scheduled.desired))
    if override is not None:
        layers.append((2, f"override by {override.who}", override.min, override.max, override.desired))
    lo, hi, desired = cfg_min, cfg_max, None
    lo_rank = hi_rank = 0
    sources = []
    for rank, name, mn, mx, want in layers:
        if rank and (mn is not None or mx is not None or want is not None):
            sources.append(name)
        if mn is not None:
            lo, lo_rank = mn, rank
        if mx is not None:
            hi, hi_rank = mx, rank
        if want is not None:
            desired = want
    if lo > hi:
        if lo_rank >= hi_rank:
            hi = lo
        else:
            lo = hi
    if desired is not None:
        desired = min(max(desired, lo), hi)
    return Bounds(lo, hi, desired, " + ".join(sources) if sources else "settings")


def check_override(current: Bounds, min_: int | None, max_: int | None, desired: int | None) -> list[str]:
    """Problems with `set-capacity` values, one line each naming the field, the value and what was
    expected (empty: fine). `current`: the bounds in force without any override."""
    problems = []
    for name, value in (("min", min_), ("max", max_), ("desired", desired)):
        if value is not None and not 0 <= value <= 100_000:
            problems.append(f"--{name}={value}: expected an integer from 0 to 100000")
    if problems:
        return problems
    if max_ is not None and max_ < 1:
        problems.append(f"--max={max_}: expected at least 1")
    lo = min_ if min_ is not None else current.min
    hi = max_ if max_ is not None else current.max
    if min_ is not None and min_ > hi:
        problems.append(f"--min={min_}: expected at most the max in force, {hi} (raise it with --max)")
    if desired is not None and desired > hi:
        problems.append(f"--desired={desired}: expected at most the max in force, {hi} (raise it with --max)")
    if desired is not None and desired < lo:
        problems.append(f"--desired={desired}: expected at least the min in force, {lo}")
    return problems


def parse_processes(names: list[str]) -> tuple[list[str], list[str]]:
    """(process names, problems); `all` means every process."""
    out: list[str] = []
    problems: list[str] = []
    for name in names:
        if name == "all":
            out.extend(PROCESSES)
        elif name in PROCESSES:
            out.append(name)
        else:
            problems.append(f"process={name!r}: expected one of {', '.join(PROCESSES)} or all")
    if not names:
        problems.append("processes=: expected at least one of " + ", ".join(PROCESSES) + " or all")
    return sorted(set(out), key=PROCESSES.index), problems
