"""The app liveness probe against real local servers and processes."""

from __future__ import annotations

import asyncio
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitor_c.probe import AppProbe
from tests.procs import free_port, serve_in_thread, wait_for


def check(spec: str, timeout: float = 2.0) -> tuple[bool, str]:
    return asyncio.run(AppProbe(spec, timeout).check())


class Health(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        status = 200 if self.path == "/health" else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def http_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    serve_in_thread(server)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_no_check_is_live():
    assert check("") == (True, "no check")


def test_http(http_port):
    assert check(f"http://127.0.0.1:{http_port}/health") == (True, "http 200")
    assert check(f"http://127.0.0.1:{http_port}/broken") == (False, "http 503")
    live, detail = check(f"http://127.0.0.1:{free_port()}/health")
    assert not live and "refused" in detail


def test_tcp_and_timeouts():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        assert check(f"tcp://127.0.0.1:{port}") == (True, "tcp ok")
        # Accepts but never answers HTTP: the probe gives up after its timeout.
        live, detail = check(f"http://127.0.0.1:{port}/", timeout=0.3)
        assert not live and detail.startswith("timeout")
    assert check(f"tcp://127.0.0.1:{free_port()}") == (False, "tcp refused")


def test_process(procs):
    sleeper = procs.start("sleeper", ["sleep", "600"])
    wait_for(lambda: sleeper.alive(), 10, "sleep to start")
    probe = AppProbe("process:sleep", 2.0)
    live, detail = asyncio.run(probe.check())
    assert live and detail.startswith("process ")
    assert check("process:no-such-helix-proc") == (False, "no process no-such-helix-proc")
