"""The least any policy can pay on bursts shorter than the boot time (issue 12 §4), for the
synthetic family's members made of random bursts (`short-bursts`, `mixed-bursts`): whether the
bursty goal is reachable there at all.

A burst that starts at a random time and is over before a launch asked at its first second could
serve is met only by the capacity already standing when it starts. So give a policy every other
advantage. `BaseAware`:
- knows the calm load (the member without its bursts) ahead, and keeps the oracle's supply for it
  plus a headroom: h instances (`kind` "instances"; h < 0 runs the calm load hotter than the
  target, cheaper than the oracle), or the calm load's need without its noise (which the target
  absorbs) × (1 + h), rounded up and held a boot time ahead as the oracle's is (`kind` "share");
- sees a burst's whole size and length at its first second; when the burst outlasts the boot time
  by at least `serve` seconds it launches what the burst needs above the standing capacity then,
  or a share of that (`launch`: half of it loses more for less, a trade a policy that launches on
  what a saturated fleet shows makes, and one that beat the frontier without it), billed from
  then, serving a boot time later, and terminates it at the burst's end. (A launch for a burst barely
  longer than the boot pays for all of it and serves a few seconds: whether that is worth it
  depends on the loss the cost buys, so every `serve` in SERVES is a point of its own.)
- keeps no headroom in the seconds after a burst in which the generator never starts another.
It loses only requests above its standing capacity, in the first boot time of each burst.

Bursts start as a Poisson process (the same chance every second outside those quiet seconds), and
a burst's loss is convex and decreasing in the standing capacity, so a headroom that varies at
random loses more than a steady one of the same mean (Jensen). Steady in what? A burst multiplies
the calm load, so on a load that drifts (mixed-bursts' day) the loss a headroom saves scales with
the load under it: a headroom in proportion to the calm load beats the same mean in instances, and
the frontier has both kinds. Its points, joined by straight lines (alternating two headrooms) along
their lower convex hull, are the frontier: a policy that does not know when the next burst starts
should not do better. That is an argument, not a proof (a frontier of headrooms in instances alone
was beaten on mixed-bursts), so tests/test_burst_bound.py checks the policies the bench runs
against it. `least_cost` reads off the cheapest point that loses no more than a given share; the
bench prints it beside the goal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller_asg.policy.common import ceil_units
from controller_asg.sim.fleet import FleetParams, required
from controller_asg.sim.oracle import forward_max
from controller_asg.sim.synthetic import BurstParts

HEADROOMS = range(-4, 13)  # instances over the calm load's supply
SHARES = [k / 20 for k in range(-6, 21)]  # or this share of it: -30% to +100%
SERVES = (0, 30, 60, 120, 240)  # seconds a launch must serve of a burst before it is asked
LAUNCHES = (0.5, 1.0)  # the share of a burst's need above the standing capacity a launch asks for


@dataclass
class Point:
    headroom: float
    cost_vs_oracle: float
    lost_pct: float
    kind: str = "instances"  # or "share": headroom is a share of the calm need
    serve: int = 0
    launch: float = 1.0


def frontier(parts: BurstParts, p: FleetParams, oracle_hours: float) -> list[Point]:
    """BaseAware for every headroom in HEADROOMS and SHARES and every `serve` in SERVES on the member
    `parts`, with `p`'s boot time, min and max, capacity and target; cost relative to the oracle's
    `oracle_hours`."""
    demand = parts.demand
    total = demand.sum()
    boot = int(np.ceil(p.boot_time))
    calm_need = parts.base / (p.capacity * p.target)  # without its noise, which the target absorbs
    calm_supply = forward_max(required(parts.calm, p), boot)
    need = required(demand, p)
    quiet = np.zeros(len(demand), dtype=bool)
    for start, length in parts.bursts:
        quiet[start + length : start + length + parts.quiet_after] = True
    supply = {
        k: forward_max(np.maximum(p.min_instances, np.ceil(calm_need * (1 + k) - 1e-9)).astype(np.int64), boot)
        for k in SHARES  # 0 among them, which the quiet seconds of a positive share stand at
    }

    def point(headroom: float, kind: str, standing: np.ndarray, serve: int, launch: float) -> Point:
        serving = standing.astype(float)
        billed = standing.astype(float)
        for start, length in parts.bursts:
            if length <= boot + serve:
                continue  # over before a launch could serve `serve` seconds of it: nothing launched
            end = start + length
            extra = ceil_units(launch * max(0, int(need[start:end].max()) - int(standing[start])))
            billed[start:end] += extra
            serving[start + boot : end] += extra
        lost = np.maximum(0.0, demand - serving * p.capacity).sum() / total * 100
        return Point(headroom, float(billed.sum()) / 3600 / oracle_hours, float(lost), kind, serve, launch)

    standings: list[tuple[float, str, np.ndarray]] = []
    for h in HEADROOMS:
        standings.append((float(h), "instances", calm_supply + np.where(quiet, min(h, 0), h)))
    for k in SHARES:
        standings.append((k, "share", np.where(quiet, supply[min(k, 0.0)], supply[k])))
    points = []
    for headroom, kind, standing in standings:
        standing = np.clip(standing, p.min_instances, p.max_instances)
        points += [point(headroom, kind, standing, serve, launch) for serve in SERVES for launch in LAUNCHES]
    return points


def hull(points: list[Point]) -> list[Point]:
    """The lower convex hull of the (cost, lost) points, cheapest first: every mix of two headrooms
    (alternating them) lies on or above it, and no point lies below it."""
    out: list[Point] = []
    for q in sorted(points, key=lambda q: (q.cost_vs_oracle, q.lost_pct)):
        if out and q.lost_pct >= out[-1].lost_pct:
            continue  # costs no less and loses no less than one already on it
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b is above the line from a to q: mixing a and q does better than b
            cross = (b.cost_vs_oracle - a.cost_vs_oracle) * (q.lost_pct - a.lost_pct) - (b.lost_pct - a.lost_pct) * (
                q.cost_vs_oracle - a.cost_vs_oracle
            )
            if cross > 0:
                break
            out.pop()
        out.append(q)
    return out


def cheapest_at(points: list[Point], lost_pct: float) -> tuple[Point, Point, float] | None:
    """How the frontier's cheapest policy losing at most `lost_pct` is made: the two points of the
    hull it alternates and the share of the time it stands at the second, (q, q, 0.0) when one
    point alone does it; None when no headroom measured loses that little."""
    pts = hull(points)
    for i, point in enumerate(pts):
        if point.lost_pct > lost_pct:
            continue
        if i == 0:
            return point, point, 0.0
        before = pts[i - 1]
        return before, point, (before.lost_pct - lost_pct) / (before.lost_pct - point.lost_pct)
    return None


def least_cost(points: list[Point], lost_pct: float) -> float | None:
    """The least cost on the frontier at which at most `lost_pct` is lost (None: no headroom
    measured loses that little). Between two points of the hull the frontier is the straight line
    of alternating them."""
    found = cheapest_at(points, lost_pct)
    return None if found is None else cost_of(found)


def cost_of(found: tuple[Point, Point, float]) -> float:
    """The cost of what `cheapest_at` found: its two points alternated in its share."""
    first, second, share = found
    return first.cost_vs_oracle + share * (second.cost_vs_oracle - first.cost_vs_oracle)


def describe(first: Point, second: Point, boot: float) -> str:
    """What `cheapest_at` found, in a few characters: the headroom over the calm load (a share of
    the calm need, or instances: "i") and the bursts a point launches for (those longer than the
    boot time plus its `serve`, and "x0.5" when it launches half of what they need above the
    standing capacity); "a..b" when it alternates two points."""

    def standing(q: Point) -> str:
        return f"{q.headroom:+.0%}" if q.kind == "share" else f"{q.headroom:+g}i"

    def launches(q: Point) -> str:
        return f">{boot + q.serve:g}s" + ("" if q.launch == 1.0 else f" x{q.launch:g}")

    if (first.kind, first.serve, first.launch) != (second.kind, second.serve, second.launch):
        return f"{standing(first)} {launches(first)}..{standing(second)} {launches(second)}"
    if first.headroom == second.headroom:
        return f"{standing(first)} {launches(first)}"
    return f"{standing(first)}..{standing(second)} {launches(first)}"  # the same launches, two headrooms
