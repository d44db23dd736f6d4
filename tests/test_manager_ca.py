"""TLS under the manager CA (HELIX_TLS_MODE=ca, the default on EC2): `python -m shared.pki init`,
certificates issued at registration, mutual TLS on every poll. Real processes, real TLS on loopback.

Before this, user data carried no TLS settings: every poll, bearer included, crossed the VPC in
clear, and anything that could reach an agent's port could try its luck."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import grpc
import pytest

from protos import helix_pb2, helix_pb2_grpc
from shared import pki
from shared.table import MetricsTable, State, TableNotFound
from tests.procs import base_env, free_port, kill_local_instances, wait_for
from tests.test_monitor_e2e import AUTH, agent_env, monitor_env, rows, start_monitor, wait_state

pytestmark = pytest.mark.slow


def pki_cli(directory, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.pki", *args],
        env=base_env(HELIX_PKI_DIR=str(directory)),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def ca_dir(tmp_path):
    directory = tmp_path / "pki"
    done = pki_cli(directory, "init")
    assert done.returncode == 0, done.stderr
    return directory


def read(directory, name: str) -> bytes:
    return (directory / name).read_bytes()


def ca_env(ca_dir) -> dict[str, str]:
    return {"HELIX_TLS_MODE": "ca", "HELIX_PKI_DIR": str(ca_dir), "HELIX_TLS_CA": str(ca_dir / "ca.crt")}


# --- the CLI and the files --------------------------------------------------------------------


def test_init_writes_private_keys_and_refuses_to_replace_a_ca(ca_dir):
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    for name in ("ca.key", "monitor.key"):
        assert stat.S_IMODE(os.stat(ca_dir / name).st_mode) == 0o600
    before = read(ca_dir, "ca.crt")
    again = pki_cli(ca_dir, "init")
    assert again.returncode == 2 and "already there" in again.stderr and again.stderr.count("\n") == 1
    assert read(ca_dir, "ca.crt") == before, "a refused init changes nothing"
    shown = pki_cli(ca_dir, "show")
    assert shown.returncode == 0 and "ca.crt: CN=helix manager CA, sha256 " in shown.stdout
    assert f"CN={pki.MONITOR_NAME}" in shown.stdout


def test_a_key_others_can_read_or_a_foreign_ca_is_refused_in_one_line(ca_dir, tmp_path):
    os.chmod(ca_dir / "ca.key", 0o640)
    with pytest.raises(pki.PKIError, match=r"ca\.key: mode 640, expected 600"):
        pki.ManagerCA.load(str(ca_dir))
    os.chmod(ca_dir / "ca.key", 0o600)
    other = tmp_path / "other"
    pki.init(str(other))
    (ca_dir / "monitor.crt").write_bytes(read(other, "monitor.crt"))
    with pytest.raises(pki.PKIError, match=r"monitor\.crt: not issued by ca\.crt"):
        pki.ManagerCA.load(str(ca_dir))


def test_issued_certificates_name_the_admitted_instance_and_serve_only(ca_dir, tmp_path):
    manager = pki.ManagerCA.load(str(ca_dir))
    key = pki.AgentKey(read(ca_dir, "ca.crt"))
    cert = manager.issue_agent(key.csr_pem, "i-0abc")
    assert key.accept(cert, "i-0abc") > 0
    with pytest.raises(ValueError, match="not issued for i-0other.agents.helix"):
        key.accept(cert, "i-0other")
    with pytest.raises(ValueError, match="not for this agent's key"):
        pki.AgentKey(read(ca_dir, "ca.crt")).accept(cert, "i-0abc")
    pki.init(str(tmp_path / "other"))
    foreign = pki.ManagerCA.load(str(tmp_path / "other")).issue_agent(key.csr_pem, "i-0abc")
    with pytest.raises(ValueError, match="not issued by HELIX_TLS_CA"):
        key.accept(foreign, "i-0abc")
    with pytest.raises(ValueError, match="csr: expected a PEM certificate signing request"):
        manager.issue_agent(b"not a csr", "i-0abc")
    # Every single-character change in the request's body is refused with a line naming `csr`.
    body = key.csr_pem.index(b"\n") + 1
    for at in range(body, len(key.csr_pem) - 40, 7):
        tampered = bytearray(key.csr_pem)
        tampered[at] = ord("A") if tampered[at] != ord("A") else ord("B")
        with pytest.raises(ValueError, match=r"^csr: "):
            manager.issue_agent(bytes(tampered), "i-0abc")
    # Agent names stay DNS names under .helix, and never the monitor's.
    assert pki.agent_name("i-0ABC") == "i-0abc.agents.helix"
    assert pki.agent_name("odd_id:1").startswith("x-") and pki.agent_name("odd_id:1").endswith(".agents.helix")
    assert pki.agent_name("monitor") != pki.MONITOR_NAME


# --- the live handshake -----------------------------------------------------------------------


def agent_port(env: dict[str, str]) -> int:
    return int(env["HELIX_AGENT_LISTEN"].rpartition(":")[2])


def call_agent(port: int, creds: grpc.ChannelCredentials | None, name: str = "", metadata=()) -> grpc.StatusCode:
    target = f"127.0.0.1:{port}"
    options = [("grpc.ssl_target_name_override", name)] if name else []
    channel = grpc.secure_channel(target, creds, options=options) if creds else grpc.insecure_channel(target)
    with channel:
        try:
            helix_pb2_grpc.AgentStub(channel).Heartbeat(helix_pb2.HeartbeatRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_agents_enrol_at_registration_and_every_poll_is_mutual_tls(procs, table_name, ca_dir):
    port = free_port()
    monitor = start_monitor(procs, table_name, port, **ca_env(ca_dir))
    env = agent_env("i-0ca1", port, **ca_env(ca_dir))
    agent = procs.python("agent", ["-m", "monitor_c"], env)
    wait_state(table_name, "i-0ca1", State.HEALTHY)  # enrolled over TLS, then polled over mutual TLS
    assert "TLS under the manager CA" in monitor.output()
    assert not any(line.startswith("E") and "handshake" in line.lower() for line in agent.output().splitlines())

    ca = read(ca_dir, "ca.crt")
    name = pki.agent_name("i-0ca1")
    manager = pki.ManagerCA.load(str(ca_dir))
    stolen = pki.AgentKey(ca)  # what another instance holds: a certificate the CA issued it
    stolen_cert = manager.issue_agent(stolen.csr_pem, "i-0thief")
    for what, creds in (
        ("plaintext", None),
        ("TLS without a client certificate", grpc.ssl_channel_credentials(ca)),
        ("another agent's certificate", grpc.ssl_channel_credentials(ca, stolen.key_pem, stolen_cert)),
    ):
        assert call_agent(agent_port(env), creds, name, AUTH) == grpc.StatusCode.UNAVAILABLE, what
    # MonitorS's own certificate opens the TLS session, and the bearer is still checked after it.
    monitor_creds = grpc.ssl_channel_credentials(ca, read(ca_dir, "monitor.key"), read(ca_dir, "monitor.crt"))
    assert call_agent(agent_port(env), monitor_creds, name) == grpc.StatusCode.UNAUTHENTICATED
    # ...and it verifies who answers: the agent's certificate is for i-0ca1 only.
    assert call_agent(agent_port(env), monitor_creds, pki.agent_name("i-0other")) == grpc.StatusCode.UNAVAILABLE

    # MonitorS's Registry: no plaintext; over TLS a Register must bring a request to sign.
    request = helix_pb2.RegisterRequest(instance_id="i-0ca2", address="127.0.0.1:7000", vcpus=1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
        helix_pb2_grpc.RegistryStub(channel).Register(request, metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    options = [("grpc.ssl_target_name_override", pki.MONITOR_NAME)]
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca), options=options) as channel:
        stub = helix_pb2_grpc.RegistryStub(channel)
        for csr, message in ((b"", "csr: empty"), (b"junk", "csr: expected a PEM")):
            request.csr = csr
            with pytest.raises(grpc.RpcError) as info:
                stub.Register(request, metadata=AUTH, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
        assert "i-0ca2" not in rows(table_name), "a refused Register changes nothing"
        request.csr = pki.AgentKey(ca).csr_pem
        reply = stub.Register(request, metadata=AUTH, timeout=10)
        assert b"BEGIN CERTIFICATE" in reply.certificate


def test_an_agent_trusting_another_ca_never_registers(procs, table_name, ca_dir, tmp_path):
    port = free_port()
    monitor = start_monitor(procs, table_name, port, **ca_env(ca_dir))
    pki.init(str(tmp_path / "rogue"))
    env = agent_env("i-0rogue", port, HELIX_TLS_MODE="ca", HELIX_TLS_CA=str(tmp_path / "rogue" / "ca.crt"))
    agent = procs.python("agent", ["-m", "monitor_c"], env)
    wait_for(lambda: "register with" in agent.output() and "UNAVAILABLE" in agent.output(), 30, "a refused register")
    assert "i-0rogue" not in rows(table_name) and monitor.alive()


def test_missing_ca_material_stops_each_process_before_it_touches_anything(procs, table_name, tmp_path):
    port = free_port()
    empty = tmp_path / "nothing"
    for module, env, key in (
        ("monitor_s", monitor_env(table_name, port, HELIX_TLS_MODE="ca", HELIX_PKI_DIR=str(empty)), "HELIX_PKI_DIR"),
        ("monitor_c", agent_env("i-0x", port, HELIX_TLS_MODE="ca"), "HELIX_TLS_CA"),
        (
            "controller_asg",
            monitor_env(table_name, port, HELIX_TLS_MODE="ca", HELIX_PKI_DIR=str(empty)),
            "shared.pki init",
        ),
    ):
        proc = procs.python(module, ["-m", module], env)
        assert proc.wait(timeout=30) == 2, proc.output()
        assert key in proc.output() and "HELIX_TLS_MODE=ca" in proc.output(), proc.output()
        assert proc.output().count("\n") <= 2, proc.output()
    with pytest.raises(TableNotFound):
        MetricsTable.attach(table_name)


def test_the_local_provider_runs_its_fleet_under_the_manager_ca(procs, table_name, ca_dir):
    """A whole manager (MonitorS and the controller) in ca mode: the instances it launches get the
    CA's certificate, enrol, and are polled over mutual TLS."""
    port = free_port()
    tls = {"HELIX_TLS_MODE": "ca", "HELIX_PKI_DIR": str(ca_dir), "HELIX_ROSTER": "required"}
    start_monitor(procs, table_name, port, **tls)
    controller_env = monitor_env(
        table_name,
        port,
        **tls,
        HELIX_PROVIDER="local",
        HELIX_MONITOR_ADDR=f"127.0.0.1:{port}",
        HELIX_MIN_INSTANCES="2",
        HELIX_MAX_INSTANCES="2",
        HELIX_CONTROL_INTERVAL="1",
        HELIX_LOCAL_VCPUS="1",
    )
    controller = procs.python("controller_asg", ["-m", "controller_asg"], controller_env)
    try:

        def enrolled():
            healthy = [r for r in rows(table_name).values() if r.state == State.HEALTHY]
            return healthy if len(healthy) == 2 else None

        wait_for(enrolled, 120, "two local instances healthy under the manager CA")
    finally:
        controller.kill_group()
        kill_local_instances(controller_env["HELIX_STATE_DIR"])
