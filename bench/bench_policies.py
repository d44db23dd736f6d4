"""Policies side by side (issue 6 §2): the seed's loop, AWS target tracking, the Kubernetes HPA,
Helix's `target` and its default `predictive`, against the oracle, on

- a week of NASA-HTTP 1995 (the shipped slice, bench/data/README.md), after a week of history;
- the same week with no history: a controller's first week, when what the policy remembers rests
  on one day at most;
- a synthetic flash crowd (10× within one minute, holding 20 minutes), no history;
- synthetic bursts that recur at about the same times every day, after a day of history.

Common model: 90 s boot, 1 s poll and control interval, 60 s warm-up, min 2 instances, target 0.5,
demand scaled so its busiest second needs 20 instances at the target. Prints one table per
scenario and writes plots and a JSON of the figures to bench/out/.

    python -m bench policies          # or: make bench BENCH_ARGS=policies
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from controller_asg.sim import synthetic
from controller_asg.sim.runner import capacity_for_peak, compare, params_from
from controller_asg.sim.trace import load_trace, smooth
from controller_asg.simulate import table
from shared.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
NASA = os.path.join(HERE, "data", "nasa-1995-07-15-to-28.rps.gz")
OUT = os.path.join(HERE, "out")
POLICIES = ["seed", "aws-target-tracking", "k8s-hpa", "target", "predictive", "oracle"]
DAY = 86400
BOOT = 90.0
PEAK_INSTANCES = 20


def scenarios() -> list[tuple[str, str, np.ndarray, int]]:
    """(key, description, demand in requests/s per second, seconds of history before measuring)."""
    out = []
    nasa = smooth(load_trace(NASA), 60)
    out.append(("nasa", "NASA-HTTP 22-28 Jul 1995 (history 15-21 Jul), 60 s moving average", nasa, 7 * DAY))
    out.append(("nasa-fresh", "NASA-HTTP 22-28 Jul 1995 with no history, 60 s moving average", nasa[7 * DAY :], 0))
    out.append(("flash", "flash crowd: 10x within 1 min, held 20 min, 6 h", synthetic.flash_crowd(), 0))
    out.append(
        (
            "recurring",
            "bursts recurring at about the same times daily, 3 days (history 1 day)",
            synthetic.recurring_bursts(days=4),
            DAY,
        )
    )
    return out


def main() -> None:
    cfg = load_config(
        {"HELIX_MIN_INSTANCES": "2", "HELIX_MAX_INSTANCES": "60", "HELIX_POLL_INTERVAL": "1"}, env_file=""
    )
    os.makedirs(OUT, exist_ok=True)
    results = {}
    for key, title, demand, history in scenarios():
        capacity = capacity_for_peak(demand[history:], PEAK_INSTANCES, cfg.cpu_target)
        p = params_from(cfg, capacity, BOOT)
        started = time.monotonic()
        outcomes = compare(POLICIES, demand, p, cfg, measure_from=history)
        print(
            f"\n{title}: {(len(demand) - history) / DAY:.2f} days measured, {capacity:.3g} req/s per instance, "
            f"boot {BOOT:g} s, min {cfg.min_instances}; simulated in {time.monotonic() - started:.1f} s"
        )
        print(table([(o.name, o.figures.as_dict()) for o in outcomes]))
        results[key] = {o.name: o.figures.as_dict() for o in outcomes}
        verdict(key, results[key])
        try:
            from controller_asg.sim.plot import plot

            shown = [o for o in outcomes if o.name in ("k8s-hpa", "aws-target-tracking", "predictive")]
            plot(os.path.join(OUT, f"policies-{key}.png"), shown, p, title=title)
        except Exception as exc:  # noqa: BLE001 - a missing display backend must not lose the table
            print(f"(plot skipped: {exc})")
    with open(os.path.join(OUT, "policies.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    print(f"\nplots and figures: {OUT}/policies-*.png, policies.json")


def verdict(key: str, figs: dict) -> None:
    """The issue's bar for the default policy, checked and printed (never asserted: a benchmark)."""
    me = figs["predictive"]
    base = {k: v for k, v in figs.items() if k in ("seed", "aws-target-tracking", "k8s-hpa")}
    checks = []
    if key.startswith("nasa"):
        checks.append(("lost < 0.03%", me["lost_pct"] < 0.03))
        checks.append(("fewer lost than k8s-hpa", me["lost_pct"] < figs["k8s-hpa"]["lost_pct"]))
        checks.append(("cost <= 1.02x oracle", me["cost_vs_oracle"] <= 1.02))
    else:
        checks.append(("fewer lost than every baseline", all(me["lost_pct"] < b["lost_pct"] for b in base.values())))
        checks.append(("cost <= 1.05x oracle", me["cost_vs_oracle"] <= 1.05))
    checks.append(("fewer actions than k8s-hpa", me["actions"] < figs["k8s-hpa"]["actions"]))
    print("predictive: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks))


if __name__ == "__main__":
    main()
