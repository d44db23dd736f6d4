"""Several managers (issue 14, requirement 4): HELIX_MONITOR_ADDR lists every manager's MonitorS,
the agent registers with each on its own, and each MonitorS polls it, so a standby's table is warm.

Real MonitorS and MonitorC processes, real gRPC on loopback, each MonitorS with its own table,
port and state directory (its own credential key), as on two manager VMs."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import time

import grpc
import psutil
import pytest

from monitor_c.agent import AgentState, Manager
from monitor_c.identity import Identity
from monitor_c.probe import AppProbe
from monitor_c.sampling import Sampler, TreeCpu
from monitor_s.credentials import CredentialIssuer
from protos import helix_pb2, helix_pb2_grpc
from shared import pki
from shared.config import ConfigError, load_config
from shared.table import HookResult, Lifecycle, MetricsTable, RosterEntry, State
from tests.procs import free_port, manager_pki, state_dir_for, wait_for
from tests.test_monitor_e2e import AUTH, POLL, agent_env, rows, start_monitor

# --- configuration ------------------------------------------------------------------------------


def monitor_addr_errors(value: str) -> list[str]:
    try:
        load_config({"HELIX_ENV_FILE": "", "HELIX_MONITOR_ADDR": value})
    except ConfigError as exc:
        return exc.errors
    return []


def test_monitor_addr_takes_a_list_of_one_to_five():
    one = load_config({"HELIX_ENV_FILE": "", "HELIX_MONITOR_ADDR": " 10.0.0.5:50052 "})
    assert one.monitor_addr == "10.0.0.5:50052" and one.monitor_addrs == ("10.0.0.5:50052",)
    two = load_config({"HELIX_ENV_FILE": "", "HELIX_MONITOR_ADDR": "10.0.0.5:50052, [fd00::7]:50052"})
    assert two.monitor_addr == "10.0.0.5:50052,[fd00::7]:50052", "the raw setting, each item stripped"
    assert two.monitor_addrs == ("10.0.0.5:50052", "[fd00::7]:50052")
    five = ",".join(f"10.0.0.{n}:50052" for n in range(1, 6))
    assert len(load_config({"HELIX_ENV_FILE": "", "HELIX_MONITOR_ADDR": five}).monitor_addrs) == 5
    assert load_config({"HELIX_ENV_FILE": ""}).monitor_addrs == ("127.0.0.1:50052",)  # the default


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("10.0.0.5:50052,10.0.0.6", "item 2 ('10.0.0.6') is not host:port"),
        ("10.0.0.5:50052,,10.0.0.6:50052", "item 2 ('') is not host:port"),
        ("10.0.0.5:50052,", "item 2 ('') is not host:port"),
        ("10.0.0.5:0", "item 1 ('10.0.0.5:0') is not host:port"),
        ("", "item 1 ('') is not host:port"),
        ("10.0.0.5:50052,10.0.0.6:50052,10.0.0.5:50052", "item 3 ('10.0.0.5:50052') is listed twice"),
        ("Manager-A:50052,manager-a:50052", "item 2 ('manager-a:50052') is listed twice"),
        (",".join(f"10.0.0.{n}:50052" for n in range(1, 7)), "got 6"),
    ],
)
def test_a_bad_list_is_one_line_naming_the_item(value, named):
    errors = monitor_addr_errors(value)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(f"HELIX_MONITOR_ADDR={value}: expected 1 to 5 comma-separated host:port"), errors
    assert errors[0].endswith(named), errors


# --- what the agent keeps per MonitorS ------------------------------------------------------------


def test_each_poll_is_attributed_to_its_monitor_by_its_credential():
    state = AgentState(Identity("i-x", "127.0.0.1:1"), 1, Sampler("host", 1), AppProbe("", 1.0))
    a, b = Manager("10.0.0.5:50052"), Manager("10.1.0.5:50052")
    a.credential, b.credential = "cred-of-a-0123456789", "cred-of-b-0123456789"
    state.managers = [a, b]
    a.last_polled = b.last_polled = 0.0
    assert state.polled((("authorization", "Bearer cred-of-b-0123456789"),)) == b.addr
    assert b.last_polled > 0 and a.last_polled == 0.0, "B's poll says nothing about A"
    assert state.polled([("authorization", b"Bearer cred-of-a-0123456789")]) == a.addr and a.last_polled > 0
    # A caller with no manager's credential is not a poll by either of them.
    a.last_polled = b.last_polled = 0.0
    assert state.polled(AUTH) == "" and a.last_polled == b.last_polled == 0.0
    # A MonitorS that handed out no credential (or none yet): any authenticated call counts for it.
    b.credential = ""
    assert state.polled(AUTH) == "" and b.last_polled > 0 and a.last_polled == 0.0


def test_cpu_rates_are_per_poller_so_one_poll_does_not_reset_another(procs):
    """Was: one baseline for all callers. Poller B's sample right before A's left A a window of
    microseconds over a stopped process: 0 %, although it used a CPU for most of A's interval."""
    busy = procs.python("busy", ["-c", "while True: pass"])
    proc = psutil.Process(busy.pid)
    src = TreeCpu(busy.pid, 1)
    src.utilisation("a")  # A's baseline
    start = proc.cpu_times()
    wait_for(lambda: proc.cpu_times().user - start.user >= 0.3, 30, "the busy process to use 0.3 s of CPU")
    busy.signal(signal.SIGSTOP)
    wait_for(lambda: proc.status() == psutil.STATUS_STOPPED, 10, "the busy process to stop")
    assert src.utilisation("b") > 0  # B: since the source was made, busy time included
    assert src.utilisation("a") > 0, "A's window is its own, from its last sample, not from B's"
    assert src.utilisation("b") == 0.0  # a stopped process uses nothing since B's last sample
    busy.signal(signal.SIGCONT)
    sampler = Sampler("host", 1)
    for poller in ("a", "b", "a"):
        s = sampler.sample(poller)
        assert 0.0 <= s.cpu <= 1.0 and s.net_rx_bps >= 0 and s.net_tx_bps >= 0


