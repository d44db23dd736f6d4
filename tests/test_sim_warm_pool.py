"""The simulator's warm pool (controller_asg/sim/fleet.py, issue 12 §3), rule by rule on scripted
policies: warm instances first, in service after the warm start; refills prepare for the boot time
and then stop; scale-in hands instances back to the pool; stopped instances billed at their
fraction; no pool is the model as it was, array for array. And the CLI's three flags."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from controller_asg.policy.base import Decision, Observation
from controller_asg.sim import synthetic
from controller_asg.sim.fleet import FleetParams, simulate
from controller_asg.sim.metrics import figures
from controller_asg.sim.runner import compare
from shared.config import load_config
from tests.test_simulate import run_cli


class Schedule:
    """Wants `plan(t)` instances; remembers every observation."""

    def __init__(self, plan):
        self.plan = plan
        self.seen: dict[int, Observation] = {}

    def decide(self, obs: Observation) -> Decision:
        self.seen[int(obs.now)] = obs
        return Decision(self.plan(int(obs.now)), "scripted")


def params(**kw) -> FleetParams:
    base = {"capacity": 10.0, "boot_time": 10, "warmup": 2, "min_instances": 1, "max_instances": 30}
    return FleetParams(**{**base, "warm_pool": 2, "warm_start": 3, **kw})


def test_a_scale_out_starts_warm_instances_first_and_they_serve_after_the_warm_start():
    demand = np.full(30, 35.0)
    pol = Schedule(lambda t: 1 if t < 5 else 4)
    run = simulate(demand, pol, params(), initial=1)
    # two warm (in service at 5 + 3), one cold (at 5 + 10)
    assert run.in_service.tolist() == [1] * 8 + [3] * 7 + [4] * 15
    assert (run.launches, run.warm_starts, run.pool_launches) == (3, 2, 2)
    # the policy sees warm starts as pending, like cold launches
    o6 = pol.seen[6]
    assert (o6.capacity, o6.in_service, o6.pending) == (4, 1, 3)
    assert (pol.seen[9].in_service, pol.seen[9].pending, pol.seen[9].warming) == (3, 1, 2)


def test_refills_prepare_for_the_boot_time_billed_in_full_then_stop():
    demand = np.full(30, 35.0)
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else 4), params(), initial=1)
    # running: 1 serving; from 5: + 2 warm starts + 1 cold + 2 refills preparing until 15
    assert run.billed.tolist() == [1] * 5 + [6] * 10 + [4] * 15
    assert run.stopped is not None
    assert run.stopped.tolist() == [2] * 5 + [0] * 10 + [2] * 15


def test_an_instance_still_preparing_cannot_start_warm():
    demand = np.full(40, 35.0)
    # 1 -> 3 at t=5 empties the pool; 3 -> 4 at t=8 finds only refills preparing: cold
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else (3 if t < 8 else 4)), params(), initial=1)
    assert run.in_service.tolist() == [1] * 8 + [3] * 10 + [4] * 22
    assert (run.warm_starts, run.pool_launches) == (2, 2)
    # after the refills have stopped (t=15), the next scale-out is warm again
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else (3 if t < 20 else 4)), params(), initial=1)
    assert run.in_service.tolist() == [1] * 8 + [3] * 15 + [4] * 17
    assert (run.warm_starts, run.pool_launches) == (3, 3)


def test_scale_in_hands_instances_back_in_place_of_refills_else_terminates():
    demand = np.full(40, 5.0)
    # 1 -> 3 at t=5 (warm, refills prepare until 15); 3 -> 2 at t=10: the newest in service goes
    # back to the pool, stopped, and one refill is cancelled
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else (3 if t < 10 else 2)), params(), initial=1)
    assert run.stopped is not None
    assert run.in_service.tolist() == [1] * 8 + [3] * 2 + [2] * 30
    assert run.billed.tolist() == [1] * 5 + [5] * 5 + [3] * 5 + [2] * 25
    assert run.stopped.tolist() == [2] * 5 + [0] * 5 + [1] * 5 + [2] * 25
    assert (run.launches, run.terminations) == (2, 1)
    # with the pool full again, a scale-in terminates: billed and stopped both drop
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else (3 if t < 20 else 2)), params(), initial=1)
    assert run.stopped is not None
    assert run.billed.tolist()[19:21] == [3, 2] and run.stopped.tolist()[19:21] == [2, 2]


def test_a_cancelled_warm_start_goes_back_to_the_pool_and_a_cancelled_cold_launch_is_terminated():
    demand = np.full(30, 5.0)
    # 1 -> 4 at t=5 (2 warm, 1 cold); 4 -> 2 at t=6: the cold launch, then the newest warm start
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else (4 if t < 6 else 2)), params(), initial=1)
    assert run.stopped is not None
    assert run.in_service.tolist() == [1] * 8 + [2] * 22
    assert run.billed.tolist()[4:8] == [1, 6, 3, 3]  # serving + 1 warm start + 1 refill
    assert run.stopped.tolist()[4:8] == [2, 0, 1, 1]


def test_max_prepared_caps_running_and_pool_together():
    demand = np.full(60, 5.0)
    p = params(warm_pool=3, warm_max_prepared=5)
    # 1 running: the pool holds 3; 1 -> 4 at t=5 starts all 3 warm, and the cap leaves room for 1 refill;
    # 4 -> 2 at t=30: both go back to the pool, which the cap now lets hold 3
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else (4 if t < 30 else 2)), p, initial=1)
    assert run.stopped is not None
    assert run.in_service.tolist() == [1] * 8 + [4] * 22 + [2] * 30
    assert run.stopped.tolist() == [3] * 5 + [0] * 10 + [1] * 15 + [3] * 30
    assert run.billed.tolist() == [1] * 5 + [5] * 10 + [4] * 15 + [2] * 30
    assert (run.warm_starts, run.pool_launches) == (3, 1)
    # a cold launch that fills the cap cancels the refill still preparing
    p = params(warm_pool=2, warm_max_prepared=4)
    run = simulate(demand, Schedule(lambda t: 1 if t < 5 else (3 if t < 7 else 4)), p, initial=1)
    assert run.stopped is not None
    assert run.billed.tolist()[4:8] == [1, 4, 4, 4] and not run.stopped[5:].any()
    assert (run.warm_starts, run.pool_launches) == (2, 1)


def test_stopped_instances_are_billed_at_their_fraction_and_reported_apart():
    demand = np.full(3600, 5.0)
    p = params(warm_pool=4, stopped_cost=0.25)
    run = simulate(demand, Schedule(lambda t: 1), p, initial=1)
    f = figures(run, p, oracle_hours=1.0)
    assert f.stopped_hours == pytest.approx(4.0)
    assert f.instance_hours == pytest.approx(1.0 + 0.25 * 4.0)
    assert f.cost_vs_oracle == pytest.approx(2.0)
    assert (f.warm_starts, f.pool_launches, f.actions) == (0, 0, 0)


def test_the_oracle_keeps_its_model_without_a_pool():
    demand = synthetic.flash_crowd(hours=1.0, base=10.0, at=1200, hold=600)
    cfg = load_config({"HELIX_MIN_INSTANCES": "2", "HELIX_MAX_INSTANCES": "60"}, env_file="")
    p = FleetParams(capacity=float(demand.max()) / 10, boot_time=90, min_instances=2, max_instances=60)
    with_pool = {o.name: o for o in compare(["oracle", "k8s-hpa"], demand, replace(p, warm_pool=4), cfg)}
    without = {o.name: o for o in compare(["oracle", "k8s-hpa"], demand, p, cfg)}
    oracle = with_pool["oracle"].run
    assert oracle.stopped is not None and not oracle.stopped.any() and oracle.warm_starts == 0
    assert oracle.billed.tolist() == without["oracle"].run.billed.tolist()
    hpa = with_pool["k8s-hpa"].figures
    assert hpa.warm_starts > 0 and hpa.stopped_hours > 0 and hpa.lost_pct < without["k8s-hpa"].figures.lost_pct


class Scripted:
    """Target tracking on each raw sample, with seeded random jumps: launches, cancelled launches and
    terminations in every combination, from a policy no tuning of the real ones can change."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.seen: list[tuple] = []

    def decide(self, obs: Observation) -> Decision:
        first = round(obs.cpu_samples[0], 9) if obs.cpu_samples else -1.0
        self.seen.append((obs.now, obs.capacity, obs.in_service, obs.pending, obs.warming, len(obs.cpu_samples), first))
        want = obs.capacity
        if obs.cpu_samples:
            want = math.ceil(obs.in_service * sum(obs.cpu_samples) / len(obs.cpu_samples) / 0.5 - 1e-9)
        r = self.rng.random()
        if r < 0.01:
            want += int(self.rng.integers(1, 6))
        elif r < 0.02:
            want -= int(self.rng.integers(1, 6))
        return Decision(max(1, min(30, want)), "scripted")


