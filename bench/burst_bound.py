"""The least any policy can pay on bursts shorter than the boot time (issue 12 §4), for the
synthetic family's members made of random bursts (`short-bursts`, `mixed-bursts`): whether the
bursty goal is reachable there at all.

A burst that starts at a random time and is over before a launch asked at its first second could
serve is met only by the capacity already standing when it starts. So give a policy every other
advantage. `BaseAware(h)`:
- knows the calm load (the member without its bursts) ahead, and keeps the oracle's supply for it
  plus h instances (h < 0: it runs the calm load hotter than the target, cheaper than the oracle);
- sees a burst's whole size and length at its first second; when the burst outlasts the boot time
  it launches exactly what the burst needs then (billed from then, serving a boot time later) and
  terminates it at the burst's end;
- keeps no headroom in the seconds after a burst in which the generator never starts another.
It loses only requests above its standing capacity, in the first boot time of each burst.

Bursts start as a Poisson process (the same chance every second outside those quiet seconds), and
a burst's loss is convex and decreasing in the standing capacity, so a headroom that varies over
time loses more than a constant one of the same mean (Jensen). The (cost, lost) points over integer
h, joined by straight lines (alternating two headrooms), are the frontier: no policy that does not
know when the next burst starts does better. `least_cost` reads off the cheapest point that loses
no more than a given share; the bench prints it beside the goal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller_asg.sim.fleet import FleetParams, required
from controller_asg.sim.oracle import forward_max
from controller_asg.sim.synthetic import BurstParts

HEADROOMS = range(-4, 13)


@dataclass
class Point:
    headroom: int
    cost_vs_oracle: float
    lost_pct: float


def frontier(parts: BurstParts, p: FleetParams, oracle_hours: float) -> list[Point]:
    """BaseAware(h) for every h in HEADROOMS on the member `parts`, with `p`'s boot time, min and
    max, capacity and target; cost relative to the oracle's `oracle_hours`."""
    demand = parts.demand
    boot = int(np.ceil(p.boot_time))
    calm_supply = forward_max(required(parts.calm, p), boot)
    need = required(demand, p)
    quiet = np.zeros(len(demand), dtype=bool)
    for start, length in parts.bursts:
        quiet[start + length : start + length + parts.quiet_after] = True
    points = []
    for h in HEADROOMS:
        standing = np.clip(calm_supply + np.where(quiet, min(h, 0), h), p.min_instances, p.max_instances)
        serving = standing.astype(float)
        billed = standing.astype(float)
        for start, length in parts.bursts:
            if length <= boot:
                continue  # over before a launch could serve: nothing to launch for
            end = start + length
            extra = max(0, int(need[start:end].max()) - int(standing[start]))
            billed[start:end] += extra
            serving[start + boot : end] += extra
        lost = np.maximum(0.0, demand - serving * p.capacity).sum() / demand.sum() * 100
        points.append(Point(h, float(billed.sum()) / 3600 / oracle_hours, float(lost)))
    return points


def least_cost(points: list[Point], lost_pct: float) -> float | None:
    """The least cost on the frontier at which at most `lost_pct` is lost (None: not within
    HEADROOMS). More headroom costs more and loses less; between two headrooms the frontier is the
    straight line of alternating them."""
    pts = sorted(points, key=lambda q: q.headroom)
    for i, point in enumerate(pts):
        if point.lost_pct > lost_pct:
            continue
        before = pts[i - 1] if i else None
        if before is None or before.lost_pct == point.lost_pct:
            return point.cost_vs_oracle
        share = (before.lost_pct - lost_pct) / (before.lost_pct - point.lost_pct)
        return before.cost_vs_oracle + share * (point.cost_vs_oracle - before.cost_vs_oracle)
    return None
