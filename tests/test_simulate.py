"""The what-if simulator: the CLI as a real subprocess, the fleet model, the figures, the oracle."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from controller_asg.policy import build_policy
from controller_asg.policy.base import Decision
from controller_asg.sim import synthetic
from controller_asg.sim.fleet import FleetParams, Run, required, simulate
from controller_asg.sim.metrics import figures
from controller_asg.sim.runner import compare
from controller_asg.sim.trace import TraceError, load_trace
from shared.config import load_config
from tests.procs import ROOT, base_env

NASA_FULL = "/work/shared/traces/nasa-http-1995.rps.gz"


def run_cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "controller_asg.simulate", *args],
        cwd=ROOT,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def small_trace(tmp_path):
    demand = synthetic.flash_crowd(hours=1.0, base=10.0, at=1200, hold=600)
    path = tmp_path / "t.txt.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(f"{x:.3f}" for x in demand))
    return str(path)


def test_cli_prints_table_writes_json_and_plot(small_trace, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    r = run_cli(
        "--trace",
        small_trace,
        "--peak-instances",
        "10",
        "--policy",
        "predictive,k8s-hpa,oracle",
        "--set",
        "HELIX_MIN_INSTANCES=1",
        "--set",
        "HELIX_MAX_INSTANCES=30",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
    )
    assert r.returncode == 0, r.stderr
    for word in ("predictive", "k8s-hpa", "oracle", "cost/oracle", "lost %", "θU %", "τO %", "actions"):
        assert word in r.stdout
    doc = json.loads(out_json.read_text())
    assert set(doc["policies"]) == {"predictive", "k8s-hpa", "oracle"}
    assert doc["policies"]["oracle"]["lost_pct"] == 0.0
    assert doc["policies"]["oracle"]["cost_vs_oracle"] == pytest.approx(1.0)
    assert doc["policies"]["predictive"]["instance_hours"] > 0
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_settings_come_from_the_environment_and_flags_win(small_trace):
    env = base_env()
    env["HELIX_POLICY"] = "threshold"
    r = run_cli("--trace", small_trace, "--capacity", "20", "--json", "-", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout[r.stdout.index("{") :])
    assert list(doc["policies"]) == ["threshold"]
    r = run_cli("--trace", small_trace, "--capacity", "20", "--json", "-", "--set", "HELIX_MIN_INSTANCES=3", env=env)
    assert json.loads(r.stdout[r.stdout.index("{") :])["min"] == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--capacity", "10", "--policy", "nope"], "--policy=nope: expected one of"),
        (["--capacity", "-1"], "--capacity=-1.0: expected a positive number"),
        (["--capacity", "10", "--set", "HELIX_CPU_TARGET=2"], "HELIX_CPU_TARGET=2: expected"),
        (["--capacity", "10", "--set", "nonsense"], "--set=nonsense: expected HELIX_KEY=VALUE"),
        (["--capacity", "10", "--start", "99"], "--start=99: expected a day within"),
    ],
)
def test_cli_bad_input_exits_2_with_one_clear_line(small_trace, args, needle):
    r = run_cli("--trace", small_trace, *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_bad_trace(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1\nfoo\n")
    r = run_cli("--trace", str(bad), "--capacity", "1")
    assert r.returncode == 2 and f"--trace={bad}" in r.stderr


def test_trace_formats(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("1\n2\n3\n")
    assert load_trace(str(plain)).tolist() == [1, 2, 3]
    assert load_trace(str(plain), step=2).tolist() == [1, 1, 2, 2, 3, 3]
    csv = tmp_path / "a.csv"
    csv.write_text("timestamp,rate\n0,5\n10,7\n")
    out = load_trace(str(csv))
    assert len(out) == 20 and out[0] == 5 and out[-1] == 7
    for text in ("", "-1\n", "nan\n"):
        (tmp_path / "b.txt").write_text(text)
        with pytest.raises(TraceError):
            load_trace(str(tmp_path / "b.txt"))


class Fixed:
    name = "fixed"

    def __init__(self, plan):
        self.plan = plan
        self.seen = []

    def decide(self, obs):
        self.seen.append(obs)
        return Decision(self.plan(obs.now), "fixed")

    def export_state(self):
        return {}

    def import_state(self, state):
        pass


def test_fleet_model_boot_billing_loss_and_observations():
    p = FleetParams(capacity=10.0, boot_time=5, warmup=3, min_instances=1, max_instances=10)
    demand = np.full(20, 15.0)  # needs 1.5 instances at 100%
    pol = Fixed(lambda t: 1 if t < 2 else 2)
    run = simulate(demand, pol, p, initial=1)
    # billed from the launch at t=2, in service from t=7
    assert run.billed.tolist() == [1, 1] + [2] * 18
    assert run.in_service.tolist() == [1] * 7 + [2] * 13
    f = figures(run, p)
    lost = 7 * 5.0  # 5 req/s over capacity for 7 s
    assert f.lost_pct == pytest.approx(100 * lost / (20 * 15.0))
    assert f.hot_pct == pytest.approx(100 * 7 / 20)
    assert (f.launches, f.terminations, f.actions) == (1, 0, 1)
    assert f.instance_hours == pytest.approx((2 + 2 * 18) / 3600)
    # what the policy saw: the new instance warming for 3 s after t=7, then measured
    o7, o10 = pol.seen[7], pol.seen[10]
    assert (o7.in_service, o7.warming, len(o7.cpu_samples), o7.pending) == (2, 1, 1, 0)
    assert o7.cpu_samples[0] == pytest.approx(0.75)
    assert (o10.warming, len(o10.cpu_samples)) == (0, 2)
    assert pol.seen[3].pending == 1 and pol.seen[3].capacity == 2


def test_elasticity_metrics_on_a_hand_made_run():
    p = FleetParams(capacity=1.0, target=0.5, min_instances=1)
    demand = np.array([1.0, 1.0, 2.0, 2.0])  # r = 2, 2, 4, 4
    run = Run(
        demand=demand,
        in_service=np.array([2, 3, 2, 4]),
        billed=np.array([2, 3, 2, 4]),
        launches=0,
        terminations=0,
        reasons=[],
    )
    f = figures(run, p)
    assert required(demand, p).tolist() == [2, 2, 4, 4]
    assert f.theta_u == pytest.approx(100 * (0.5) / 4)  # (4-2)/4 at t=2
    assert f.theta_o == pytest.approx(100 * (0.5) / 4)  # (3-2)/2 at t=1
    assert f.tau_u == pytest.approx(25.0) and f.tau_o == pytest.approx(25.0)


def test_oracle_never_under_provisions_and_policies_run_unchanged():
    demand = synthetic.recurring_bursts(days=1.0)
    cfg = load_config({"HELIX_MIN_INSTANCES": "2", "HELIX_MAX_INSTANCES": "60"}, env_file="")
    p = FleetParams(capacity=float(demand.max()) / 10, boot_time=90, min_instances=2, max_instances=60)
    outs = {o.name: o for o in compare(["oracle", "predictive", "k8s-hpa"], demand, p, cfg)}
    o = outs["oracle"]
    assert o.figures.lost_pct == 0 and o.figures.theta_u == 0 and o.figures.tau_u == 0
    assert (o.run.in_service >= required(demand, p)).all()
    for name in ("predictive", "k8s-hpa"):
        f = outs[name].figures
        assert 0.8 < f.cost_vs_oracle < 1.5 and f.lost_pct < 5 and f.actions > 0


def test_the_live_classes_are_what_the_simulator_runs():
    cfg = load_config({}, env_file="")
    assert type(build_policy(cfg.policy, cfg)).__module__ == "controller_asg.policy.predictive"


@pytest.mark.skipif(not os.path.exists(NASA_FULL), reason="the full NASA trace is not on this machine")
def test_cli_on_a_day_of_the_real_nasa_trace():
    r = run_cli(
        "--trace",
        NASA_FULL,
        "--start",
        "21",
        "--days",
        "1",
        "--smooth",
        "60",
        "--peak-instances",
        "20",
        "--policy",
        "predictive,oracle",
        "--set",
        "HELIX_MIN_INSTANCES=2",
        "--set",
        "HELIX_MAX_INSTANCES=40",
        "--json",
        "-",
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout[r.stdout.index("{") :])
    f = doc["policies"]["predictive"]
    assert f["lost_pct"] < 1.0 and 0.8 < f["cost_vs_oracle"] < 1.3


# --- several signals ----------------------------------------------------------------------------


def test_a_trace_with_a_backlog_column_runs_the_multi_metric_policy_the_live_controller_runs(tmp_path):
    """The simulator takes a trace with several columns: `rate` drives CPU and requests/s, `backlog`
    is the external metric. With min 0 an empty fleet wakes on the backlog and sleeps after it."""
    trace = tmp_path / "jobs.csv"
    lines = ["timestamp,rate,backlog"]
    for t in range(3 * 3600):
        busy = 3600 <= t < 5400
        lines.append(f"{t},{40.0 if busy else 0.0},{400 if busy else 0}")
    trace.write_text("\n".join(lines) + "\n")
    common = ["--trace", str(trace), "--capacity", "20", "--policy", "predictive", "--reasons"]
    bad = run_cli(*common, "--set", "HELIX_MIN_INSTANCES=0")
    assert bad.returncode == 2 and "expected HELIX_EXTERNAL_TARGET > 0" in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1
    out = run_cli(*common, "--set", "HELIX_MIN_INSTANCES=0", "--set", "HELIX_EXTERNAL_TARGET=50")
    assert out.returncode == 0, out.stderr
    changes = [line for line in out.stdout.splitlines() if line.startswith("predictive t=")]
    assert any("0->8: backlog wins" in line for line in changes), changes
    assert changes[-1].endswith("scaling to zero"), changes
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("timestamp,rate,backlog\n0,1,2\n1,1\n")
    with pytest.raises(TraceError):
        load_trace(str(ragged))
