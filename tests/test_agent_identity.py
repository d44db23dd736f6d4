"""Agent identity from EC2 instance metadata (IMDSv2), against a small local server that answers
like IMDS (the one fake: the real service cannot run here)."""

from __future__ import annotations

import pytest

from monitor_c.identity import imds_lookup, resolve_identity
from shared.config import load_config
from shared.table import State
from tests.fake_imds import serve_imds
from tests.procs import free_port
from tests.test_monitor_e2e import agent_env, rows, start_monitor, wait_state

META = {"instance-id": "i-0fake1234", "local-ipv4": "127.0.0.1", "placement/availability-zone": "us-east-1b"}


@pytest.fixture
def imds():
    with serve_imds({f"/latest/meta-data/{k}": v for k, v in META.items()}) as fake:
        yield fake


def cfg(**env):
    return load_config({"HELIX_ENV_FILE": "", **env})


def test_imds_lookup_uses_a_token(imds):
    assert imds_lookup(imds.url) == {"instance_id": "i-0fake1234", "local_ipv4": "127.0.0.1", "zone": "us-east-1b"}
    assert imds.requests[0] == "PUT /latest/api/token"


def test_imds_unreachable_falls_back_to_hostname():
    port = free_port()  # nobody listens
    assert imds_lookup(f"http://127.0.0.1:{port}") == {}
    ident = resolve_identity(cfg(HELIX_IMDS_URL=f"http://127.0.0.1:{port}", HELIX_AGENT_LISTEN="127.0.0.1:7000"), 7000)
    assert ident.source == "hostname" and ident.instance_id and ident.address == "127.0.0.1:7000"
    assert "zone" not in ident.labels


def test_resolve_identity_precedence(imds):
    ident = resolve_identity(cfg(HELIX_IMDS_URL=imds.url), 50051)
    assert (ident.instance_id, ident.address, ident.labels["zone"], ident.source) == (
        "i-0fake1234",
        "127.0.0.1:50051",
        "us-east-1b",
        "imds",
    )
    ident = resolve_identity(
        cfg(
            HELIX_IMDS_URL=imds.url,
            HELIX_INSTANCE_ID="mine",
            HELIX_ADVERTISE_ADDR="10.0.0.5:1",
            HELIX_LABELS="zone=own",
        ),
        50051,
    )
    assert (ident.instance_id, ident.address, ident.labels["zone"]) == ("mine", "10.0.0.5:1", "own")
    # Nothing missing: IMDS is not asked at all.
    imds.requests.clear()
    resolve_identity(
        cfg(HELIX_IMDS_URL=imds.url, HELIX_INSTANCE_ID="m", HELIX_ADVERTISE_ADDR="10.0.0.5:1", HELIX_LABELS="zone=z"), 1
    )
    assert imds.requests == []


def test_agent_registers_with_imds_identity(procs, table_name, imds):
    port = free_port()
    start_monitor(procs, table_name, port)
    env = agent_env("", port, HELIX_IMDS_URL=imds.url, HELIX_ADVERTISE_ADDR="")
    procs.python("agent", ["-m", "monitor_c"], env)
    row = wait_state(table_name, "i-0fake1234", State.HEALTHY)
    assert row.zone == "us-east-1b" and row.address == env["HELIX_AGENT_LISTEN"]
    assert set(rows(table_name)) == {"i-0fake1234"}