# Digests of what the model before the warm pool produced (in service, billed, and every
# observation) for the scripted policy on these shapes.
BEFORE = {
    "flash": ("414f4141e4178141a02c", 227, 226),
    "ramps": ("bd72c530e6dfbcf60b97", 203, 202),
    "noisy": ("45573b91485c1c5fddd9", 546, 544),
}


def cases() -> dict[str, tuple[np.ndarray, FleetParams]]:
    return {
        "flash": (
            synthetic.flash_crowd(hours=1.0, base=10.0, at=1200, hold=600),
            FleetParams(capacity=10.0, boot_time=45, warmup=20, max_instances=30),
        ),
        "ramps": (
            synthetic.ramps(hours=1.0, ramp=600),
            FleetParams(capacity=8.0, boot_time=90, warmup=60, max_instances=30),
        ),
        "noisy": (
            synthetic.noisy_constant(3600, 60.0, rel=0.3),
            FleetParams(capacity=10.0, boot_time=20, poll_interval=5, control_interval=10, warmup=30, max_instances=30),
        ),
    }


@pytest.mark.parametrize("shape", sorted(BEFORE))
def test_no_pool_is_the_model_as_it_was(shape):
    demand, p = cases()[shape]
    runs = []
    # pool 0 whatever the other pool settings say
    for q in (p, replace(p, warm_start=5.0, stopped_cost=0.9)):
        pol = Scripted(7)
        run = simulate(demand, pol, q, measure_from=600)
        digest = hashlib.sha256()
        digest.update(run.in_service.astype(np.int64).tobytes())
        digest.update(run.billed.astype(np.int64).tobytes())
        digest.update(repr(pol.seen).encode())
        assert (digest.hexdigest()[:20], run.launches, run.terminations) == BEFORE[shape]
        assert run.stopped is not None and not run.stopped.any()
        assert (run.warm_starts, run.pool_launches) == (0, 0)
        assert figures(run, q).instance_hours == float(run.billed.sum()) / 3600.0
        runs.append(run)
    assert runs[0].in_service.tolist() == runs[1].in_service.tolist()


