"""A fingerprint of every decision `predictive` and `target` take, to compare two commits: a
refactor of a policy must leave every action and its reason as they were.

On NASA (a week after a week of history, the shipped slice), a flash crowd, recurring bursts,
ramps and a noisy constant, at 20 s and 90 s boot: per case, the SHA-256 of the list of
(time, from, to, reason) of every change, the number of changes, lost % and cost against the
oracle. Run it at both commits and diff the output:

    make bench BENCH_ARGS=decisions
"""

from __future__ import annotations

import hashlib
import json
import os

from controller_asg.sim import synthetic
from controller_asg.sim.runner import capacity_for_peak, compare, params_from
from controller_asg.sim.trace import load_trace, smooth
from shared.config import load_config

DAY = 86400
NASA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "nasa-1995-07-15-to-28.rps.gz")


def main() -> None:
    cfg = load_config(
        {"HELIX_MIN_INSTANCES": "2", "HELIX_MAX_INSTANCES": "60", "HELIX_POLL_INTERVAL": "1"}, env_file=""
    )
    nasa = smooth(load_trace(NASA), 60)
    cases = [
        ("nasa", nasa[: 9 * DAY], 7 * DAY),
        ("flash", synthetic.flash_crowd(), 0),
        ("recurring", synthetic.recurring_bursts(days=3), DAY),
        ("ramps", synthetic.ramps(), 0),
        ("noisy", synthetic.noisy_constant(6 * 3600, 100.0), 0),
    ]
    print(f"{'policy':<11} {'case':<14} {'decisions sha256':<17} {'changes':>7} {'lost %':>8} {'cost':>6}")
    for policy in ("predictive", "target"):
        for key, demand, history in cases:
            capacity = capacity_for_peak(demand[history:], 20, cfg.cpu_target)
            for boot in (20.0, 90.0):
                p = params_from(cfg, capacity, boot)
                [outcome] = compare([policy], demand, p, cfg, measure_from=history, keep_reasons=True)
                digest = hashlib.sha256(json.dumps(outcome.run.reasons).encode()).hexdigest()[:16]
                fig = outcome.figures
                print(
                    f"{policy:<11} {key + '@' + format(boot, 'g'):<14} {digest:<17} {len(outcome.run.reasons):>7} "
                    f"{fig.lost_pct:>8.4f} {fig.cost_vs_oracle:>6.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
