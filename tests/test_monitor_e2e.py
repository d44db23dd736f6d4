"""The monitoring plane end to end: real MonitorS and MonitorC processes, real gRPC on loopback,
a real shared-memory table."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import pytest

from protos import helix_pb2, helix_pb2_grpc
from shared.table import ControllerStatus, InstanceRow, MetricsTable, State, TableNotFound
from tests.procs import base_env, free_port, state_dir_for, wait_for

TOKEN = "test-token-0123456789"
POLL = 0.5
UNHEALTHY_AFTER = 3
AUTH = (("authorization", f"Bearer {TOKEN}"),)

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# helpers (imported by the other monitor/agent test files)


def monitor_env(table_name: str, port: int, **overrides) -> dict[str, str]:
    settings = dict(
        HELIX_TOKEN=TOKEN,
        HELIX_SHM_NAME=table_name,
        HELIX_SHM_CAPACITY=64,
        HELIX_MONITOR_LISTEN=f"127.0.0.1:{port}",
        HELIX_POLL_INTERVAL=POLL,
        HELIX_UNHEALTHY_AFTER=UNHEALTHY_AFTER,
        HELIX_METRICS_LISTEN="",  # off, unless a test asks for it
        HELIX_STATE_DIR=state_dir_for(table_name),  # MonitorS's credential key lives there
        # No controller runs in these tests, so nobody publishes a roster: register on the token
        # alone. The roster tests (tests/test_registration_binding.py) publish one and require it.
        HELIX_ROSTER="off",
    )
    settings.update(overrides)
    return base_env(**settings)


def agent_env(instance_id: str, monitor_port: int, **overrides) -> dict[str, str]:
    port = free_port()
    settings = dict(
        HELIX_TOKEN=TOKEN,
        HELIX_INSTANCE_ID=instance_id,
        HELIX_AGENT_LISTEN=f"127.0.0.1:{port}",
        HELIX_ADVERTISE_ADDR=f"127.0.0.1:{port}",
        HELIX_MONITOR_ADDR=f"127.0.0.1:{monitor_port}",
        HELIX_IMDS_URL="",
        HELIX_VCPUS=1,
    )
    settings.update(overrides)
    return base_env(**settings)


def rows(table_name: str) -> dict:
    with MetricsTable.attach(table_name) as table:
        return {r.instance_id: r for r in table.snapshot().instances()}


def monitor_status(table_name: str):
    with MetricsTable.attach(table_name) as table:
        return table.snapshot().monitor


def start_monitor(procs, table_name: str, port: int, **overrides):
    proc = procs.python("monitor_s", ["-m", "monitor_s"], monitor_env(table_name, port, **overrides))
    wait_for(lambda: monitor_status(table_name).pid == proc.pid, 30, "MonitorS to write its heartbeat")
    # Its first heartbeat comes before its Registry listens: a Register sent in between was refused
    # UNAVAILABLE (connection refused) on a loaded machine.
    wait_for(lambda: "MonitorS serving Registry" in proc.output(), 30, "MonitorS to serve its Registry")
    return proc


def wait_state(table_name: str, instance_id: str, state: State, timeout: float = 30):
    def check():
        row = rows(table_name).get(instance_id)
        return row if row is not None and row.state == state else None

    return wait_for(check, timeout, f"{instance_id} to be {state.label}")


def inspect_json(table_name: str) -> dict:
    """The table as an operator sees it: `python -m shared.inspect --json` in a real process."""
    out = subprocess.run(
        [sys.executable, "-m", "shared.inspect", "--name", table_name, "--json"],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def registry_stub(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, helix_pb2_grpc.RegistryStub(channel)


# ---------------------------------------------------------------------------------------------


def test_fleet_lifecycle(procs, table_name):
    """Three agents register and turn healthy with plausible CPU; app down, SIGKILL, SIGTERM and a
    MonitorS restart each show in the table as the controller expects."""
    port = free_port()
    monitor = start_monitor(procs, table_name, port)
    app_port = free_port()
    app = procs.python("app", ["-m", "http.server", str(app_port), "--bind", "127.0.0.1"])
    busy = procs.python("busy", ["-c", "while True: pass"])
    wait_for(lambda: app.alive() and "Serving HTTP" in app.output(), 30, "the app to listen")

    a = procs.python(
        "agent-a",
        ["-m", "monitor_c"],
        agent_env(
            "i-a", port, HELIX_LABELS=f"zone=z1,app_port={app_port}", HELIX_APP_CHECK=f"http://127.0.0.1:{app_port}/"
        ),
    )
    b = procs.python(
        "agent-b",
        ["-m", "monitor_c"],
        agent_env("i-b", port, HELIX_LABELS="zone=z2", HELIX_APP_CHECK=f"tcp://127.0.0.1:{app_port}"),
    )
    c = procs.python(
        "agent-c",
        ["-m", "monitor_c"],
        agent_env("i-c", port, HELIX_LABELS="zone=z1", HELIX_CPU_SOURCE=f"tree:{busy.pid}"),
    )

    for iid in ("i-a", "i-b", "i-c"):
        wait_state(table_name, iid, State.HEALTHY)
    # The busy loop saturates its one vCPU when it gets a core; a loaded machine gives it less.
    table = wait_for(lambda: (t := rows(table_name))["i-c"].cpu > 0.2 and t, 30, "i-c to report its busy tree's CPU")
    assert table["i-a"].zone == "z1" and table["i-a"].app_port == app_port and table["i-b"].zone == "z2"
    for row in table.values():
        assert 0.0 <= row.cpu <= 1.0 and 0.0 < row.mem <= 1.0 and row.vcpus == 1
        assert row.registered_at <= row.last_seen and row.failures == 0 and row.agent_version
    assert table["i-a"].app_detail == "http 200" and table["i-b"].app_detail == "tcp ok"
    shown = inspect_json(table_name)
    assert shown["monitor"]["alive"] and shown["monitor"]["registered"] == 3
    by_id = {r["instance_id"]: r for r in shown["instances"]}
    assert set(by_id) == {"i-a", "i-b", "i-c"}
    assert all(r["state"] == "healthy" and 0 <= r["cpu"] <= 1 for r in by_id.values())
    assert by_id["i-c"]["cpu"] > 0.1 and by_id["i-a"]["app_port"] == app_port

    # The app dies: both agents probing it say so, app_down_polls counts up.
    app.kill_group()
    wait_for(
        lambda: all(
            rows(table_name)[i].state == State.APP_DOWN and rows(table_name)[i].app_down_polls >= 2
            for i in ("i-a", "i-b")
        ),
        30,
        "i-a and i-b to be app-down for 2 polls",
    )
    assert rows(table_name)["i-c"].state == State.HEALTHY

    # SIGKILL: no goodbye, the row turns unhealthy after UNHEALTHY_AFTER failed polls.
    a.signal(signal.SIGKILL)
    row = wait_state(table_name, "i-a", State.UNHEALTHY)
    assert row.failures >= UNHEALTHY_AFTER

    # SIGTERM: the agent deregisters within a bounded time and exits 0; its row is freed.
    b.signal(signal.SIGTERM)
    assert b.wait(timeout=15) == 0
    assert "i-b" not in rows(table_name)

    # Restart MonitorS: the registry survives and polling resumes.
    monitor.signal(signal.SIGTERM)
    assert monitor.wait(timeout=15) == 0
    before = rows(table_name)
    assert set(before) == {"i-a", "i-c"}
    monitor = start_monitor(procs, table_name, port)
    wait_for(
        lambda: rows(table_name)["i-c"].last_seen > before["i-c"].last_seen + POLL,
        30,
        "the restarted MonitorS to poll i-c",
    )
    after = rows(table_name)
    assert after["i-c"].registered_at == before["i-c"].registered_at
    assert after["i-a"].state == State.UNHEALTHY
    assert c.alive()


def test_hung_agent_does_not_slow_the_others(procs, table_name):
    port = free_port()
    monitor = start_monitor(procs, table_name, port, HELIX_POLL_INTERVAL=1.0)
    agents = [
        procs.python(f"agent-{i}", ["-m", "monitor_c"], agent_env(f"i-{i}", port, HELIX_LABELS="zone=z"))
        for i in range(3)
    ]
    for i in range(3):
        wait_state(table_name, f"i-{i}", State.HEALTHY)
    agents[0].signal(signal.SIGSTOP)  # hung: the kernel accepts, nobody answers
    try:
        wait_state(table_name, "i-0", State.UNHEALTHY)
        seen = {i: rows(table_name)[f"i-{i}"].last_seen for i in (1, 2)}
        status = monitor_status(table_name)
        # The others keep being polled every cycle and answered long before the hung call's deadline.
        wait_for(
            lambda: all(rows(table_name)[f"i-{i}"].last_seen >= seen[i] + 2 for i in (1, 2)),
            30,
            "the healthy agents to be polled for two more cycles",
        )
        table = rows(table_name)
        for i in (1, 2):
            assert table[f"i-{i}"].state == State.HEALTHY and table[f"i-{i}"].failures == 0
            assert table[f"i-{i}"].poll_latency < 0.5, table[f"i-{i}"]
        # ... and were written before the hung call timed out: their last_seen precedes the end of the cycle.
        assert status.cycle_seconds >= 0.5  # this cycle did wait for the hung agent's deadline
        # Stopping MonitorS while an agent hangs is still prompt and clean.
        monitor.signal(signal.SIGTERM)
        assert monitor.wait(timeout=15) == 0
    finally:
        agents[0].signal(signal.SIGCONT)


def test_refusals_change_nothing(procs, table_name):
    port = free_port()
    start_monitor(procs, table_name, port)
    agent = procs.python("agent", ["-m", "monitor_c"], agent_env("i-ok", port))
    wait_state(table_name, "i-ok", State.HEALTHY)
    agent_addr = rows(table_name)["i-ok"].address
    channel, stub = registry_stub(port)
    good = dict(instance_id="i-new", address="127.0.0.1:6000", vcpus=2, agent_version="0.1.0", labels={"zone": "z"})

    def refused(call, request, metadata=AUTH) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=metadata, timeout=10)
        return info.value

    with channel:
        # Wrong or missing token.
        for md in ((("authorization", "Bearer wrong-token-xyz"),), ()):
            err = refused(stub.Register, helix_pb2.RegisterRequest(**good), md)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            err = refused(stub.Deregister, helix_pb2.DeregisterRequest(instance_id="i-ok"), md)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # Malformed registrations: each names its field.
        cases = [
            ({"instance_id": "bad id!"}, "instance_id"),
            ({"instance_id": "x" * 65}, "instance_id"),
            ({"instance_id": ""}, "instance_id"),
            ({"address": "127.0.0.1:70000"}, "address"),
            ({"address": "no-port"}, "address"),
            ({"address": "127.0.0.1:" + "1" * 70}, "address"),
            ({"vcpus": 0}, "vcpus"),
            ({"vcpus": 5000}, "vcpus"),
            ({"agent_version": "v 1"}, "agent_version"),
            ({"labels": {f"k{i}": "v" for i in range(17)}}, "labels"),
            ({"labels": {"zone": "z" * 40}}, "labels[zone]"),
            ({"labels": {"app_port": "http"}}, "labels[app_port]"),
            ({"labels": {"bad key": "v"}}, "labels"),
            ({"labels": {"note": "a\nb"}}, "labels[note]"),
        ]
        for change, field in cases:
            err = refused(stub.Register, helix_pb2.RegisterRequest(**{**good, **change}))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (change, err)
            assert err.details().startswith(field), (change, err.details())
        # Address spoofing: registering someone else's address, or a hostname.
        for address in ("10.9.8.7:5000", "example.com:5000"):
            err = refused(stub.Register, helix_pb2.RegisterRequest(**{**good, "address": address}))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and err.details().startswith("address")
        # Oversized message: refused by gRPC before any handler.
        err = refused(stub.Register, helix_pb2.RegisterRequest(**{**good, "agent_version": "x" * 100_000}))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The standard health service answers, behind the same token.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="helix.v1.Registry"), metadata=AUTH, timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A registered agent accepts only its own credential (what MonitorS's Register answer gave it;
    # an idempotent Register returns the same one): not a wrong one, and no longer the fleet token.
    channel, stub = registry_stub(port)
    with channel:
        row = rows(table_name)["i-ok"]
        again = helix_pb2.RegisterRequest(instance_id="i-ok", address=row.address, vcpus=1)
        credential = stub.Register(again, metadata=AUTH, timeout=10).credential
    own = (("authorization", f"Bearer {credential}"),)
    with grpc.insecure_channel(agent_addr) as ch:
        assert (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service="helix.v1.Agent"), metadata=own, timeout=10)
            .status
            == health_pb2.HealthCheckResponse.SERVING
        )
    with grpc.insecure_channel(agent_addr) as ch:
        for wrong in ((("authorization", "Bearer nope-nope-nope"),), AUTH, ()):
            with pytest.raises(grpc.RpcError) as info:
                helix_pb2_grpc.AgentStub(ch).GetMetrics(helix_pb2.GetMetricsRequest(), timeout=10, metadata=wrong)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, wrong
        m = helix_pb2_grpc.AgentStub(ch).GetMetrics(
            helix_pb2.GetMetricsRequest(instance_id="i-ok"), timeout=10, metadata=own
        )
        assert m.instance_id == "i-ok" and m.vcpus == 1
        with pytest.raises(grpc.RpcError) as info:
            helix_pb2_grpc.AgentStub(ch).GetMetrics(
                helix_pb2.GetMetricsRequest(instance_id="i-other"), timeout=10, metadata=own
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    table = rows(table_name)
    assert set(table) == {"i-ok"} and table["i-ok"].state == State.HEALTHY
    assert agent.alive()


def test_stop_right_after_registering_frees_the_row(procs, table_name):
    """SIGTERM the moment the row appears (the Register answer may still be in flight)."""
    port = free_port()
    start_monitor(procs, table_name, port)
    env = agent_env("i-quick", port)
    for attempt in range(3):
        agent = procs.python(f"agent-{attempt}", ["-m", "monitor_c"], env)
        wait_for(lambda: "i-quick" in rows(table_name), 30, "the row to appear", interval=0.002)
        agent.signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
        assert "i-quick" not in rows(table_name), agent.output()


def test_agent_registers_again_when_forgotten(procs, table_name):
    """Deregistered while alive, or MonitorS restarted on a fresh table: the agent comes back."""
    port = free_port()
    monitor = start_monitor(procs, table_name, port)
    procs.python("agent", ["-m", "monitor_c"], agent_env("i-back", port, HELIX_LABELS="zone=z,app_port=8080"))
    first = wait_state(table_name, "i-back", State.HEALTHY)
    channel, stub = registry_stub(port)
    with channel:
        # Register is idempotent: the same id and address keep the row, its state and registered_at.
        again = helix_pb2.RegisterRequest(
            instance_id="i-back",
            address=first.address,
            vcpus=3,
            agent_version="0.2.0",
            labels={"zone": "z2", "app_port": "8081"},
        )
        stub.Register(again, metadata=AUTH, timeout=10)
        row = rows(table_name)["i-back"]
        assert (row.zone, row.app_port, row.agent_version) == ("z2", 8081, "0.2.0")  # (polls rewrite vcpus)
        assert row.registered_at == first.registered_at and row.state == State.HEALTHY
        resp = stub.Deregister(
            helix_pb2.DeregisterRequest(instance_id="i-back", reason="test"), metadata=AUTH, timeout=10
        )
    assert resp.found and "i-back" not in rows(table_name)
    again = wait_state(table_name, "i-back", State.HEALTHY, timeout=40)
    assert again.registered_at > first.registered_at and again.app_port == 8080 and again.zone == "z"

    monitor.signal(signal.SIGTERM)
    assert monitor.wait(timeout=15) == 0
    MetricsTable.remove(table_name)
    start_monitor(procs, table_name, port)
    row = wait_state(table_name, "i-back", State.HEALTHY, timeout=40)
    assert row.zone == "z"


def test_restart_on_a_damaged_table_repairs_it(procs, table_name):
    """Bytes that used to make MonitorS exit 1 at start (an unknown state, a NaN, a high-water mark
    past the capacity, a NaN heartbeat): it starts, frees the bad rows with one line each, keeps
    and polls the good ones, and serves registrations as usual."""
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"  # nobody answers there: a kept row's failures count up
    with MetricsTable.open_or_create(table_name, 64) as table:
        for i in range(5):
            table.register(InstanceRow(f"i-{i}", dead, State.HEALTHY, registered_at=1000.0 + i))
        with table.writing() as w:
            w.rows["state"][1] = 9
            w.rows["cpu"][3] = float("nan")
            w.header["high_water"] = 2**32 - 1
            w.header["monitor_heartbeat"] = float("nan")
            w.header["monitor_pid"] = 1
    monitor = start_monitor(procs, table_name, port)
    kept = wait_for(
        lambda: (r := rows(table_name)) and all(r[i].failures >= 1 for i in ("i-0", "i-2", "i-4")) and r,
        30,
        "MonitorS to poll the rows it kept",
    )
    assert set(kept) == {"i-0", "i-2", "i-4"}
    assert [kept[i].registered_at for i in ("i-0", "i-2", "i-4")] == [1000.0, 1002.0, 1004.0]
    repairs = [line for line in monitor.output().splitlines() if "table repair:" in line]
    assert len(repairs) == 4, monitor.output()
    assert repairs[0].endswith("table repair: high_water 4294967295 is beyond the capacity 64: clamped to 64")
    assert repairs[1].endswith(
        "table repair: freed slot 1 ('i-1'): state 9, expected a state from 0 to 4 "
        "(free, registering, healthy, unhealthy, app-down)"
    )
    assert repairs[2].endswith("table repair: freed slot 3 ('i-3'): cpu nan, expected a number from 0 to 1.5")
    assert repairs[3].endswith("table repair: registered 5 recounted as 3")
    with MetricsTable.attach(table_name) as table:
        snap = table.snapshot()
    assert snap.problems == () and snap.header_ok and snap.monitor.registered == 3
    assert snap.monitor.alive(time.time())
    # ... and it runs as usual: a new agent registers (into a freed slot) and turns healthy.
    procs.python("agent", ["-m", "monitor_c"], agent_env("i-new", port))
    wait_state(table_name, "i-new", State.HEALTHY)
    with MetricsTable.attach(table_name) as table:
        assert bytes(table.snapshot().rows["instance_id"][1]) == b"i-new"
    assert monitor.alive()


def test_prometheus_exposition(procs, table_name):
    from prometheus_client.parser import text_string_to_metric_families

    port, metrics_port = free_port(), free_port()
    start_monitor(procs, table_name, port, HELIX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    procs.python("agent", ["-m", "monitor_c"], agent_env("i-prom", port, HELIX_LABELS="zone=z9"))
    wait_state(table_name, "i-prom", State.HEALTHY)

    def scrape():
        status, body, _ = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200, (status, body)
        return body

    text = wait_for(lambda: (t := scrape()) and "helix_poll_latency_seconds_count" in t and t, 30, "a latency sample")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    key = (("instance_id", "i-prom"), ("zone", "z9"))
    assert samples[("helix_instance_up", key)] == 1.0
    assert samples[("helix_instance_healthy", key)] == 1.0
    assert 0.0 <= samples[("helix_instance_cpu_ratio", key)] <= 1.0
    assert samples[("helix_registered_instances", ())] == 1.0
    assert families["helix_poll_latency_seconds"].type == "histogram"
    assert samples[("helix_poll_latency_seconds_count", ())] >= 1
    assert samples[("helix_table_bad_rows", ())] == 0.0
    assert not any(name.startswith("helix_controller_") for name in families)  # no controller has written yet

    # A controller writes its section, and a stray write leaves a bad row MonitorS does not own.
    with MetricsTable.attach(table_name) as table:
        table.write_controller(
            ControllerStatus(
                pid=4321,
                heartbeat=time.time(),
                policy="target",
                breaker=True,
                breaker_failures=3,
                billable=2,
                max_instances=5,
                table_problems=1,
            )
        )
        with table.writing() as w:
            slot = w.high_water
            w.rows[slot] = InstanceRow("i-junk", "127.0.0.1:1").to_record()
            w.rows["state"][slot] = 9
            w.header["high_water"] = slot + 1
    text = scrape()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    assert samples["helix_table_bad_rows"] == 1.0
    assert samples["helix_controller_breaker_tripped"] == 1.0
    assert samples["helix_controller_breaker_failures"] == 3.0
    assert samples["helix_controller_billable_instances"] == 2.0
    assert samples["helix_controller_max_instances"] == 5.0
    assert samples["helix_controller_table_bad_rows"] == 1.0
    assert samples["helix_registered_instances"] == 1.0  # MonitorS itself carries on
    assert_promtool_valid(text)
    # The README says what the endpoint exposes: every family served, and nothing it leaves out.
    import os

    from tests.procs import ROOT

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        section = fh.read().partition("## Prometheus metrics")[2].partition("\n## ")[0]
    served = {f.name for f in text_string_to_metric_families(text)}
    assert served and not [name for name in served if f"`{name}" not in section]


# ---------------------------------------------------------------------------------------------
# The Prometheus endpoint: the address it listens on, TLS, basic auth.

METRICS_USER, METRICS_PASSWORD = "prometheus", "scrape-pass-0123456789"


def http_get(url: str, *, auth=None, headers=None, context=None, timeout: float = 10.0):
    """(status, body, headers) of a GET, 4xx/5xx included; never through a proxy from the environment."""
    import base64
    import urllib.error
    import urllib.request

    handlers: list = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, headers=dict(headers or {}))
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(), exc.headers


def assert_promtool_valid(text: str) -> None:
    import shutil

    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


def write_private(path, text: str, mode: int = 0o600) -> str:
    """Write `text` to a file created with `mode` (then set exactly, whatever the umask)."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return str(path)


