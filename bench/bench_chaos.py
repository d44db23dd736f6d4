"""`make bench BENCH_ARGS=chaos`: thousands of random fault schedules through the fault-injection
harness (tests/faultsim.py: the real Controller against a simulated cloud on a simulated clock),
and the broken-image scenario's cost.

Environment: CHAOS_SCHEDULES (default 2000), CHAOS_SEED (default 1), CHAOS_WORKERS (default 2).
Prints: schedules run, steps, violations (must be 0), worst overshoot above max, worst time to
converge after the faults stop, and the instance-hours a broken image burns.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import tempfile
import time

from controller_asg.breaker import BACKOFF_CAP
from shared.table import MetricsTable
from tests.faultsim import FAULT_KINDS, Fault, Harness, RunReport, quiet_logs, unique_table_name

FAULTS_END = 1200
SETTLE = BACKOFF_CAP + 300.0


def random_schedule(rng: random.Random) -> list[Fault]:
    """The same family the test's Hypothesis strategy draws from."""
    return [
        Fault(rng.randrange(FAULTS_END), rng.choice(FAULT_KINDS), rng.randint(1, 120), rng.randint(1, 40))
        for _ in range(rng.randint(1, 40))
    ]


def run_one(seed: int) -> tuple[int, RunReport, list[Fault]]:
    quiet_logs()
    rng = random.Random(seed)
    faults = random_schedule(rng)
    name = unique_table_name()
    with tempfile.TemporaryDirectory(prefix="helix-chaos-bench-") as state:
        h = Harness(
            name,
            state,
            seed=seed,
            HELIX_POLICY=rng.choice(["predictive", "target"]),
            HELIX_MIN_INSTANCES=rng.randint(0, 3),
            HELIX_MAX_INSTANCES=rng.randint(3, 10),
        )
        try:
            report = h.run(faults, FAULTS_END, settle=SETTLE)
        finally:
            h.close()
            MetricsTable.remove(name)
    return seed, report, faults


def broken_image(hours: float, grace: float) -> tuple[RunReport, float, float]:
    """Min 2, max 10, every launch's app never starts: billed instance-hours in the first hour of
    breakage, and per hour after it."""
    quiet_logs()
    name = unique_table_name()
    with tempfile.TemporaryDirectory(prefix="helix-chaos-bench-") as state:
        h = Harness(name, state, HELIX_MIN_INSTANCES=2, HELIX_MAX_INSTANCES=10, HELIX_HEALTH_GRACE=grace)
        try:
            h.cloud.broken_image = True
            h.run_until(3600)
            first = h.report.instance_seconds_unhealthy / 3600
            h.run_until(hours * 3600)
            report = h.report
            report.launches = h.cloud.launches
        finally:
            h.close()
            MetricsTable.remove(name)
    return report, first, (report.instance_seconds_unhealthy / 3600 - first) / (hours - 1)


def main() -> None:
    schedules = int(os.environ.get("CHAOS_SCHEDULES", "2000"))
    base_seed = int(os.environ.get("CHAOS_SEED", "1"))
    workers = int(os.environ.get("CHAOS_WORKERS", "2"))
    started = time.monotonic()
    steps = violations = worst_overshoot = 0
    worst_converge = 0.0
    not_converged: list[int] = []
    shown = 0
    seeds = range(base_seed, base_seed + schedules)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for n, (seed, report, faults) in enumerate(pool.imap_unordered(run_one, seeds), 1):
            steps += report.steps
            violations += len(report.violations)
            worst_overshoot = max(worst_overshoot, report.worst_overshoot)
            if report.converged_after is None:
                not_converged.append(seed)
            else:
                worst_converge = max(worst_converge, report.converged_after)
            if (report.violations or report.converged_after is None) and shown < 5:
                shown += 1
                print(
                    f"  seed {seed}: {len(report.violations)} violation(s), converged after "
                    f"{report.converged_after}; first: {report.violations[:1]}; faults: {faults[:8]}"
                )
            if n % 200 == 0:
                print(
                    f"  {n}/{schedules} schedules, {violations} violations, {time.monotonic() - started:.0f} s",
                    flush=True,
                )
    print(f"schedules run              {schedules}  (seeds {base_seed}..{base_seed + schedules - 1})")
    print(f"simulated steps            {steps}  ({steps / 3600:.0f} simulated hours)")
    print(f"violations                 {violations}  (must be 0)")
    print(f"worst overshoot above max  {worst_overshoot}")
    print(f"did not converge           {len(not_converged)}  {not_converged[:10]}")
    print(f"worst time to converge     {worst_converge:.0f} s after the faults stopped (bound {SETTLE:.0f} s)")
    for grace in (30.0, 300.0):
        report, first, after = broken_image(6, grace)
        tripped = f"{report.breaker_tripped_at / 60:.1f} min" if report.breaker_tripped_at is not None else "never"
        print(
            f"broken image, 6 h, grace {grace:>3.0f} s: {report.launches} launches, breaker tripped after {tripped}, "
            f"billed instance-hours beyond the healthy fleet: {first:.2f} in the first hour, {after:.2f} per hour "
            "after (goal < 1)"
        )
    print(f"wall time                  {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