# --- two managers, live ---------------------------------------------------------------------------


@pytest.fixture
def tables(table_name):
    """Two tables (and state directories), one per manager; the second cleaned up here, the first
    by `table_name`."""
    second = table_name + "-b"
    yield table_name, second
    MetricsTable.remove(second)
    shutil.rmtree(state_dir_for(second), ignore_errors=True)


def script(directory, name: str, body: str) -> str:
    path = directory / f"{name}.sh"
    path.write_text(body)
    return shlex.join(["/bin/sh", str(path)])


def healthy_with_metrics(table: str, iid: str):
    row = rows(table).get(iid)
    ok = row is not None and row.state == State.HEALTHY and row.sample_time > 0 and row.vcpus == 1
    return row if ok else None


def polled_since(table: str, iid: str, since: float, times: int = 2) -> None:
    """Wait until `table`'s MonitorS polled `iid` successfully after `since`, `times` intervals on."""
    wait_for(
        lambda: healthy_with_metrics(table, iid) and rows(table)[iid].last_seen > since + (times - 1) * POLL,
        15,
        f"{table} to poll {iid} again",
    )


def restart_forgetting(procs, proc, table: str, port: int, **overrides):
    """SIGKILL a MonitorS, drop its table (a new manager VM, or one that lost its shared memory) and
    start it again on the same port: it knows no agent until they register again."""
    proc.kill_group()
    MetricsTable.remove(table)
    return start_monitor(procs, table, port, **overrides)