def self_signed_tls(directory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (its own CA, so a client can trust
    exactly it) and its private key (mode 600), as PEM files in `directory`."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helix metrics test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "metrics-cert.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return str(cert_path), write_private(directory / "metrics-key.pem", pem.decode())


def test_metrics_are_served_on_the_chosen_address_only(procs, table_name):
    port, metrics_port = free_port(), free_port()
    # 127.0.0.2 is loopback too (all of 127/8 is), so "this address only" is testable here.
    monitor = start_monitor(procs, table_name, port, HELIX_METRICS_LISTEN=f"127.0.0.2:{metrics_port}")
    status, body, _ = wait_for(lambda: http_get(f"http://127.0.0.2:{metrics_port}/metrics"), 30, "metrics")
    assert status == 200 and "helix_registered_instances 0.0" in body
    with pytest.raises(OSError):  # connection refused: nothing listens on 127.0.0.1's port
        http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    wait_for(
        lambda: f"metrics http://127.0.0.2:{metrics_port}/metrics (no auth)" in monitor.output(), 30, "the start line"
    )
    monitor.kill_group()  # (its exit status is another test's business)

    # The deprecated HELIX_METRICS_PORT still works, on loopback only (it used to be 0.0.0.0).
    env = monitor_env(table_name, port, HELIX_METRICS_PORT=metrics_port)
    del env["HELIX_METRICS_LISTEN"]
    monitor = procs.python("monitor_s", ["-m", "monitor_s"], env)
    wait_for(lambda: http_get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 200, 30, "metrics on the old port")
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.2:{metrics_port}/metrics")
    assert "HELIX_METRICS_PORT is deprecated" in monitor.output()


def test_metrics_basic_auth(procs, table_name, tmp_path):
    import base64
    import os

    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    auth_file = write_private(tmp_path / "metrics-auth", f"{METRICS_USER}:{METRICS_PASSWORD}\n", mode=0o644)
    settings = dict(HELIX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}", HELIX_METRICS_BASIC_AUTH_FILE=auth_file)

    # A password file others can read is refused before anything is touched, and never shown.
    refused = procs.python("monitor_s", ["-m", "monitor_s"], monitor_env(table_name, port, **settings))
    assert refused.wait(timeout=30) == 2, refused.output()
    assert (
        f"HELIX_METRICS_BASIC_AUTH_FILE={auth_file}: expected a file only its owner can read (mode 0644; chmod 600 it)"
        in refused.output()
    )
    assert METRICS_PASSWORD not in refused.output()
    with pytest.raises(TableNotFound):
        MetricsTable.attach(table_name)

    os.chmod(auth_file, 0o600)
    monitor = start_monitor(procs, table_name, port, **settings)
    status, body, headers = wait_for(lambda: http_get(url), 30, "the metrics endpoint")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ") and "helix_" not in body
    wrong = [
        (METRICS_USER, "wrong-password-0000"),
        ("someone", METRICS_PASSWORD),
        (METRICS_USER, METRICS_PASSWORD[:-1]),
        (METRICS_USER, METRICS_PASSWORD + "x"),
        ("", ""),
    ]
    for auth in wrong:
        status, body, _ = http_get(url, auth=auth)
        assert status == 401 and "helix_" not in body, auth
    good = base64.b64encode(f"{METRICS_USER}:{METRICS_PASSWORD}".encode()).decode()
    for header in (f"Bearer {good}", f"Basic {good}!", "Basic", good):  # right secret, wrong form
        assert http_get(url, headers={"Authorization": header})[0] == 401, header
    status, text, _ = http_get(url, auth=(METRICS_USER, METRICS_PASSWORD))
    assert status == 200 and "helix_registered_instances" in text
    assert_promtool_valid(text)
    wait_for(lambda: f"metrics {url} (basic auth as '{METRICS_USER}')" in monitor.output(), 30, "the start line")
    assert METRICS_PASSWORD not in monitor.output()


def test_metrics_over_tls(procs, table_name, tmp_path):
    import http.client
    import socket
    import ssl

    cert, key = self_signed_tls(tmp_path)
    port, metrics_port = free_port(), free_port()
    monitor = start_monitor(
        procs,
        table_name,
        port,
        HELIX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        HELIX_METRICS_TLS_CERT=cert,
        HELIX_METRICS_TLS_KEY=key,
    )
    url = f"https://127.0.0.1:{metrics_port}/metrics"
    trusting = ssl.create_default_context(cafile=cert)
    status, text, _ = wait_for(lambda: http_get(url, context=trusting), 30, "metrics over https")
    assert status == 200 and "helix_registered_instances" in text
    assert_promtool_valid(text)
    # Plain HTTP to the same port gets nothing.
    with pytest.raises((OSError, http.client.HTTPException)):
        http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    # A client that does not trust this certificate refuses the server.
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        http_get(url, context=ssl.create_default_context())
    # A client that connects and never starts its handshake does not hold up the others.
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10):
        assert http_get(url, context=trusting, timeout=5)[0] == 200
    wait_for(lambda: f"metrics {url} (no auth)" in monitor.output(), 30, "the start line")
    assert monitor.alive()


