"""Reaction time of the whole local stack (issue 4 §6): from a load step above target to the
controller's launch call, and to the new instance in service, median over 5 runs at 1 s polling.

Real processes throughout: MonitorS, ControllerASG with the local provider, sample apps measured by
their agents, and an HTTP load generator. Target: the launch call within 3 s of the step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid

from shared.table import MetricsTable, State
from tests.procs import ProcessPool, base_env, free_port, kill_local_instances, wait_for

RUNS = 5


def _healthy(table: MetricsTable) -> list[str]:
    return [r.instance_id for r in table.snapshot().instances() if r.state == State.HEALTHY]


def _launch_times(path: str) -> list[float]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [e["time"] for e in map(json.loads, fh) if e["action"] == "launch" and "CPU" in e["reason"]]


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="helix-bench-reaction-")
    name = f"helix-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    port = free_port()
    activity = os.path.join(tmp, "activity.jsonl")
    common = dict(
        HELIX_STATE_DIR=os.path.join(tmp, "state"),
        HELIX_SHM_NAME=name,
        HELIX_TOKEN="bench-token-0123456789",
        HELIX_POLL_INTERVAL="1",
        HELIX_METRICS_LISTEN="",
        HELIX_MONITOR_LISTEN=f"127.0.0.1:{port}",
        HELIX_MONITOR_ADDR=f"127.0.0.1:{port}",
    )
    pool = ProcessPool()
    table = None
    try:
        pool.python("monitor_s", ["-m", "monitor_s"], base_env(**common))
        pool.python(
            "controller_asg",
            ["-m", "controller_asg"],
            base_env(
                **common,
                HELIX_PROVIDER="local",
                HELIX_MIN_INSTANCES="1",
                HELIX_MAX_INSTANCES="2",
                HELIX_LOCAL_VCPUS="1",
                HELIX_CPU_TARGET="0.1",
                HELIX_WARMUP="0",
                HELIX_SCALE_IN_WINDOW="3",
                HELIX_ACTIVITY_LOG=activity,
                HELIX_LOCAL_APP_CMD=f"{sys.executable} -m deploy.local.sample_app --port {{port}} --work-ms 10",
            ),
        )
        table = wait_for(lambda: MetricsTable.attach(name), 60, "the table")
        trace = os.path.join(tmp, "flat.txt")
        with open(trace, "w") as fh:
            fh.write("1\n1\n")
        to_launch, to_service = [], []
        for run in range(RUNS):
            wait_for(
                lambda: len(table.snapshot().instances()) == 1 and len(_healthy(table)) == 1,
                180,
                "one healthy instance before the step",
            )
            time.sleep(2)  # let the previous run's CPU fall out of the agents' interval
            seen = len(_launch_times(activity))
            step = time.time()
            load = pool.python(
                f"load-{run}",
                [
                    "-m",
                    "deploy.local.loadgen",
                    "--trace",
                    trace,
                    "--peak-rps",
                    "25",
                    "--duration",
                    "600",
                    "--stats",
                    os.devnull,
                ],
                base_env(HELIX_SHM_NAME=name),
            )
            launched = wait_for(lambda: _launch_times(activity)[seen:], 60, "the launch")[0]  # noqa: B023 - wait_for calls it before the loop moves on
            wait_for(lambda: len(_healthy(table)) >= 2, 120, "the new instance in service")
            in_service = time.time()
            load.signal(signal.SIGTERM)
            load.wait(30)
            to_launch.append(launched - step)
            to_service.append(in_service - step)
            print(
                f"run {run + 1}: launch call {launched - step:.2f} s after the step, in service after "
                f"{in_service - step:.2f} s",
                flush=True,
            )
        print(
            f"median over {RUNS} runs at 1 s polling: launch call {statistics.median(to_launch):.2f} s "
            f"(target < 3 s), in service {statistics.median(to_service):.2f} s"
        )
    finally:
        pool.stop_all()
        kill_local_instances(os.path.join(tmp, "state"))
        if table is not None:
            table.close()
        MetricsTable.remove(name)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
