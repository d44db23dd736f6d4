"""`make chaos`, short: the local stack (MonitorS, ControllerASG, instances running the sample app
with their agents, the load generator) under a fixed seed's schedule of faults for 50 s. Every
verdict must pass, and nothing may be left behind: no process, no segment, no state."""

from __future__ import annotations

import json
import os

import pytest

from deploy.local import cleanup
from shared.table import lock_path
from tests.procs import base_env

pytestmark = pytest.mark.slow

DURATION = 50
# This seed's first round of faults (fixed by the seed) holds every kind, in this order: MonitorS
# SIGKILLed for 11 s (long enough for the controller to have to freeze), the controller armed to
# be SIGKILLed as it next launches, then an agent and an app SIGKILLed (their replacements are
# that launch), the controller SIGKILLed, then SIGSTOPs of MonitorS, the controller, an agent, an app.
SEED = 2565
VERDICTS = ["max-instances", "untracked", "registry-survives", "frozen-while-down", "launch-tokens", "nothing-left"]


@pytest.mark.timeout(900)
def test_short_chaos_run_keeps_every_invariant_and_leaves_nothing(procs, tmp_path):
    summary = tmp_path / "chaos.json"
    argv = ["-m", "deploy.local.chaos", "--out", str(tmp_path / "out"), "--summary-json", str(summary)]
    run = procs.python("chaos", argv, base_env(CHAOS_DURATION=str(DURATION), CHAOS_SEED=str(SEED)))
    # About 50 s of faults plus start-up and cleanup; a loaded 2-core machine may take much longer.
    rc = run.wait(timeout=600)
    out = run.output()
    tail = out[-8000:]
    assert f"seed {SEED}" in out, tail
    verdicts = [line for line in out.splitlines() if line.startswith("verdict ")]
    assert [v.split(":")[0] for v in verdicts] == [f"verdict {n} {name}" for n, name in enumerate(VERDICTS, 1)], tail
    s = json.loads(summary.read_text())

    # It did what it says: faults of every kind on the stack (a run that injects nothing passes
    # every verdict for nothing).
    kinds = {f["kind"] for f in s["faults"]}
    assert {"monitor-kill", "controller-kill", "agent-kill", "app-kill", "monitor-stop"} <= kinds, tail
    assert any(v.startswith("verdict 3 ") and "MonitorS restarts" in v for v in verdicts), tail

    failed = [v for v in verdicts if ": PASS: " not in v]
    assert not failed, "\n".join(failed) + "\n\n" + tail
    assert rc == 0 and s["ok"] and s["error"] == "", tail

    # Nothing left behind, checked here too rather than only taken from its verdict.
    leftovers = cleanup.marked_processes(s["run_id"])
    assert not leftovers, f"processes left behind: {[(p.pid, p.cmdline()) for p in leftovers]}"
    for p in s["procs"]:
        assert cleanup.same_process(p["pid"], p["started"]) is None, f"{p['name']} (pid {p['pid']}) left behind"
    assert not os.path.exists(f"/dev/shm/{s['shm_name']}"), "segment left behind"
    assert not os.path.exists(lock_path(s["shm_name"])), "lock file left behind"
    assert not os.path.exists(s["run_dir"]), "run dir (state, token) left behind"
