"""Registration bound to the fleet: the attacks of the identity issue against a real MonitorS.

MonitorS runs with HELIX_ROSTER=required (the default); the test publishes the roster exactly as
ControllerASG does (`MetricsTable.publish_roster`), then calls Register over real gRPC.
"""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest

from monitor_s.admission import RateLimiter, admit
from monitor_s.validation import Refusal, Registration
from protos import helix_pb2, helix_pb2_grpc
from shared.table import MetricsTable, Roster, RosterEntry
from tests.procs import free_port, wait_for
from tests.test_monitor_e2e import AUTH, rows, start_monitor


def publish(table_name: str, *entries: RosterEntry) -> None:
    with MetricsTable.attach(table_name) as table:
        table.publish_roster(list(entries), time.time())


def register(port: int, instance_id: str, address: str, secret: str = "") -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            helix_pb2_grpc.RegistryStub(channel).Register(
                helix_pb2.RegisterRequest(instance_id=instance_id, address=address, vcpus=1, instance_secret=secret),
                metadata=AUTH,
                timeout=10,
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def monitor(procs, table_name):
    port = free_port()
    proc = start_monitor(procs, table_name, port, HELIX_ROSTER="required", HELIX_SHM_CAPACITY=8)
    return port, proc


def test_unknown_ids_never_take_a_row_and_cannot_exhaust_the_table(monitor, table_name):
    """Was: seven junk ids filled an 8-row table; a real new instance then got RESOURCE_EXHAUSTED."""
    port, _ = monitor
    assert register(port, "i-real", "127.0.0.1:5001") == grpc.StatusCode.UNAVAILABLE  # no roster yet: retry
    publish(table_name, RosterEntry("i-real", "127.0.0.1:5001"))
    for n in range(20):
        assert register(port, f"i-junk{n}", f"127.0.0.1:{6000 + n}") == grpc.StatusCode.UNAVAILABLE
    assert rows(table_name) == {}
    assert register(port, "i-real", "127.0.0.1:5001") == grpc.StatusCode.OK
    assert set(rows(table_name)) == {"i-real"}


def test_a_known_id_from_another_address_is_refused_and_its_row_unchanged(monitor, table_name):
    """Was: a token holder re-registered i-0victim at its own address and answered its polls."""
    port, proc = monitor
    publish(table_name, RosterEntry("i-victim", "127.0.0.1:5002"))
    assert register(port, "i-victim", "127.0.0.1:5002") == grpc.StatusCode.OK
    before = rows(table_name)["i-victim"]
    assert register(port, "i-victim", "127.0.0.1:6666") == grpc.StatusCode.PERMISSION_DENIED
    after = rows(table_name)["i-victim"]
    assert (after.address, after.registered_at) == (before.address, before.registered_at)
    wait_for(
        lambda: "expected '127.0.0.1:5002', where the cloud says i-victim is" in proc.output(),
        10,
        "the refusal to be logged with both addresses",
    )


def test_trust_advertised_relaxes_the_caller_rule_never_the_ownership_rule(procs, table_name):
    port = free_port()
    start_monitor(procs, table_name, port, HELIX_ROSTER="required", HELIX_TRUST_ADVERTISED=1)
    publish(table_name, RosterEntry("i-nat", "10.1.2.3"))
    assert register(port, "i-nat", "10.9.9.9:50051") == grpc.StatusCode.PERMISSION_DENIED
    assert register(port, "i-nat", "10.1.2.3:50051") == grpc.StatusCode.OK  # behind NAT: the caller is 127.0.0.1


def test_an_instance_with_a_secret_registers_only_with_it(monitor, table_name):
    """Another instance's agent knows the fleet token but not this instance's secret."""
    port, _ = monitor
    secret = "s3cret-of-i-mine"
    publish(table_name, RosterEntry("i-mine", "127.0.0.1:5003", hashlib.sha256(secret.encode()).digest()))
    assert register(port, "i-mine", "127.0.0.1:5003") == grpc.StatusCode.PERMISSION_DENIED
    assert register(port, "i-mine", "127.0.0.1:5003", "wrong") == grpc.StatusCode.PERMISSION_DENIED
    assert rows(table_name) == {}
    assert register(port, "i-mine", "127.0.0.1:5003", secret) == grpc.StatusCode.OK


def test_rows_of_instances_that_left_the_roster_are_freed_promptly(monitor, table_name):
    """Was: a SIGKILLed agent's row was polled for HELIX_FORGET_AFTER (600 s): 15 rows for 5 instances."""
    port, _ = monitor
    publish(table_name, RosterEntry("i-stays", "127.0.0.1:5004"), RosterEntry("i-goes", "127.0.0.1:5005"))
    assert register(port, "i-stays", "127.0.0.1:5004") == grpc.StatusCode.OK
    assert register(port, "i-goes", "127.0.0.1:5005") == grpc.StatusCode.OK
    publish(table_name, RosterEntry("i-stays", "127.0.0.1:5004"))
    gone = time.monotonic()
    wait_for(lambda: set(rows(table_name)) == {"i-stays"}, 60, "the row of the instance off the roster freed")
    assert time.monotonic() - gone < 40


def test_a_registration_flood_is_refused_and_never_displaces_a_real_instance(procs, table_name):
    port = free_port()
    # Half a registration per second, bursts of 2: however slow this loaded machine makes the 40
    # calls below, most of them are refused.
    proc = start_monitor(
        procs, table_name, port, HELIX_ROSTER="required", HELIX_REGISTER_RATE=0.5, HELIX_SHM_CAPACITY=8
    )
    publish(table_name, RosterEntry("i-real", "127.0.0.1:5006"))
    codes = [register(port, f"i-flood{n}", f"127.0.0.1:{7000 + n}") for n in range(40)]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 25
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
    assert proc.output().count("refusing registrations from 127.0.0.1") == 1, "logged once per flood"
    wait_for(
        lambda: register(port, "i-real", "127.0.0.1:5006") == grpc.StatusCode.OK,
        30,
        "the real instance to register once the bucket refills",
    )
    assert set(rows(table_name)) == {"i-real"}


# -- the pure rules ----------------------------------------------------------------------------------


def reg(instance_id: str = "i-1", host: str = "10.0.0.1", port: int = 50051) -> Registration:
    return Registration(instance_id, f"{host}:{port}", host, port, 1, "", "", 0, {})


def refusal(registration: Registration, roster: Roster, secret: str = "") -> str:
    try:
        admit(registration, secret, roster)
    except Refusal as exc:
        return f"{exc.code.name}: {exc.message}"
    return "OK"


def test_admission_rules():
    roster = Roster(
        1.0,
        {
            "i-1": RosterEntry("i-1", "10.0.0.1"),
            "l-1": RosterEntry("l-1", "127.0.0.1:9000"),
            "s-1": RosterEntry("s-1", "::1", hashlib.sha256(b"pw").digest()),
        },
    )
    assert refusal(reg(), Roster(0.0, {})).startswith("UNAVAILABLE") and "not published" in refusal(
        reg(), Roster(0.0, {})
    )
    assert refusal(reg("i-2"), roster).startswith("UNAVAILABLE: instance_id: 'i-2' is not on the controller's roster")
    assert refusal(reg(), roster) == "OK"
    assert refusal(reg(port=1), roster) == "OK", "a roster address without a port binds the host only"
    assert refusal(reg(host="10.0.0.2"), roster).startswith(
        "PERMISSION_DENIED: address: '10.0.0.2:50051', expected '10.0.0.1'"
    )
    assert refusal(reg("l-1", "127.0.0.1", 9000), roster) == "OK"
    assert refusal(reg("l-1", "127.0.0.1", 9001), roster).startswith("PERMISSION_DENIED")
    assert refusal(reg("s-1", "::1"), roster, "pw") == "OK"
    assert (
        refusal(reg("s-1", "::1"), roster) == "PERMISSION_DENIED: instance_secret: missing for s-1, expected the "
        "secret its provider gave it"
    )
    assert "wrong" in refusal(reg("s-1", "::1"), roster, "pw2") and "pw2" not in refusal(
        reg("s-1", "::1"), roster, "pw2"
    )
    assert refusal(reg("s-1", "0:0:0:0:0:0:0:1"), roster, "pw") == "OK", "IPv6 spellings compare as addresses"


def test_rate_limiter_buckets():
    limiter = RateLimiter(2.0)  # bursts of 10
    assert [limiter.allow("a", 0.0) for _ in range(11)] == [True] * 10 + [False]
    assert limiter.allow("b", 0.0), "per source"
    assert not limiter.allow("a", 0.4) and limiter.allow("a", 0.5), "2 per second refill"
    assert all(RateLimiter(0).allow("a", 0.0) for _ in range(1000)), "0: no limit"


def test_agents_with_their_own_secrets_and_credentials_and_no_fleet_token(procs, table_name):
    """Per-instance secrets in, per-agent credentials out: the agents hold no fleet token, MonitorS
    polls each with its own credential, one agent's credential opens no other, and a restarted
    MonitorS still polls them all (it derives the same credentials)."""
    from shared.table import State
    from tests.test_monitor_e2e import agent_env, wait_state

    port = free_port()
    monitor = start_monitor(procs, table_name, port, HELIX_ROSTER="required")
    secrets_, addresses = {}, {}
    for name in ("i-a", "i-b"):
        env = agent_env(name, port, HELIX_INSTANCE_SECRET=f"secret-of-{name}")
        del env["HELIX_TOKEN"]
        secrets_[name], addresses[name] = env["HELIX_INSTANCE_SECRET"], env["HELIX_ADVERTISE_ADDR"]
        procs.python(f"agent-{name}", ["-m", "monitor_c"], env)
    publish(
        table_name, *(RosterEntry(n, addresses[n], hashlib.sha256(secrets_[n].encode()).digest()) for n in secrets_)
    )
    for name in secrets_:
        wait_state(table_name, name, State.HEALTHY)

    def credential(name: str) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = helix_pb2.RegisterRequest(
                instance_id=name, address=addresses[name], vcpus=1, instance_secret=secrets_[name]
            )
            return helix_pb2_grpc.RegistryStub(channel).Register(request, timeout=10).credential

    def get_metrics(name: str, bearer: str) -> grpc.StatusCode:
        with grpc.insecure_channel(addresses[name]) as channel:
            try:
                helix_pb2_grpc.AgentStub(channel).GetMetrics(
                    helix_pb2.GetMetricsRequest(instance_id=name),
                    timeout=10,
                    metadata=(("authorization", f"Bearer {bearer}"),),
                )
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    cred_a, cred_b = credential("i-a"), credential("i-b")
    assert cred_a != cred_b
    assert get_metrics("i-b", cred_b) == grpc.StatusCode.OK
    assert get_metrics("i-b", cred_a) == grpc.StatusCode.UNAUTHENTICATED, "a's credential does not open b"
    assert get_metrics("i-a", "test-token-0123456789") == grpc.StatusCode.UNAUTHENTICATED

    monitor.kill_group()
    start_monitor(procs, table_name, port, HELIX_ROSTER="required")
    before = {n: r.last_seen for n, r in rows(table_name).items()}
    wait_for(
        lambda: all(rows(table_name)[n].last_seen > before[n] + 1 for n in secrets_),
        30,
        "the restarted MonitorS to poll both agents with the credentials they hold",
    )
    assert all(r.state == State.HEALTHY and r.failures == 0 for r in rows(table_name).values())


def test_admission_messages_and_non_ip_hosts():
    roster = Roster(1.0, {"h-1": RosterEntry("h-1", "host-a"), "s-1": RosterEntry("s-1", "10.0.0.1", b"x" * 32)})
    assert refusal(reg(), Roster(0.0, {})) == (
        "UNAVAILABLE: instance_id: 'i-1' cannot be checked yet: the controller has not published its roster "
        "(is ControllerASG running?); retry"
    )
    assert refusal(reg("i-9"), roster) == (
        "UNAVAILABLE: instance_id: 'i-9' is not on the controller's roster of this group's instances (yet); retry"
    )
    assert refusal(reg("h-1", "host-a"), roster) == "OK", "a name compares as text"
    assert refusal(reg("h-1", "host-b"), roster).startswith("PERMISSION_DENIED")
    assert refusal(reg("h-1", "10.0.0.1"), roster).startswith("PERMISSION_DENIED"), "a name is not an address"
    assert refusal(reg("s-1"), roster, "nope") == (
        "PERMISSION_DENIED: instance_secret: wrong for s-1, expected the secret its provider gave it"
    )


def test_rate_limiter_edges():
    slow = RateLimiter(0.1)  # less than one a second: a burst of at least one
    assert [slow.allow("a", 0.0) for _ in range(2)] == [True, False]
    assert slow.allow("a", 10.0), "refilled after 1/rate seconds"
    one = RateLimiter(1.0)
    for _ in range(5):
        one.allow("a", 100.0)
    assert not one.allow("a", 100.0) and one.allow("a", 101.0), "refill counts from the last call, not from 0"
    spray = RateLimiter(1.0)
    for n in range(10_001):
        spray.allow(f"s{n}", 0.0)
    assert len(spray.buckets) == 10_001
    spray.allow("late", 0.5)  # nothing has refilled yet: every bucket is kept
    assert len(spray.buckets) == 10_002
    spray.allow("later", 10.0)  # all refilled: forgotten, bar the one just used
    assert set(spray.buckets) == {"later"}
