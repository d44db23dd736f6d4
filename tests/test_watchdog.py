"""The systemd notify protocol and watchdog (issue 13 §6, §7): shared/sdnotify.py against a real
datagram socket, then MonitorS and ControllerASG live under tests/notify_supervisor.py, which
stands in for systemd (not PID 1 here): READY=1 only once started, steady pings, and a controller
stopped with SIGSTOP killed by the watchdog and restarted, adopting its instance again."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import sdnotify
from tests.notify_supervisor import NotifySupervisor
from tests.procs import base_env, free_port, kill_local_instances, local_instance_records, wait_for
from tests.test_monitor_e2e import AUTH, monitor_env

# ---------------------------------------------------------------------------------------------
# shared/sdnotify.py


@pytest.fixture
def listener():
    """A bound datagram socket standing in for systemd's notify socket; yields (path, recv)."""
    directory = tempfile.mkdtemp(prefix="helix-sdn-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)

    def recv() -> list[str]:
        return sock.recv(65536).decode().split("\n")

    yield path, recv
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def test_messages_reach_the_socket_as_one_datagram_each(listener, monkeypatch):
    path, recv = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready("serving\non 127.0.0.1:1")
    assert recv() == ["READY=1", "STATUS=serving on 127.0.0.1:1"]  # one line: a newline would split a field
    assert sdnotify.status("waiting")
    assert recv() == ["STATUS=waiting"]
    assert sdnotify.watchdog()
    assert recv() == ["WATCHDOG=1"]
    assert sdnotify.stopping()
    assert recv() == ["STOPPING=1"]


def test_an_abstract_socket_name_is_honoured(monkeypatch):
    name = f"helix-test-{os.getpid()}-{free_port()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(100) == b"READY=1"


def test_without_a_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert not sdnotify.ready("x") and not sdnotify.watchdog() and not sdnotify.stopping()
    wd = sdnotify.Watchdog.from_env()
    assert not wd.enabled
    wd.ping()
    wd.cover(100, "a loop")


def test_a_send_that_fails_never_raises_and_is_logged_once(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    monkeypatch.setattr(sdnotify, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="shared.sdnotify"):
        assert not sdnotify.ready()
        assert not sdnotify.watchdog()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # our parent's watchdog, not ours
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_is_ours_only(environ, expected):
    env = {"NOTIFY_SOCKET": "/run/x", **{k: v.format(pid=os.getpid()) for k, v in environ.items()}}
    assert sdnotify.watchdog_interval(env) == expected
    assert sdnotify.Watchdog.from_env(env).enabled is (expected is not None)


def test_ping_is_cheap_sending_at_most_every_half_timeout(listener, monkeypatch):
    path, recv = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    now = [100.0]
    wd = sdnotify.Watchdog(10.0, clock=lambda: now[0])
    sent = []
    monkeypatch.setattr(sdnotify, "notify", lambda *f, **_: sent.append(f) or True)
    for _ in range(50):  # a loop calling it every 0.1 s for 5 s: the first call, then nothing
        wd.ping()
        now[0] += 0.1
    assert sent == [("WATCHDOG=1",)]
    now[0] = 105.0
    wd.ping()
    assert len(sent) == 2


def test_a_loop_slower_than_the_timeout_allows_raises_it(listener, monkeypatch, caplog):
    path, recv = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    wd = sdnotify.Watchdog(30.0)
    wd.cover(5, "a fast loop")  # 4 x 5 s fits in 30 s: nothing changes
    assert wd.interval == 30.0
    with caplog.at_level(logging.WARNING, logger="shared.sdnotify"):
        wd.cover(60, "a control step (HELIX_CONTROL_INTERVAL)")
    assert recv() == ["WATCHDOG_USEC=240000000"]
    assert wd.interval == 240.0 and "raising it to 240s" in caplog.text


# ---------------------------------------------------------------------------------------------
# Live, under the stand-in supervisor.

WATCHDOG = 6.0  # seconds: pings every 3 s, at least 4 x each loop's interval below: only a stopped loop misses


@pytest.fixture
def supervise(procs):
    """Makes NotifySupervisors on this test's ProcessPool; their threads stop before the pool kills
    every process they started (so nothing is restarted during clean-up)."""
    made: list[NotifySupervisor] = []

    def make(name: str, argv: list[str], env: dict[str, str], watchdog: float | None = WATCHDOG) -> NotifySupervisor:
        sup = NotifySupervisor(procs, name, argv, env, watchdog)
        made.append(sup)
        return sup.start()

    yield make
    for sup in made:
        sup.close()


def assert_steady(pings: list[float], timeout: float) -> None:
    gaps = [b - a for a, b in zip(pings[:-1], pings[1:], strict=True)]
    # Sent at most every timeout/2, after a loop iteration: never close to the timeout itself.
    assert all(timeout / 2 - 0.1 <= gap < timeout * 0.9 for gap in gaps), gaps


@pytest.mark.slow
def test_monitor_s_is_ready_only_when_its_registry_serves_and_pings_steadily(supervise, table_name):
    port = free_port()
    sup = supervise("monitor_s", [sys.executable, "-m", "monitor_s"], monitor_env(table_name, port))
    run = sup.wait_ready(0, 60)
    # Right after READY=1 the Registry answers, first try (no waiting for the channel).
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="helix.v1.Registry"), metadata=AUTH, timeout=10
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert "MonitorS serving Registry" in run.proc.output()
    [ready] = sup.accepted(0, "READY")
    assert ready.fields["STATUS"] == f"serving Registry on 127.0.0.1:{port}"

    pings = sup.wait_pings(0, 3, 60)
    assert_steady(pings, WATCHDOG)
    assert run.watchdog_fired_at is None and run.proc.alive()

    # SIGTERM: STOPPING=1, exit 0, and no restart.
    run.proc.signal(signal.SIGTERM)
    wait_for(lambda: sup.accepted(0, "STOPPING"), 30, "STOPPING=1")
    wait_for(lambda: run.returncode == 0, 30, "MonitorS to exit 0")
    assert len(sup.runs) == 1 and not [m for m in sup.messages if not m.accepted]


@pytest.mark.slow
def test_a_stopped_controller_is_killed_by_the_watchdog_and_restarted_adopting_its_instance(
    procs, supervise, table_name, tmp_path
):
    state_dir = str(tmp_path / "state")
    port = free_port()
    env = base_env(
        HELIX_SHM_NAME=table_name,
        HELIX_TOKEN="watchdog-token-0123456789",
        HELIX_POLL_INTERVAL="0.5",
        HELIX_METRICS_LISTEN="",
        HELIX_MONITOR_LISTEN=f"127.0.0.1:{port}",
        HELIX_MONITOR_ADDR=f"127.0.0.1:{port}",
        HELIX_STATE_DIR=state_dir,
        HELIX_PROVIDER="local",
        HELIX_MIN_INSTANCES="1",
        HELIX_MAX_INSTANCES="3",  # room for a duplicate launch, were there one
        HELIX_CONTROL_INTERVAL="1",
        HELIX_LOCAL_VCPUS="1",
        HELIX_HEALTH_GRACE="120",  # nothing is replaced during the test, healthy yet or not
    )
    monitor = procs.python("monitor_s", ["-m", "monitor_s"], env)
    sup = None
    try:
        wait_for(lambda: "MonitorS serving Registry" in monitor.output(), 60, "MonitorS to serve")
        sup = supervise("controller_asg", [sys.executable, "-m", "controller_asg"], env)
        first = sup.wait_ready(0, 60)
        assert sup.accepted(0, "READY")[0].fields["STATUS"].startswith("controlling: provider local")
        launched = wait_for(lambda: set(local_instance_records(state_dir)), 60, "the controller to launch min=1")
        assert len(launched) == 1
        assert_steady(sup.wait_pings(0, 2, 60), WATCHDOG)

        # A hung controller: the pings stop, the watchdog fires (SIGABRT), the supervisor restarts it.
        first.proc.signal(signal.SIGSTOP)
        wait_for(lambda: first.watchdog_fired_at is not None, 30, "the watchdog to fire")
        assert first.last_ping is not None and first.watchdog_fired_at - first.last_ping >= WATCHDOG
        wait_for(lambda: first.returncode is not None, 30, "the stopped controller to die")
        assert first.returncode == -signal.SIGABRT, sup.events

        second = sup.wait_ready(1, 60)
        assert second.proc.pid != first.proc.pid
        # It adopted the same instance, and launches nothing more over a few steps.
        adopted = [line for line in second.proc.output().splitlines() if "adopted" in line]
        assert adopted and adopted[0].endswith(f": {next(iter(launched))}"), adopted
        assert_steady(sup.wait_pings(1, 2, 60), WATCHDOG)
        assert set(local_instance_records(state_dir)) == launched
        assert second.proc.alive() and len(sup.runs) == 2
    finally:  # no restart from here on; the controllers go before the instances they would replace
        if sup is not None:
            sup.close()
            for run in sup.runs:
                run.proc.kill_group()
        kill_local_instances(state_dir)
