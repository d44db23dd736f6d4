"""moto's EC2 server as a real HTTP endpoint for tests, and a fault-injecting proxy in front of it.

`moto_endpoint` (module-scoped fixture): the URL of `python -m moto.server`, run on a free loopback
port in a subprocess (tests/procs.py) once per test session (`moto_server`: started when a test first
needs it, killed at the end; about 1.5 s to start), and reset (`reset_moto`) before each module that
uses it: every module starts from an empty account, as on a server of its own. Tests call
`reset_moto(url)` to start from an empty account again.

`FaultProxy`: an HTTP proxy (a thread in the test process) that forwards every request to moto, but
can answer chosen EC2 actions with an error of its own (e.g. InsufficientInstanceCapacity for one
subnet, which moto never produces) or forward a request and then drop the reply (a lost reply).
The same for the other query-protocol services on moto's one endpoint (elbv2: an error answers in
that service's own error format), and a rule may rewrite moto's reply (a state moto never reports,
such as a target draining). `requests` keeps every request it received: (service, action, params).
JSON-protocol services (DynamoDB) are proxied too: their action is X-Amz-Target's operation, and
an error verdict answers in the query format (rules for them drop or lose requests instead).
"""

from __future__ import annotations

import http.client
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.sax.saxutils import escape

import pytest

from tests.procs import ProcessPool, base_env, free_port, serve_in_thread, wait_for

REGION = "us-east-1"
CREDENTIALS = {"HELIX_AWS_ACCESS_KEY": "testing", "HELIX_AWS_SECRET_KEY": "testing", "HELIX_AWS_REGION": REGION}


def start_moto(pool: ProcessPool) -> str:
    port = free_port()
    proc = pool.python("moto-server", ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=base_env())
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.alive(), "moto server exited:\n" + proc.output()[-2000:]
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as resp:
            return resp.status == 200

    wait_for(answers, 60, "moto's server to answer")
    return url


def moto_client(url: str, service: str, region: str = REGION) -> Any:
    """A boto3 client of `service` on moto's server at `url`, with moto's test credentials."""
    import boto3

    return boto3.client(
        service, endpoint_url=url, region_name=region, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def reset_moto(url: str) -> None:
    req = urllib.request.Request(f"{url}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """One moto server for the session; modules take it through `moto_endpoint`."""
    pool = ProcessPool()
    try:
        yield start_moto(pool)
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def moto_endpoint(moto_server: str) -> str:
    reset_moto(moto_server)  # nothing from the modules before
    return moto_server


# A rule sees (action, form params) and returns None (forward), "drop" (forward, lose the reply),
# "lose" (lose the request), (status, error code, message) to answer with that error (EC2's error
# format for EC2, the query protocol's ErrorResponse for other services), or a function
# bytes -> bytes: forward, and hand the caller that function of moto's reply instead.
Rule = Callable[[str, dict[str, str]], object]
# The service a SigV4-signed request is for: the credential scope's fourth part.
_SCOPE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/")


def ec2_error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>helix-test</RequestID></Response>"
    ).encode()


def query_error_xml(code: str, message: str) -> bytes:
    """The query protocol's error body (elbv2, iam, ...): not EC2's `<Response><Errors>` shape."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ErrorResponse><Error><Type>Sender</Type><Code>{escape(code)}</Code>'
        f"<Message>{escape(message)}</Message></Error><RequestId>helix-test</RequestId></ErrorResponse>"
    ).encode()


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlparse(upstream)
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []  # (action, what happened)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (service, action, params), all of them
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                params = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
                # The query protocol's Action, else a JSON protocol's X-Amz-Target (DynamoDB_20120810.GetItem).
                action = params.get("Action", "") or self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                scope = _SCOPE.search(self.headers.get("Authorization", ""))
                service = scope.group(1) if scope else ""
                with proxy._lock:
                    proxy.requests.append((service, action, params))
                verdict = proxy._verdict(action, params)
                if isinstance(verdict, tuple):
                    status, code, message = verdict
                    payload = ec2_error_xml(code, message) if service in ("ec2", "") else query_error_xml(code, message)
                    # Noted before the reply leaves: a test that asserts on `seen` once its call returns
                    # must find it there (noted after, the client could read the reply first).
                    proxy._note(action, code)
                    self.send_response(status)
                    self.send_header("Content-Type", "text/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if verdict == "lose":
                    proxy._note(action, "lost")
                    self.close_connection = True  # the request never reaches the server
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request("POST", self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                finally:
                    conn.close()
                if verdict == "drop":
                    proxy._note(action, "dropped")
                    self.close_connection = True  # the request was served; its reply never arrives
                    return
                if callable(verdict):
                    payload = verdict(payload)
                proxy._note(action, "rewritten" if callable(verdict) else "forwarded")  # before the reply, as above
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = serve_in_thread(self.server, "fault-proxy")

    def _verdict(self, action: str, params: dict[str, str]) -> object:
        with self._lock:
            for rule in self.rules:
                verdict = rule(action, params)
                if verdict is not None:
                    return verdict
        return None

    def _note(self, action: str, what: str) -> None:
        with self._lock:
            self.seen.append((action, what))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(moto_endpoint) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_endpoint)
    try:
        yield proxy
    finally:
        proxy.close()
