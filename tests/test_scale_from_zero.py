"""Scale from zero and back, live: MonitorS, the controller and real local instances, with
HELIX_MIN_INSTANCES=0 and an external backlog: a file-based queue, and a queue on moto's SQS
server (a real HTTP endpoint speaking the SQS API)."""

from __future__ import annotations

import json
import os

import pytest

from tests.moto_server import CREDENTIALS, moto_client, reset_moto
from tests.procs import base_env, free_port, kill_local_instances, wait_for
from tests.test_monitor_e2e import rows

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123456789"


def stack_env(table_name: str, tmp_path, **extra: str) -> dict[str, str]:
    port = free_port()
    return base_env(
        HELIX_SHM_NAME=table_name,
        HELIX_TOKEN=TOKEN,
        HELIX_POLL_INTERVAL="0.5",
        HELIX_METRICS_LISTEN="",
        HELIX_MONITOR_LISTEN=f"127.0.0.1:{port}",
        HELIX_MONITOR_ADDR=f"127.0.0.1:{port}",
        HELIX_STATE_DIR=str(tmp_path / "state"),
        HELIX_PROVIDER="local",
        HELIX_MIN_INSTANCES="0",
        HELIX_MAX_INSTANCES="3",
        HELIX_CONTROL_INTERVAL="1",
        HELIX_LOCAL_VCPUS="1",
        HELIX_SCALE_IN_WINDOW="3",
        HELIX_HEALTH_GRACE="60",
        HELIX_DRAIN_TIMEOUT="5",
        HELIX_EXTERNAL_TARGET="10",
        HELIX_ACTIVITY_LOG=str(tmp_path / "activity.jsonl"),
        **extra,
    )


def activities(tmp_path) -> list[dict]:
    path = tmp_path / "activity.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def live(tmp_path) -> int:
    from tests.procs import local_instance_records

    return len(local_instance_records(str(tmp_path / "state")))


def run_cycle(procs, table_name, tmp_path, env, set_backlog) -> None:
    procs.python("monitor_s", ["-m", "monitor_s"], env)
    controller = procs.python("controller_asg", ["-m", "controller_asg"], env)
    try:
        wait_for(lambda: "starting: provider local" in controller.output(), 60, "the controller to start")
        assert live(tmp_path) == 0, "an empty backlog launches nothing"
        set_backlog(25)  # ceil(25 / 10) = 3 instances
        wait_for(
            lambda: sum(1 for r in rows(table_name).values() if r.state.label == "healthy") == 3,
            120,
            "the fleet to wake from zero to 3 healthy instances",
        )
        [wake] = [a for a in activities(tmp_path) if a["action"] == "launch"][:1]
        assert wake["reason"].startswith("backlog wins") and wake["capacity"] == 0, wake
        set_backlog(0)
        wait_for(lambda: live(tmp_path) == 0, 120, "the fleet to return to zero once the backlog stayed empty")
        assert any("no backlog for" in a["reason"] for a in activities(tmp_path) if a["action"] == "terminate")
    finally:
        controller.kill_group()
        kill_local_instances(str(tmp_path / "state"))


def test_a_file_queue_wakes_an_empty_fleet_and_lets_it_sleep(procs, table_name, tmp_path):
    queue = tmp_path / "queue"
    queue.write_text("0\n")

    def set_backlog(n: int) -> None:
        tmp = tmp_path / "queue.tmp"
        tmp.write_text(f"{n}\n")
        os.replace(tmp, queue)

    env = stack_env(table_name, tmp_path, HELIX_EXTERNAL_METRIC=f"file:{queue}")
    run_cycle(procs, table_name, tmp_path, env, set_backlog)


def test_an_sqs_queue_on_moto_wakes_an_empty_fleet_and_lets_it_sleep(procs, table_name, tmp_path, moto_endpoint):
    reset_moto(moto_endpoint)
    sqs = moto_client(moto_endpoint, "sqs")
    url = sqs.create_queue(QueueName="jobs")["QueueUrl"]

    def set_backlog(n: int) -> None:
        if n == 0:
            sqs.purge_queue(QueueUrl=url)
        for i in range(n):
            sqs.send_message(QueueUrl=url, MessageBody=f"job {i}")

    env = stack_env(
        table_name, tmp_path, HELIX_EXTERNAL_METRIC=f"sqs:{url}", HELIX_SQS_ENDPOINT_URL=moto_endpoint, **CREDENTIALS
    )
    run_cycle(procs, table_name, tmp_path, env, set_backlog)
