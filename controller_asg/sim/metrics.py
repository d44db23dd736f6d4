"""The figures of one run: cost, lost requests, hot seconds, SPEC elasticity metrics, churn."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from controller_asg.sim.fleet import FleetParams, Run, required


@dataclass
class Figures:
    instance_hours: float  # billed: running instance-hours, plus stopped ones × the stopped cost
    cost_vs_oracle: float  # instance-hours / the oracle's (NaN when no oracle given)
    lost_pct: float  # requests lost, % of demand
    hot_pct: float  # % of seconds with instances above 90% CPU
    theta_u: float  # SPEC under-provisioning accuracy θU, %
    theta_o: float  # over-provisioning accuracy θO, %
    tau_u: float  # under-provisioning timeshare τU, %
    tau_o: float  # over-provisioning timeshare τO, %
    actions: int  # launches + terminations (instances)
    launches: int
    terminations: int
    stopped_hours: float = 0.0  # instance-hours stopped in the warm pool (in instance_hours at their cost)
    warm_starts: int = 0  # launches served from the warm pool
    pool_launches: int = 0  # launches that refilled the warm pool

    def as_dict(self) -> dict:
        return asdict(self)


def figures(run: Run, p: FleetParams, oracle_hours: float | None = None) -> Figures:
    d = run.demand
    n = run.in_service.astype(float)
    served = np.minimum(d, n * p.capacity)
    total = float(d.sum())
    lost = float((d - served).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        cpu = np.where(n > 0, np.minimum(1.0, d / (n * p.capacity)), np.where(d > 0, 1.0, 0.0))
    r = required(d, p).astype(float)
    s = n
    denom = np.maximum(r, 1.0)  # r(t) may be 0 when min is 0
    T = len(d)
    hours = float(run.billed.sum()) / 3600.0
    stopped_hours = float(run.stopped.sum()) / 3600.0 if run.stopped is not None else 0.0
    if stopped_hours:
        hours += p.stopped_cost * stopped_hours
    return Figures(
        instance_hours=hours,
        cost_vs_oracle=hours / oracle_hours if oracle_hours else float("nan"),
        lost_pct=100.0 * lost / total if total else 0.0,
        hot_pct=100.0 * float((cpu > 0.9).sum()) / T,
        theta_u=100.0 * float((np.maximum(r - s, 0) / denom).sum()) / T,
        theta_o=100.0 * float((np.maximum(s - r, 0) / denom).sum()) / T,
        tau_u=100.0 * float((r > s).sum()) / T,
        tau_o=100.0 * float((s > r).sum()) / T,
        actions=run.launches + run.terminations,
        launches=run.launches,
        terminations=run.terminations,
        stopped_hours=stopped_hours,
        warm_starts=run.warm_starts,
        pool_launches=run.pool_launches,
    )
