"""gRPC fuzzing of a real MonitorS and a real agent: Hypothesis-generated and raw malformed messages
at Register, Deregister and the agent's methods. Every call gets a deliberate status (never UNKNOWN,
never a hang), no process dies, and no row changes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import helix_pb2
from shared.table import RosterEntry, State
from tests.procs import free_port
from tests.test_monitor_e2e import AUTH, agent_env, rows, start_monitor, wait_state
from tests.test_registration_binding import publish

# What a refused call may answer. UNKNOWN (an exception escaping a handler, or gRPC's own answer to
# bytes that are not the message, with a traceback in the log) is never right.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
}

text = st.text(max_size=80) | st.sampled_from(["", "i-1", "127.0.0.1:1", "\x00", "a" * 70, "é" * 40, "i-1\n"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One MonitorS (roster required) and one registered agent for the whole module."""
    from tests.procs import ProcessPool

    name = f"helix-fuzz-{free_port()}"
    pool = ProcessPool(str(tmp_path_factory.mktemp("fuzz-logs")))
    port = free_port()
    try:
        monitor = start_monitor(pool, name, port, HELIX_ROSTER="required", HELIX_REGISTER_RATE=0)
        env = agent_env("i-real", port, HELIX_INSTANCE_SECRET="real-secret")
        pool.python("agent", ["-m", "monitor_c"], env)
        import hashlib

        publish(name, RosterEntry("i-real", env["HELIX_ADVERTISE_ADDR"], hashlib.sha256(b"real-secret").digest()))
        wait_state(name, "i-real", State.HEALTHY)
        yield name, port, env["HELIX_ADVERTISE_ADDR"], monitor
    finally:
        pool.stop_all()
        from shared.table import MetricsTable

        MetricsTable.remove(name)


def call(channel: grpc.Channel, method: str, payload: bytes, metadata=AUTH) -> grpc.StatusCode:
    raw: Any = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        raw(payload, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def snapshot_rows(name: str) -> dict:
    return {k: (r.address, r.registered_at, r.state != State.FREE) for k, r in rows(name).items()}


@settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    instance_id=text,
    address=text,
    vcpus=st.integers(0, 2**32 - 1),
    version=text,
    labels=st.dictionaries(text, text, max_size=20),
    secret=text,
)
def test_register_with_any_fields(world, instance_id, address, vcpus, version, labels, secret):
    name, port, _, monitor = world
    before = snapshot_rows(name)
    request = helix_pb2.RegisterRequest(
        instance_id=instance_id,
        address=address,
        vcpus=vcpus,
        agent_version=version,
        labels=labels,
        instance_secret=secret,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        code = call(channel, "/helix.v1.Registry/Register", request.SerializeToString())
    assert code in REFUSALS, code
    assert snapshot_rows(name) == before
    assert monitor.alive()


@settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=300),
    method=st.sampled_from(
        [
            "/helix.v1.Registry/Register",
            "/helix.v1.Registry/Deregister",
            "/helix.v1.Agent/GetMetrics",
            "/helix.v1.Agent/Heartbeat",
        ]
    ),
)
def test_raw_malformed_bytes_at_every_method(world, payload, method):
    name, port, agent_address, monitor = world
    before = snapshot_rows(name)
    target = agent_address if method.startswith("/helix.v1.Agent") else f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        code = call(channel, method, payload)
    assert code == grpc.StatusCode.OK or code in REFUSALS, code
    if method.startswith("/helix.v1.Agent"):
        assert code == grpc.StatusCode.UNAUTHENTICATED, "the fleet token does not open a registered agent"
    assert snapshot_rows(name) == before
    assert monitor.alive()
    assert "Traceback" not in monitor.output(), "one line per event, never a traceback"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance_id=text, reason=text)
def test_deregister_with_any_fields_never_removes_the_real_row(world, instance_id, reason):
    name, port, _, monitor = world
    request = helix_pb2.DeregisterRequest(instance_id=instance_id, reason=reason)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        code = call(channel, "/helix.v1.Registry/Deregister", request.SerializeToString())
    assert code == grpc.StatusCode.OK or code in REFUSALS, code
    assert "i-real" in rows(name), "only the agent's own credential removes its row"
    assert monitor.alive()