@pytest.mark.parametrize("module", ["monitor_s", "monitor_c"])
def test_bad_config_and_missing_token_exit_2(procs, table_name, module):
    port = free_port()
    env = monitor_env(table_name, port) if module == "monitor_s" else agent_env("i-x", port)
    changes = [{"HELIX_POLL_INTERVAL": "fast"}, {"HELIX_TOKEN": ""}, {"HELIX_TOKEN": "short"}]
    if module == "monitor_c":  # what MonitorS would refuse at registration stops the agent at start
        changes += [{"HELIX_LABELS": "zone=z,app_port=http"}, {"HELIX_INSTANCE_ID": "two words"}]
    for change in changes:
        proc = procs.python(module, ["-m", module], {**env, **change})
        assert proc.wait(timeout=30) == 2, proc.output()
        key = next(iter(change))
        assert key in proc.output() and proc.output().count("\n") <= 2, proc.output()
    with pytest.raises(TableNotFound):
        MetricsTable.attach(table_name)  # nothing was created


def test_insecure_mode_is_loud_and_sigint_exits_0(procs, table_name):
    port = free_port()
    env = monitor_env(table_name, port, HELIX_TOKEN="", HELIX_INSECURE=1)
    monitor = procs.python("monitor_s", ["-m", "monitor_s"], env)
    wait_for(lambda: monitor_status(table_name).pid == monitor.pid, 30, "MonitorS heartbeat")
    agent = procs.python("agent", ["-m", "monitor_c"], agent_env("i-ins", port, HELIX_TOKEN="", HELIX_INSECURE=1))
    wait_state(table_name, "i-ins", State.HEALTHY)
    assert "INSECURE" in monitor.output() and "INSECURE" in agent.output()
    agent.signal(signal.SIGINT)
    assert agent.wait(timeout=15) == 0
    assert "i-ins" not in rows(table_name)
    monitor.signal(signal.SIGINT)
    assert monitor.wait(timeout=15) == 0


