"""Run named policies on a demand series and compare them with the oracle (CLI and bench share it)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from controller_asg.policy import policy_with_signals
from controller_asg.sim.fleet import FleetParams, Run, required, simulate
from controller_asg.sim.metrics import Figures, figures
from controller_asg.sim.oracle import Oracle
from shared.config import Config


@dataclass
class Outcome:
    name: str
    run: Run
    figures: Figures


def params_from(
    cfg: Config,
    capacity: float,
    boot_time: float,
    warm_pool: int = 0,
    warm_start: float = 10.0,
    stopped_cost: float = 0.1,
    warm_max_prepared: int = 0,
) -> FleetParams:
    return FleetParams(
        capacity=capacity,
        boot_time=boot_time,
        poll_interval=cfg.poll_interval,
        control_interval=cfg.effective_control_interval,
        warmup=cfg.warmup,
        min_instances=cfg.min_instances,
        max_instances=cfg.max_instances,
        target=cfg.cpu_target,
        warm_pool=warm_pool,
        warm_start=warm_start,
        stopped_cost=stopped_cost,
        warm_max_prepared=warm_max_prepared,
    )


def run_oracle(demand: np.ndarray, p: FleetParams, measure_from: int = 0) -> Run:
    """The oracle runs without a warm pool whatever `p` says: the cost reference stays one bound."""
    p = replace(p, warm_pool=0)
    return simulate(demand, Oracle(required(demand, p), p.boot_time, p.max_instances), p, measure_from=measure_from)


def compare(
    names: list[str],
    demand: np.ndarray,
    p: FleetParams,
    cfg: Config,
    measure_from: int = 0,
    keep_reasons: bool = False,
    backlog: np.ndarray | None = None,
) -> list[Outcome]:
    """Simulate each policy (by name, built from `cfg` with the signals it turns on, as the live
    controller builds it) and the oracle; figures relative to the oracle. `backlog`: the external
    metric, one value per second of `demand`.

    The first `measure_from` seconds are history the policies learn from; figures cover the rest."""
    oracle = run_oracle(demand, p, measure_from)
    oracle_hours = float(oracle.billed.sum()) / 3600.0
    out = []
    for name in names:
        if name == "oracle":
            run = oracle
        else:
            run = simulate(
                demand,
                policy_with_signals(name, cfg, external=backlog is not None),
                p,
                keep_reasons=keep_reasons,
                measure_from=measure_from,
                backlog=backlog,
            )
        out.append(Outcome(name, run, figures(run, p, oracle_hours)))
    return out


def capacity_for_peak(demand: np.ndarray, peak_instances: float, target: float) -> float:
    """Requests/s per instance so that the busiest second of `demand` needs `peak_instances` at `target`."""
    peak = float(np.max(demand)) if len(demand) else 0.0
    return max(peak, 1e-9) / (peak_instances * target)
