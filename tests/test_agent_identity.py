"""Agent identity from EC2 instance metadata (IMDSv2), against a small local server that answers
like IMDS (the one fake: the real service cannot run here)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitor_c.identity import imds_lookup, resolve_identity
from shared.config import load_config
from shared.table import State
from tests.procs import free_port
from tests.test_monitor_e2e import agent_env, rows, start_monitor, wait_state

IMDS_TOKEN = "imds-token-abc"
META = {"instance-id": "i-0fake1234", "local-ipv4": "127.0.0.1", "placement/availability-zone": "us-east-1b"}


class FakeImds(BaseHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: str = "") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        self.requests.append(f"PUT {self.path}")
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._send(200, IMDS_TOKEN)
        else:
            self._send(400)

    def do_GET(self):
        self.requests.append(f"GET {self.path}")
        if self.headers.get("X-aws-ec2-metadata-token") != IMDS_TOKEN:
            self._send(401)  # IMDSv2 only: no token, no answer
            return
        key = self.path.removeprefix("/latest/meta-data/")
        if key in META:
            self._send(200, META[key])
        else:
            self._send(404)


@pytest.fixture
def imds():
    FakeImds.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def cfg(**env):
    return load_config({"HELIX_ENV_FILE": "", **env})


def test_imds_lookup_uses_a_token(imds):
    assert imds_lookup(imds) == {"instance_id": "i-0fake1234", "local_ipv4": "127.0.0.1", "zone": "us-east-1b"}
    assert FakeImds.requests[0] == "PUT /latest/api/token"


def test_imds_unreachable_falls_back_to_hostname():
    port = free_port()  # nobody listens
    assert imds_lookup(f"http://127.0.0.1:{port}") == {}
    ident = resolve_identity(cfg(HELIX_IMDS_URL=f"http://127.0.0.1:{port}", HELIX_AGENT_LISTEN="127.0.0.1:7000"), 7000)
    assert ident.source == "hostname" and ident.instance_id and ident.address == "127.0.0.1:7000"
    assert "zone" not in ident.labels


def test_resolve_identity_precedence(imds):
    ident = resolve_identity(cfg(HELIX_IMDS_URL=imds), 50051)
    assert (ident.instance_id, ident.address, ident.labels["zone"], ident.source) == (
        "i-0fake1234",
        "127.0.0.1:50051",
        "us-east-1b",
        "imds",
    )
    ident = resolve_identity(
        cfg(HELIX_IMDS_URL=imds, HELIX_INSTANCE_ID="mine", HELIX_ADVERTISE_ADDR="10.0.0.5:1", HELIX_LABELS="zone=own"),
        50051,
    )
    assert (ident.instance_id, ident.address, ident.labels["zone"]) == ("mine", "10.0.0.5:1", "own")
    # Nothing missing: IMDS is not asked at all.
    FakeImds.requests.clear()
    resolve_identity(
        cfg(HELIX_IMDS_URL=imds, HELIX_INSTANCE_ID="m", HELIX_ADVERTISE_ADDR="10.0.0.5:1", HELIX_LABELS="zone=z"), 1
    )
    assert FakeImds.requests == []


def test_agent_registers_with_imds_identity(procs, table_name, imds):
    port = free_port()
    start_monitor(procs, table_name, port)
    env = agent_env("", port, HELIX_IMDS_URL=imds, HELIX_ADVERTISE_ADDR="")
    procs.python("agent", ["-m", "monitor_c"], env)
    row = wait_state(table_name, "i-0fake1234", State.HEALTHY)
    assert row.zone == "us-east-1b" and row.address == env["HELIX_AGENT_LISTEN"]
    assert set(rows(table_name)) == {"i-0fake1234"}