def test_stream_mode(procs, table_name):
    """HELIX_POLL_MODE=stream: agents push over WatchMetrics; the rows mean the same as when polled."""
    port = free_port()
    start_monitor(procs, table_name, port, HELIX_POLL_MODE="stream")
    agents = {
        iid: procs.python(iid, ["-m", "monitor_c"], agent_env(iid, port, HELIX_LABELS="zone=s"))
        for iid in ("i-s1", "i-s2", "i-s3")
    }
    for iid in agents:
        wait_state(table_name, iid, State.HEALTHY)
    first = rows(table_name)
    wait_for(
        lambda: all(rows(table_name)[i].last_seen >= first[i].last_seen + 3 * POLL for i in agents),
        30,
        "pushed samples to keep arriving",
    )
    agents["i-s1"].signal(signal.SIGKILL)
    agents["i-s2"].signal(signal.SIGSTOP)
    try:
        wait_state(table_name, "i-s1", State.UNHEALTHY)
        wait_state(table_name, "i-s2", State.UNHEALTHY)
        seen = rows(table_name)["i-s3"].last_seen
        wait_for(lambda: rows(table_name)["i-s3"].last_seen > seen + 2 * POLL, 30, "i-s3 to keep pushing")
        assert rows(table_name)["i-s3"].state == State.HEALTHY
    finally:
        agents["i-s2"].signal(signal.SIGCONT)
    wait_state(table_name, "i-s2", State.HEALTHY)  # the stalled stream resumes
    # Pushing counts as being polled: no agent thought it was forgotten.
    assert "registering again" not in agents["i-s3"].output()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
