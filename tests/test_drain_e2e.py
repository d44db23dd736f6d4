"""Issue 11 end to end: the demo's local stack under load, scaling in several times and replacing
an instance whose app was killed, with drain on. No request may fail because its instance was
terminated (`backend-terminated`: see deploy/local/loadgen.py's attribution), and every
terminated instance must have gone through its terminate hook (the table showed it DRAINING or
DRAINED) before it went.

The stack is `make demo`'s, run as the demo process through bench/bench_drain.py's `run_demo`
(also what `make bench BENCH_ARGS=drain` measures), with a watch on the table every 50 ms. The run
is the session's `demo_under_load` (tests/conftest.py), which test_demo.py reads too."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from bench.bench_drain import TableWatch
from deploy.local import demo
from deploy.local.loadgen import DIED, TERMINATED
from shared.config import load_config
from tests.procs import Proc, local_instance_records, wait_for

PEAK_INSTANCES = 4  # what the hold at 3.5 instances' worth asks for


def kill_one_app(proc: Proc, state_dir: str, watch: TableWatch, noted: dict) -> None:
    """Once the fleet is at its peak, SIGKILL the app of one instance in service (its agent lives
    on and reports it down): the controller must replace it."""

    def serving_app() -> tuple[str, int] | None:
        if proc.popen.poll() is not None:
            raise AssertionError(f"the demo ended early:\n{proc.output()[-3000:]}")
        serving = list(watch.serving)
        if len(serving) < PEAK_INSTANCES:
            return None
        records = local_instance_records(state_dir)
        for iid in serving:
            apps = [m["pid"] for m in records.get(iid, {}).get("members", []) if m.get("role") == "app"]
            if apps:
                return iid, apps[0]
        return None

    found = wait_for(serving_app, 60, f"{PEAK_INSTANCES} instances in service")
    assert found is not None  # wait_for returns only a truthy value
    iid, pid = found
    os.kill(pid, signal.SIGKILL)
    noted["killed"] = iid


def test_the_demo_drains_unless_told_not_to(monkeypatch, capsys):
    on = demo.tune(60, 10.0, None).tuned
    assert on["HELIX_DRAIN_TIMEOUT"] == "20"
    assert on["HELIX_TERMINATE_HOOK"] == f"{sys.executable} -m deploy.local.drain_hook --port {{port}} --quiet 1.5"
    cfg = load_config(on | {"HELIX_ENV_FILE": "", "HELIX_INSECURE": "1"})
    assert cfg.drain_timeout == 20 and "{port}" in cfg.terminate_hook
    off = demo.tune(60, 10.0, None, drain=False).tuned
    assert off["HELIX_DRAIN_TIMEOUT"] == "0" and "HELIX_TERMINATE_HOOK" not in off
    monkeypatch.delenv("DEMO_DRAIN", raising=False)
    assert demo.parse_args([]).drain is True
    assert demo.parse_args(["--no-drain"]).drain is False
    monkeypatch.setenv("DEMO_DRAIN", "0")
    assert demo.parse_args([]).drain is False
    monkeypatch.setenv("DEMO_DRAIN", "maybe")
    with pytest.raises(SystemExit):
        demo.parse_args([])
    assert "DEMO_DRAIN=maybe: expected 1" in capsys.readouterr().err


@pytest.mark.slow
def test_scale_ins_and_a_replacement_under_load_fail_no_request(demo_under_load):
    run = demo_under_load  # run_demo over cycle_curve(1), drain on, `kill_one_app` at the peak
    s = run.summary
    terms = run.terminations()
    detail = (
        f"{run.output[-3000:]}\ncauses {run.causes}\nterminations "
        + "\n  ".join(f"{t}" for t in terms)
        + f"\nactivity {[(a['action'], a.get('instance_ids'), a.get('reason', '')[:80]) for a in run.activity]}"
    )
    assert s["error"] == "" and s["stop_reason"] == "the demand curve has been replayed", detail
    assert s["drain_timeout"] > 0, detail
    assert s["served"] > 1000, detail

    # Several scale-ins and the replacement happened...
    scale_ins = [t for t in terms if t.kind == "terminate"]
    assert len(scale_ins) >= 2, detail
    killed = run.extra["killed"]
    assert killed in {t.instance_id for t in terms}, f"{killed} (app killed) was never terminated\n{detail}"

    # ... each after its terminate hook ran, and each terminate came after the decision.
    for t in terms:
        assert t.drained_through, f"{t.instance_id} ({t.kind}) was terminated without DRAINING\n{detail}"
        assert t.terminated_at >= t.decided_at > 0, f"{t.instance_id}: no terminate seen\n{detail}"

    # No request failed because its instance was terminated. The killed app's requests in flight
    # may fail: that is the app dying, not the replacement.
    assert run.causes.get(TERMINATED, 0) == 0, detail
    broken = [r for r in run.requests if r["outcome"] in (TERMINATED, DIED)]
    assert {r["instance"] for r in broken} <= {killed}, detail
    assert sum(run.causes.values()) == s["failed"], detail  # every failure has its cause
