"""Issue 4 §6 end to end, with real processes: MonitorS, ControllerASG on the local provider, agents
measuring real sample apps, and real HTTP load. Nothing here is faked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.procs import ROOT, base_env, free_port, kill_local_instances, wait_for
from tests.procs import local_instance_records as owned_records

pytestmark = pytest.mark.slow

TOKEN = "e2e-token-0123456789"


def inspect(table_name: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "shared.inspect", "--name", table_name, "--json"],
        env=base_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def healthy_ids(data: dict) -> set[str]:
    return {i["instance_id"] for i in data["instances"] if i["state"] == "healthy"}


def activities(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture
def stack(procs, table_name, tmp_path):
    port = free_port()
    common = dict(
        HELIX_SHM_NAME=table_name,
        HELIX_TOKEN=TOKEN,
        HELIX_POLL_INTERVAL="0.5",
        HELIX_METRICS_PORT="0",
        HELIX_UNHEALTHY_AFTER="3",
        HELIX_MONITOR_LISTEN=f"127.0.0.1:{port}",
        HELIX_MONITOR_ADDR=f"127.0.0.1:{port}",
        HELIX_STATE_DIR=str(tmp_path / "state"),  # the controller's, and MonitorS's credential key
    )
    monitor_env = base_env(**common)
    controller_env = base_env(
        **common,
        HELIX_PROVIDER="local",
        HELIX_MIN_INSTANCES="1",
        HELIX_MAX_INSTANCES="3",  # the load asks for 4: out to max, then two steps back in to min
        HELIX_CONTROL_INTERVAL="1",
        HELIX_LOCAL_VCPUS="1",
        HELIX_CPU_TARGET="0.1",
        HELIX_WARMUP="2",
        # Short, as the test waits them out: the scale-in window once the load stops, and the health
        # grace the survivor (launched under load) must be past before it may be replaced. A local
        # instance registers within a second or two.
        HELIX_SCALE_IN_WINDOW="3",
        HELIX_HEALTH_GRACE="15",
        HELIX_APP_DOWN_AFTER="3",
        HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"),
        HELIX_LOCAL_APP_CMD=f"{sys.executable} -m deploy.local.sample_app --port {{port}} --work-ms 10",
    )
    state = {
        "monitor": procs.python("monitor_s", ["-m", "monitor_s"], monitor_env),
        "controller": procs.python("controller_asg", ["-m", "controller_asg"], controller_env),
        "monitor_env": monitor_env,
        "tmp": tmp_path,
    }
    yield state
    # The controller goes first so it does not replace what we stop next; then every instance.
    state["controller"].kill_group()
    kill_local_instances(str(tmp_path / "state"))


def start_load(procs, table_name, tmp_path, rps: float):
    trace = tmp_path / "flat.txt"
    trace.write_text("1\n1\n")
    env = base_env(HELIX_SHM_NAME=table_name)
    return procs.python(
        "loadgen",
        [
            "-m",
            "deploy.local.loadgen",
            "--trace",
            str(trace),
            "--peak-rps",
            str(rps),
            "--duration",
            "600",
            "--stats",
            str(tmp_path / "load.jsonl"),
        ],
        env,
    )


def test_scale_out_in_replace_and_fail_static(procs, table_name, stack):
    tmp = stack["tmp"]
    activity_log = tmp / "activity.jsonl"

    # Brought to min: one healthy instance.
    first = wait_for(lambda: healthy_ids(inspect(table_name)), 90, "the first instance to be healthy")
    assert len(first) == 1

    # Load well above target (about 0.3 of a core against a target of 0.1 per instance): the fleet grows.
    load = start_load(procs, table_name, tmp, rps=30)
    wait_for(
        lambda: (lambda h: h if len(h) >= 2 else None)(healthy_ids(inspect(table_name))),
        120,
        "the fleet to grow under load",
    )
    launches = [a for a in activities(activity_log) if a["action"] == "launch" and "mean CPU" in a["reason"]]
    assert launches, activities(activity_log)
    data = inspect(table_name)
    assert data["controller"]["desired"] >= 2 and data["controller"]["alive"]
    assert all(0 <= i["cpu"] <= 1 for i in data["instances"])

    # Load stops: back to min after the scale-in window.
    load.signal(signal.SIGTERM)
    load.wait(60)
    wait_for(
        lambda: len(inspect(table_name)["instances"]) == 1 and inspect(table_name)["controller"]["desired"] == 1,
        180,
        "the fleet to shrink back to min",
    )
    assert any(a["action"] == "terminate" for a in activities(activity_log))

    # SIGKILL the survivor's agent: MonitorS marks it unhealthy and the controller replaces it.
    (victim,) = healthy_ids(inspect(table_name))
    os.kill(owned_records(tmp / "state")[victim]["pgid"], signal.SIGKILL)
    wait_for(
        lambda: any(a["action"] == "replace" and victim in a["instance_ids"] for a in activities(activity_log)),
        120,
        "the dead agent's instance to be replaced",
    )
    wait_for(lambda: (lambda h: h and victim not in h)(healthy_ids(inspect(table_name))), 120, "a healthy replacement")

    # SIGKILL MonitorS: the controller freezes and says so; nothing is terminated meanwhile.
    before = wait_for(
        lambda: (lambda owned: owned if owned == healthy_ids(inspect(table_name)) else None)(
            set(owned_records(tmp / "state"))
        ),
        60,
        "the replaced instance to be gone",
    )
    stack["monitor"].signal(signal.SIGKILL)
    stack["monitor"].wait(30)
    wait_for(lambda: inspect(table_name)["controller"]["frozen"], 60, "the controller to freeze")
    assert "freez" in stack["controller"].output()
    n_before = len(activities(activity_log))
    restarted = procs.python("monitor_s-2", ["-m", "monitor_s"], stack["monitor_env"])
    wait_for(lambda: not inspect(table_name)["controller"]["frozen"], 90, "the controller to resume")
    assert restarted.alive()
    during = activities(activity_log)[n_before - 1 :]
    assert [a["action"] for a in during if a["action"] in ("terminate", "replace")] == [], during
    assert set(owned_records(tmp / "state")) == before
    # The registry survived the restart: the instance is still there and polled.
    wait_for(lambda: healthy_ids(inspect(table_name)) == before, 60, "the instance to be polled again")
