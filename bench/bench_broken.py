"""A broken release on the live local stack: every instance's app exits at once.

Real processes: MonitorS and ControllerASG with the local provider, min 2, max 6, health grace
10 s, for BROKEN_SECONDS (default 180). Prints the launches made, when the churn breaker tripped,
and the instance-seconds spent running. (Before the churn breaker: 266 launches in 3 minutes.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid

from shared.table import MetricsTable
from tests.procs import ProcessPool, base_env, free_port, kill_local_instances, local_instance_records, wait_for


def main() -> None:
    seconds = float(os.environ.get("BROKEN_SECONDS", "180"))
    tmp = tempfile.mkdtemp(prefix="helix-bench-broken-")
    name = f"helix-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    port = free_port()
    activity = os.path.join(tmp, "activity.jsonl")
    state = os.path.join(tmp, "state")
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
    instance_seconds = 0.0
    try:
        pool.python("monitor_s", ["-m", "monitor_s"], base_env(**common))
        wait_for(lambda: MetricsTable.attach(name), 60, "the table").close()
        pool.python(
            "controller_asg",
            ["-m", "controller_asg"],
            base_env(
                **common,
                HELIX_PROVIDER="local",
                HELIX_MIN_INSTANCES="2",
                HELIX_MAX_INSTANCES="6",
                HELIX_HEALTH_GRACE="10",
                HELIX_ACTIVITY_LOG=activity,
                HELIX_LOCAL_APP_CMD="sh -c 'exit 1'",
            ),
        )
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            time.sleep(1.0)
            instance_seconds += len(local_instance_records(state))
        entries = []
        if os.path.exists(activity):
            with open(activity, encoding="utf-8") as fh:
                entries = [json.loads(line) for line in fh]
        launched = sum(e["count"] for e in entries if e["action"] == "launch")
        first = min((e["time"] for e in entries), default=0.0)
        tripped = [e["time"] - first for e in entries if e["action"] == "breaker-tripped"]
        when = f"after {tripped[0]:.0f} s" if tripped else "never"
        print(
            f"broken release for {seconds:.0f} s (min 2, max 6, grace 10 s): {launched} instances launched, "
            f"breaker tripped {when}, "
            f"{instance_seconds / 3600:.3f} instance-hours"
        )
    finally:
        pool.stop_all()
        kill_local_instances(state)
        MetricsTable.remove(name)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