def heartbeat(agent_addr: str, metadata) -> grpc.StatusCode:
    with grpc.insecure_channel(agent_addr) as channel:
        try:
            helix_pb2_grpc.AgentStub(channel).Heartbeat(helix_pb2.HeartbeatRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_two_managers_poll_every_agent_and_survive_each_others_restart(procs, tables, tmp_path):
    (table_a, table_b), (port_a, port_b) = tables, (free_port(), free_port())
    addr_a, addr_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    monitor_a = start_monitor(procs, table_a, port_a)
    start_monitor(procs, table_b, port_b)
    agents = {}
    for iid in ("i-m1", "i-m2"):
        env = agent_env(
            iid,
            port_a,
            HELIX_MONITOR_ADDR=f"{addr_a},{addr_b}",
            HELIX_LAUNCH_HOOK=script(tmp_path, f"launch-{iid}", f"echo run >> {tmp_path}/launch-{iid}.runs\n"),
            HELIX_TERMINATE_HOOK=script(
                tmp_path, f"drain-{iid}", f"echo run >> {tmp_path}/drain-{iid}.runs\nsleep 1\necho drained\n"
            ),
        )
        agents[iid] = (procs.python(iid, ["-m", "monitor_c"], env), env["HELIX_ADVERTISE_ADDR"])

    # Each MonitorS's own table: every agent HEALTHY with metrics, its launch hook done.
    for table in (table_a, table_b):
        for iid in agents:
            wait_for(lambda t=table, i=iid: healthy_with_metrics(t, i), 20, f"{iid} HEALTHY in {table}")
            wait_for(
                lambda t=table, i=iid: rows(t)[i].lifecycle == Lifecycle.IN_SERVICE, 20, f"{iid} in service in {table}"
            )
    for iid, (agent, address) in agents.items():
        out = agent.output()
        assert f"registered with {addr_a} as {iid}" in out and f"registered with {addr_b} as {iid}" in out
        # Both MonitorS called Prepare; the hook ran once and the second call got its result.
        assert (tmp_path / f"launch-{iid}.runs").read_text() == "run\n"
        assert "Prepare called again" in out
        # Each MonitorS's credential opens the agent; the fleet token no longer does.
        for table in (table_a, table_b):
            issuer = CredentialIssuer.from_state_dir(state_dir_for(table))
            own = issuer.metadata(iid, rows(table)[iid].registered_at)
            assert heartbeat(address, own) == grpc.StatusCode.OK, table
        assert heartbeat(address, AUTH) == grpc.StatusCode.UNAUTHENTICATED
    registered_b = {iid: rows(table_b)[iid].registered_at for iid in agents}

    # Manager A dies: B's polling goes on, undisturbed, past the agents' silence limit (3 s).
    monitor_a.kill_group()
    killed = time.time()
    for iid, (agent, _) in agents.items():
        wait_for(lambda a=agent: f"register with {addr_a} failed" in a.output(), 15, f"{iid} to miss {addr_a}")
        polled_since(table_b, iid, time.time())
    assert time.time() - killed > 3.0
    for iid, (agent, _) in agents.items():
        out = agent.output()
        assert f"not polled by {addr_a}" in out and f"not polled by {addr_b}" not in out, out
        assert rows(table_b)[iid].registered_at == registered_b[iid], "B's registration untouched"

    # A comes back with an empty table: the agents register with it again by themselves.
    MetricsTable.remove(table_a)
    start_monitor(procs, table_a, port_a)
    for iid, (agent, _) in agents.items():
        wait_for(lambda i=iid: healthy_with_metrics(table_a, i), 20, f"{iid} back in the restarted {table_a}")
        assert f"registered with {addr_a} as {iid}" in agent.output().split(f"register with {addr_a} failed")[-1]
        polled_since(table_b, iid, time.time(), times=1)
        assert rows(table_b)[iid].registered_at == registered_b[iid]

    # Both MonitorS are asked to drain i-m1: the terminate hook runs once, both see its result.
    iid, (agent, address) = "i-m1", agents["i-m1"]
    for table in (table_a, table_b):
        with MetricsTable.attach(table) as t:
            t.publish_roster([RosterEntry(iid, address, b"", time.time() + 30)], time.time())
    for table in (table_a, table_b):
        row = wait_for(
            lambda t=table: (r := rows(t)[iid]).lifecycle == Lifecycle.DRAINED and r, 20, f"{iid} DRAINED in {table}"
        )
        assert (row.hook_result, row.hook_detail) == (HookResult.CONTINUE, "exit 0"), (table, row)
    assert (tmp_path / f"drain-{iid}.runs").read_text() == "run\n"
    assert "Drain called again" in agent.output()


@pytest.mark.slow
def test_two_managers_under_one_shared_manager_ca(procs, tables, tmp_path):
    """HELIX_TLS_MODE=ca with two managers: the operator copies the PKI directory to each. Either
    MonitorS signs the agent's key; the certificate the agent serves last verifies for both."""
    (table_a, table_b), (port_a, port_b) = tables, (free_port(), free_port())
    addr_a, addr_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    pki_a, pki_b = tmp_path / "pki-a", tmp_path / "pki-b"
    shutil.copytree(manager_pki(), pki_a)
    shutil.copytree(manager_pki(), pki_b)
    assert oct(os.stat(pki_b).st_mode & 0o777) == "0o700"
    start_monitor(procs, table_a, port_a, HELIX_TLS_MODE="ca", HELIX_PKI_DIR=str(pki_a))
    monitor_b = start_monitor(procs, table_b, port_b, HELIX_TLS_MODE="ca", HELIX_PKI_DIR=str(pki_b))
    iid = "i-mca"
    env = agent_env(
        iid, port_a, HELIX_MONITOR_ADDR=f"{addr_a},{addr_b}", HELIX_TLS_MODE="ca", HELIX_TLS_CA=str(pki_a / "ca.crt")
    )
    agent = procs.python(iid, ["-m", "monitor_c"], env)
    for table in (table_a, table_b):
        wait_for(lambda t=table: healthy_with_metrics(t, iid), 20, f"{iid} HEALTHY in {table} over mutual TLS")

    # B dies and comes back knowing nothing: A goes on polling; the agent re-enrols with B, and the
    # certificate B now signed serves A too (A's polls carry on, and a new handshake verifies).
    monitor_b = restart_forgetting(procs, monitor_b, table_b, port_b, HELIX_TLS_MODE="ca", HELIX_PKI_DIR=str(pki_b))
    wait_for(lambda: healthy_with_metrics(table_b, iid), 20, f"{iid} back in the restarted {table_b}")
    assert f"not polled by {addr_b}" in agent.output() and f"not polled by {addr_a}" not in agent.output()
    polled_since(table_a, iid, time.time())
    ca = (pki_a / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(ca, (pki_a / "monitor.key").read_bytes(), (pki_a / "monitor.crt").read_bytes())
    options = [("grpc.ssl_target_name_override", pki.agent_name(iid))]
    own_a = CredentialIssuer.from_state_dir(state_dir_for(table_a)).metadata(iid, rows(table_a)[iid].registered_at)
    with grpc.secure_channel(env["HELIX_AGENT_LISTEN"], creds, options=options) as channel:
        answer = helix_pb2_grpc.AgentStub(channel).Heartbeat(helix_pb2.HeartbeatRequest(), metadata=own_a, timeout=10)
    assert answer.instance_id == iid
    assert not any("handshake" in line.lower() for line in agent.output().splitlines() if line.startswith("E"))
