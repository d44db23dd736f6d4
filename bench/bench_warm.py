"""Warm pools in the simulator (issue 12 §3): lost requests and cost against the pool size (0, 1, 2,
4, 8 instances) for `predictive` and k8s-hpa, at a 90 s boot, a 15 s warm start and stopped
instances billed at 0.1 of a running one (controller_asg/sim/fleet.py has the model), on

- the NASA-HTTP week of bench_policies (22-28 Jul 1995 after a week of history, 60 s average);
- every member of the synthetic family of bench_bursty (controller_asg/sim/synthetic.py, seeds
  1, 2, 3).

Cost is relative to the oracle, which has no pool (the same bound at every pool size); it includes
the pool: refills billed in full while they prepare, stopped instances at 0.1. Other settings as
bench_bursty (min 2, max 60, target 0.5, busiest measured second = 20 instances at the target,
HELIX_LAUNCH_LEAD = the boot time). Every figure goes to bench/out/warm.json; BENCH_WORKERS
processes (default: every core), with the same figures whatever their number.

    python -m bench warm            # or: make bench BENCH_ARGS=warm
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import numpy as np

from bench.bench_bursty import config, members, scenario, workers_wanted
from bench.bench_policies import PEAK_INSTANCES
from controller_asg.policy import policy_with_signals
from controller_asg.sim.fleet import simulate
from controller_asg.sim.metrics import figures
from controller_asg.sim.runner import capacity_for_peak, params_from, run_oracle

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
DAY = 86400
BOOT = 90.0
WARM_START = 15.0
STOPPED_COST = 0.1
POOLS = (0, 1, 2, 4, 8)
POLICIES = ("predictive", "k8s-hpa")


def run_member(key: str) -> tuple[str, dict[str, dict[int, dict]]]:
    """Figures of each policy at each pool size, against one oracle run."""
    demand, history = scenario(key)
    cfg = config(BOOT)
    capacity = capacity_for_peak(demand[history:], PEAK_INSTANCES, cfg.cpu_target)
    base = params_from(cfg, capacity, BOOT)
    oracle_hours = float(run_oracle(demand, base, history).billed.sum()) / 3600.0
    out: dict[str, dict[int, dict]] = {name: {} for name in POLICIES}
    for pool in POOLS:
        p = params_from(cfg, capacity, BOOT, pool, WARM_START, STOPPED_COST)
        for name in POLICIES:
            run = simulate(demand, policy_with_signals(name, cfg), p, measure_from=history)
            out[name][pool] = figures(run, p, oracle_hours).as_dict()
    return key, out


def table(name: str, keys: list[str], results: dict[str, dict[str, dict[int, dict]]]) -> str:
    lines = [
        f"{name}: lost % / cost ÷ oracle (stopped inst-h) by warm-pool size",
        f"{'member':<22}" + "".join(f"{f'pool {n}':>24}" for n in POOLS),
    ]
    for key in keys:
        figs = results[key][name]
        lines.append(
            f"{key:<22}"
            + "".join(
                f"{figs[n]['lost_pct']:9.3f}{figs[n]['cost_vs_oracle']:7.3f} ({figs[n]['stopped_hours']:5.1f})"
                for n in POOLS
            )
        )
    fam = [k for k in keys if k != "nasa"]
    lines.append(
        f"{f'mean of {len(fam)} members':<22}"
        + "".join(
            f"{np.mean([results[k][name][n]['lost_pct'] for k in fam]):9.3f}"
            f"{np.mean([results[k][name][n]['cost_vs_oracle'] for k in fam]):7.3f}{'':8}"
            for n in POOLS
        )
    )
    return "\n".join(lines)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    family = members()
    keys = ["nasa"] + [m.name for m in family]
    length = {m.name: len(m.demand) for m in family}
    length["nasa"] = 14 * DAY
    tasks = sorted(keys, key=lambda k: (-length[k], k))
    workers = workers_wanted()
    started = time.monotonic()
    if workers <= 1:
        done = [run_member(k) for k in tasks]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = list(pool.imap_unordered(run_member, tasks, chunksize=1))
    results = dict(done)
    print(
        f"{len(keys)} scenarios x {len(POLICIES)} policies x {len(POOLS)} pool sizes simulated in "
        f"{time.monotonic() - started:.0f} s ({workers} workers); boot {BOOT:g} s, warm start {WARM_START:g} s, "
        f"stopped billed at {STOPPED_COST:g}"
    )
    for name in POLICIES:
        print()
        print(table(name, keys, results))
    fam = [k for k in keys if k != "nasa"]
    losing = {name: [k for k in fam if results[k][name][0]["lost_pct"] > 0] for name in POLICIES}
    print(
        "\nsummary over the family: mean lost %, mean cost / oracle, and of the members where the policy loses"
        " requests without a pool, on how many it loses fewer with one"
    )
    print(f"{'pool':>4}" + "".join(f"{name:>32}" for name in POLICIES))
    for n in POOLS:
        cells = []
        for name in POLICIES:
            lost = np.mean([results[k][name][n]["lost_pct"] for k in fam])
            cost = np.mean([results[k][name][n]["cost_vs_oracle"] for k in fam])
            fewer = sum(results[k][name][n]["lost_pct"] < results[k][name][0]["lost_pct"] for k in losing[name])
            cells.append(f"{lost:8.3f}% {cost:6.3f}x {fewer:>5}/{len(losing[name])} fewer")
        print(f"{n:>4}" + "".join(f"{c:>32}" for c in cells))
    for n in POOLS:
        nasa = results["nasa"]
        me, hpa = nasa["predictive"][n], nasa["k8s-hpa"][n]
        print(
            f"NASA, pool {n}: predictive lost {me['lost_pct']:.3f}% at {me['cost_vs_oracle']:.3f}x, "
            f"{me['actions']} actions ({me['warm_starts']} warm); k8s-hpa lost {hpa['lost_pct']:.3f}% at "
            f"{hpa['cost_vs_oracle']:.3f}x, {hpa['actions']} actions"
        )
    doc = {
        "boot_time": BOOT,
        "warm_start": WARM_START,
        "stopped_cost": STOPPED_COST,
        "pools": list(POOLS),
        "figures": {k: {name: {str(n): results[k][name][n] for n in POOLS} for name in POLICIES} for k in keys},
    }
    with open(os.path.join(OUT, "warm.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    print(f"\nfigures: {OUT}/warm.json")


if __name__ == "__main__":
    main()