@pytest.mark.parametrize("shape", sorted(BEFORE))
def test_a_pool_only_ever_helps_the_same_decisions_serve_sooner(shape):
    """With a policy that ignores what it observes (a schedule), a pool changes only when capacity
    serves: never less in service than without one, and the same launches."""
    demand, p = cases()[shape]
    plan = Schedule(lambda t: 1 + (t // 300) % 7).plan
    without = simulate(demand, Schedule(plan), p)
    with_pool = simulate(demand, Schedule(plan), replace(p, warm_pool=3, warm_start=5.0))
    assert (with_pool.in_service >= without.in_service).all()
    assert (with_pool.in_service > without.in_service).any()
    assert (with_pool.launches, with_pool.terminations) == (without.launches, without.terminations)
    assert with_pool.warm_starts > 0


@pytest.fixture
def tiny_trace(tmp_path):
    path = tmp_path / "t.txt.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(f"{x:.3f}" for x in synthetic.flash_crowd(hours=0.5, base=10.0, at=600, hold=300)))
    return str(path)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--warm-pool", "-1"], "--warm-pool=-1: expected a whole number of instances, 0 or more"),
        (["--warm-pool", "two"], "--warm-pool=two: expected a whole number"),
        (["--warm-pool", "1.5"], "--warm-pool=1.5: expected a whole number"),
        (["--warm-pool", "2", "--warm-start", "120"], "--warm-start=120: expected seconds from 0 to --boot-time (90)"),
        (["--warm-start", "-3"], "--warm-start=-3: expected seconds from 0"),
        (["--warm-start", "soon"], "--warm-start=soon: expected seconds"),
        (["--stopped-cost", "1.5"], "--stopped-cost=1.5: expected a fraction from 0 to 1"),
        (["--stopped-cost", "nan"], "--stopped-cost=nan: expected a fraction"),
    ],
)
def test_cli_warm_pool_flags_bad_values_exit_2_with_one_line(tiny_trace, args, needle):
    r = run_cli("--trace", tiny_trace, "--capacity", "10", *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_warm_pool_flags_run_and_are_documented(tiny_trace):
    r = run_cli(
        "--trace",
        tiny_trace,
        "--peak-instances",
        "10",
        "--policy",
        "k8s-hpa,oracle",
        "--warm-pool",
        "3",
        "--warm-start",
        "15",
        "--stopped-cost",
        "0.2",
        "--json",
        "-",
    )
    assert r.returncode == 0, r.stderr
    assert "warm pool 3 (in service 15 s after a start, stopped billed at 0.2" in r.stdout
    doc = json.loads(r.stdout[r.stdout.index("{") :])
    assert (doc["warm_pool"], doc["warm_start"], doc["stopped_cost"]) == (3, 15.0, 0.2)
    hpa = doc["policies"]["k8s-hpa"]
    assert hpa["stopped_hours"] > 0 and hpa["warm_starts"] > 0
    assert doc["policies"]["oracle"]["stopped_hours"] == 0
    # the pool's size and cap default to the live settings
    r = run_cli(
        "--trace",
        tiny_trace,
        "--capacity",
        "10",
        "--policy",
        "k8s-hpa",
        "--set",
        "HELIX_WARM_POOL_SIZE=2",
        "--set",
        "HELIX_WARM_POOL_MAX_PREPARED=20",
        "--json",
        "-",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout[r.stdout.index("{") :])
    assert (doc["warm_pool"], doc["warm_max_prepared"]) == (2, 20)
    assert "at most 20 running and stopped" in r.stdout
    # the default warm start does not refuse a boot time shorter than it when there is no pool
    assert run_cli("--trace", tiny_trace, "--capacity", "10", "--boot-time", "5").returncode == 0
    helptext = run_cli("--help").stdout
    for flag in ("--warm-pool N", "--warm-start SECONDS", "--stopped-cost FRACTION", "(default 10)", "(default 0.1)"):
        assert flag in helptext
