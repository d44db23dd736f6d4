"""The simulator's figures (controller_asg/sim/metrics.py) on small hand-made runs, rule by rule:
cost, lost demand, hot seconds (including seconds with nobody in service), the SPEC elasticity
metrics when the required supply is 0 or 1, and silence (no numpy warnings) on such runs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from controller_asg.sim.fleet import FleetParams, Run
from controller_asg.sim.metrics import Figures, figures


def run(demand, in_service, billed=None, launches=0, terminations=0) -> Run:
    in_service = np.array(in_service)
    return Run(
        demand=np.array(demand, dtype=float),
        in_service=in_service,
        billed=np.array(in_service if billed is None else billed),
        launches=launches,
        terminations=terminations,
        reasons=[],
    )


def test_hot_seconds_use_strictly_above_90_percent():
    """Rule: a second is hot when the in-service CPU is above 0.9: exactly 0.9 is not hot."""
    p = FleetParams(capacity=10.0, min_instances=1)
    f = figures(run([9.0, 9.5, 5.0, 20.0], [1, 1, 1, 1]), p)
    assert f.hot_pct == pytest.approx(50.0)  # 0.95 and 2.0 (capped at 1) are hot; 0.9 and 0.5 are not


def test_a_second_with_nobody_in_service_is_hot_only_if_there_is_demand():
    """Rule: with no instance in service, any demand (however small) makes the second hot; no
    demand leaves it cool. One instance is judged by its load, not as "nobody"."""
    p = FleetParams(capacity=10.0, min_instances=0)
    f = figures(run([0.5, 0.0, 1.0, 0.0], [0, 0, 1, 1]), p)
    assert f.hot_pct == pytest.approx(25.0)  # only t=0
    assert f.lost_pct == pytest.approx(100.0 * 0.5 / 1.5)  # t=0's demand was lost


def test_figures_are_silent_on_runs_with_nobody_in_service():
    """Rule: seconds with no instance in service (0/0, x/0) raise no numpy warning: the CLI
    prints figures, not RuntimeWarnings."""
    p = FleetParams(capacity=10.0, min_instances=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = figures(run([3.0, 0.0, 0.0], [0, 0, 2]), p)
    assert f.hot_pct == pytest.approx(100 / 3)


def test_lost_demand_and_no_demand_at_all():
    """Rule: lost % is the demand above what in-service instances serve, over all demand; a run
    without any demand lost nothing (0, not a division by zero)."""
    p = FleetParams(capacity=10.0)
    f = figures(run([25.0, 5.0, 10.0], [2, 0, 1]), p)
    assert f.lost_pct == pytest.approx(100.0 * (5.0 + 5.0) / 40.0)
    idle = figures(run([0.0, 0.0], [1, 1]), p)
    assert idle.lost_pct == 0.0 and idle.hot_pct == 0.0


def test_cost_in_instance_hours_and_against_the_oracle():
    """Rule: instance-hours are billed instance-seconds / 3600; cost_vs_oracle divides by the
    oracle's hours, and is NaN without an oracle (None or 0 hours)."""
    p = FleetParams(capacity=10.0)
    r = run([1.0] * 4, [1, 1, 1, 1], billed=[2, 2, 3, 3])
    f = figures(r, p, oracle_hours=5 / 3600)
    assert f.instance_hours == pytest.approx(10 / 3600)
    assert f.cost_vs_oracle == pytest.approx(2.0)
    assert math.isnan(figures(r, p).cost_vs_oracle) and math.isnan(figures(r, p, oracle_hours=0.0).cost_vs_oracle)


def test_elasticity_metrics_divide_by_at_least_one_instance():
    """Rule: θU and θO divide each second's shortfall or excess by the required supply r(t), or
    by 1 when r(t) is 0 (min 0, no demand): r = 1 with nobody serving is a 100% shortfall,
    r = 0 with one serving a 100% excess."""
    p = FleetParams(capacity=1.0, target=0.5, min_instances=0)
    # r(t) = ceil(demand / 0.5): 1, 0, 2, 1
    f = figures(run([0.5, 0.0, 1.0, 0.25], [0, 1, 2, 4]), p)
    assert f.theta_u == pytest.approx(100.0 * (1 / 1) / 4)
    assert f.theta_o == pytest.approx(100.0 * (1 / 1 + 3 / 1) / 4)
    assert (f.tau_u, f.tau_o) == (pytest.approx(25.0), pytest.approx(50.0))


def test_actions_count_launches_and_terminations():
    """Rule: actions = launches + terminations, each kept as well."""
    f = figures(run([1.0], [1], launches=3, terminations=2), FleetParams(capacity=10.0))
    assert (f.actions, f.launches, f.terminations) == (5, 3, 2)


def test_as_dict_holds_every_figure():
    """Rule: as_dict() is every field by name (the CLI's JSON)."""
    f = figures(run([5.0, 15.0], [1, 1], launches=1), FleetParams(capacity=10.0), oracle_hours=2 / 3600)
    d = f.as_dict()
    assert list(d) == [field for field in Figures.__dataclass_fields__]
    assert d["lost_pct"] == f.lost_pct == pytest.approx(25.0)
    assert d["cost_vs_oracle"] == pytest.approx(1.0) and d["launches"] == 1
