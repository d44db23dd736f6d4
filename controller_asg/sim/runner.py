"""Run named policies on a demand series and compare them with the oracle (CLI and bench share it)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from controller_asg.bounds import CONFIGURED, BoundedPolicy
from controller_asg.policy import policy_with_signals
from controller_asg.policy.base import Decision, Observation, Policy
from controller_asg.sim.fleet import FleetParams, Run, required, simulate
from controller_asg.sim.metrics import Figures, figures
from controller_asg.sim.oracle import Oracle
from shared.config import Config
from shared.schedule import ScheduledAction, active, apply_bounds, next_change


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
    schedule: tuple[ScheduledAction, ...] = (),
    epoch: float = 0.0,
) -> list[Outcome]:
    """Simulate each policy (by name, built from `cfg` with the signals it turns on, as the live
    controller builds it) and the oracle; figures relative to the oracle. `backlog`: the external
    metric, one value per second of `demand`.

    `schedule`: scheduled actions (HELIX_SCHEDULE's syntax, parsed) applied as the live controller
    applies them, through controller_asg/bounds.py; they are evaluated at trace time, `epoch` (the
    Unix time of `demand[0]`) plus the simulated second. The oracle knows no schedule: it stays
    the demand's own bound, so the figures show what a schedule costs or saves.

    The first `measure_from` seconds are history the policies learn from; figures cover the rest."""
    oracle = run_oracle(demand, p, measure_from)
    oracle_hours = float(oracle.billed.sum()) / 3600.0
    out = []
    for name in names:
        if name == "oracle":
            run = oracle
        else:
            if schedule:
                policy = scheduled(name, cfg, schedule, epoch, external=backlog is not None)
            else:
                policy = policy_with_signals(name, cfg, external=backlog is not None)
            run = simulate(
                demand,
                policy,
                p,
                keep_reasons=keep_reasons,
                measure_from=measure_from,
                backlog=backlog,
            )
        out.append(Outcome(name, run, figures(run, p, oracle_hours)))
    return out


class Scheduled:
    """A BoundedPolicy whose bounds follow a schedule at `epoch` + the observation's time: the
    active action is looked up only when it may have changed (`next_change`), so a long run costs
    a few croniter calls per scheduled change, not per step."""

    def __init__(
        self,
        bounded: BoundedPolicy,
        actions: tuple[ScheduledAction, ...],
        cfg_min: int,
        cfg_max: int,
        epoch: float = 0.0,
    ):
        self.bounded, self.actions, self.epoch = bounded, actions, epoch
        self.cfg_min, self.cfg_max = cfg_min, cfg_max
        self.name = bounded.name
        self._due: float | None = float("-inf")  # when to look again (None: never)

    def decide(self, obs: Observation) -> Decision:
        at = self.epoch + obs.now
        if self._due is not None and at >= self._due:
            current = active(self.actions, at)
            lo, hi, desired = apply_bounds(self.cfg_min, self.cfg_max, current)
            why = f'scheduled action "{current.action.name}"' if current else CONFIGURED
            self.bounded.set_bounds(lo, hi, desired, why)
            self._due = next_change(self.actions, at)
        return self.bounded.decide(obs)

    def export_state(self) -> dict[str, Any]:
        return self.bounded.export_state()

    def import_state(self, state: dict[str, Any]) -> None:
        self.bounded.import_state(state)


def scheduled(
    name: str, cfg: Config, actions: tuple[ScheduledAction, ...], epoch: float = 0.0, external: bool | None = None
) -> Policy:
    """Policy `name` built from `cfg` (with its signals) and rebuilt for each scheduled min/max."""

    def factory(lo: int, hi: int) -> Policy:
        return policy_with_signals(name, cfg.replace(min_instances=lo, max_instances=hi), external=external)

    bounded = BoundedPolicy(factory, cfg.min_instances, cfg.max_instances)
    return Scheduled(bounded, actions, cfg.min_instances, cfg.max_instances, epoch)


def capacity_for_peak(demand: np.ndarray, peak_instances: float, target: float) -> float:
    """Requests/s per instance so that the busiest second of `demand` needs `peak_instances` at `target`."""
    peak = float(np.max(demand)) if len(demand) else 0.0
    return max(peak, 1e-9) / (peak_instances * target)
