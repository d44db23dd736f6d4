"""bench/burst_bound.py: the frontier of what a policy that cannot tell when the next burst starts
can do on the short-bursts members. It is only evidence if it is a real lower bound, so the policies
the bench runs must land on or above it."""

from __future__ import annotations

import numpy as np
import pytest

from bench import bench_bursty, burst_bound
from bench.burst_bound import Point, cheapest_at, describe, frontier, hull, least_cost
from controller_asg.policy import build_policy
from controller_asg.sim import synthetic
from controller_asg.sim.fleet import simulate
from controller_asg.sim.metrics import figures
from controller_asg.sim.runner import capacity_for_peak, params_from, run_oracle


@pytest.mark.parametrize("shape", sorted(bench_bursty.BOUND_SHAPES))
def test_the_parts_say_where_the_bursts_are(shape):
    """The bound trusts `bursts` and `quiet_after`: every second above x1 is in a listed burst, and
    no burst starts within `quiet_after` seconds of the last one's end."""
    for seed in (1, 2):
        parts = bench_bursty.BOUND_SHAPES[shape](seed)
        assert parts.demand.tobytes() == synthetic.member(shape, seed).demand.tobytes()
        listed = np.zeros(len(parts.mult), dtype=bool)
        for start, length in parts.bursts:
            listed[start : start + length] = True
        assert np.array_equal(listed, parts.mult > 1.0)
        ends = [start + length for start, length in parts.bursts]
        starts = [start for start, _ in parts.bursts]
        assert all(nxt - end >= parts.quiet_after for end, nxt in zip(ends[:-1], starts[1:], strict=True))


def test_the_measured_part_keeps_the_bursts_running_into_it():
    parts = synthetic.BurstParts(np.ones(100), np.ones(100), np.ones(100), [(10, 20), (40, 30), (80, 5)], 0)
    parts.mult[10:30] = parts.mult[40:70] = parts.mult[80:85] = 2.0
    later = parts.after(50)
    assert later.bursts == [(0, 20), (30, 5)]  # the one from 40 has 20 s left at 50
    assert np.array_equal(later.demand, parts.demand[50:])
    listed = np.zeros(50, dtype=bool)
    for start, length in later.bursts:
        listed[start : start + length] = True
    assert np.array_equal(listed, later.mult > 1.0)


def test_least_cost_reads_the_frontier_between_its_points():
    pts = [Point(0, 1.0, 4.0), Point(1, 1.2, 2.0), Point(2, 1.4, 1.0)]
    assert least_cost(pts, 5.0) == 1.0
    assert least_cost(pts, 2.0) == 1.2
    assert least_cost(pts, 3.0) == pytest.approx(1.1)  # half-way: alternating headroom 0 and 1
    assert least_cost(pts, 0.5) is None
    assert cheapest_at(pts, 3.0) == (pts[0], pts[1], pytest.approx(0.5))
    assert cheapest_at(pts, 2.0) == (pts[0], pts[1], 1.0)
    assert cheapest_at(pts, 5.0) == (pts[0], pts[0], 0.0)
    assert cheapest_at(pts, 0.5) is None


def test_the_cheapest_policy_is_described_by_its_headroom_and_the_bursts_it_launches_for():
    share = Point(0.45, 1.0, 2.0, "share", 240)
    assert describe(share, share, 45.0) == "+45% >285s"
    assert describe(share, Point(0.7, 1.1, 1.5, "share", 240), 45.0) == "+45%..+70% >285s"
    assert describe(Point(-2.0, 1.0, 2.0, "instances", 0), share, 20.0) == "-2i >20s..+45% >260s"
    assert describe(Point(1.0, 1.0, 2.0, "instances", 30), Point(1.0, 1.0, 2.0, "instances", 30), 90.0) == "+1i >120s"
    half = Point(0.3, 1.0, 2.0, "share", 0, 0.5)
    assert describe(half, half, 20.0) == "+30% >20s x0.5"
    assert describe(half, share, 20.0) == "+30% >20s x0.5..+45% >260s"


def test_the_frontier_is_the_lower_hull_of_both_kinds_of_headroom():
    pts = [
        Point(0, 1.0, 4.0),
        Point(1, 1.2, 2.0),
        Point(2, 1.4, 1.0),
        Point(0.1, 1.1, 2.5, "share"),  # below the line from 1.0 to 1.2: on the hull
        Point(0.3, 1.3, 1.8, "share"),  # above the line from 1.2 to 1.4: never worth it
        Point(0.4, 1.5, 1.0, "share"),  # costs more than a point that loses as little
    ]
    assert [(q.kind, q.headroom) for q in hull(pts)] == [
        ("instances", 0),
        ("share", 0.1),
        ("instances", 1),
        ("instances", 2),
    ]
    assert least_cost(pts, 2.5) == pytest.approx(1.1)
    assert least_cost(pts, 3.25) == pytest.approx(1.05)


@pytest.mark.parametrize("key, boot", [("short-bursts/s1", 20.0), ("short-bursts/s1", 90.0), ("mixed-bursts/s1", 90.0)])
def test_no_policy_the_bench_runs_beats_the_frontier(key, boot):
    demand, history = bench_bursty.scenario(key)
    shape, _, seed = key.partition("/s")
    parts = bench_bursty.BOUND_SHAPES[shape](int(seed)).after(history)
    cfg = bench_bursty.config(boot)
    p = params_from(cfg, capacity_for_peak(parts.demand, bench_bursty.PEAK_INSTANCES, cfg.cpu_target), boot)
    oracle_hours = float(run_oracle(demand, p, measure_from=history).billed.sum()) / 3600.0
    points = frontier(parts, p, oracle_hours)
    for kind in ("instances", "share"):
        for serve in burst_bound.SERVES:
            for launch in burst_bound.LAUNCHES:
                same = [q for q in points if (q.kind, q.serve, q.launch) == (kind, serve, launch)]
                costs = [q.cost_vs_oracle for q in same]
                lost = [q.lost_pct for q in same]
                assert costs == sorted(costs) and lost == sorted(lost, reverse=True), (kind, serve, launch)
    # the headrooms swept reach from far too little to enough
    assert min(q.lost_pct for q in points) < 0.5 < max(q.lost_pct for q in points)
    for name in bench_bursty.SHOWN:
        f = figures(simulate(demand, build_policy(name, cfg), p, measure_from=history), p, oracle_hours)
        least = least_cost(points, f.lost_pct)
        assert least is not None and least <= f.cost_vs_oracle + 1e-9, (name, f.lost_pct, f.cost_vs_oracle, least)
