"""The demo's sample app, as a real process: health, CPU per request, bad input, clean exit."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import psutil
import pytest

from tests.procs import base_env, free_port, wait_for


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def inflight(port: int) -> dict:
    status, body = get(port, "/inflight")
    assert status == 200, body
    return json.loads(body)


def wait_inflight(port: int, n: int) -> dict:
    """The app's /inflight once it says `n` requests are in flight."""
    return wait_for(lambda: (seen := inflight(port))["inflight"] == n and seen, 20, f"{n} request(s) in flight")


def start_app(procs, work_ms: float = 10.0):
    port = free_port()
    proc = procs.python(
        "sample-app", ["-m", "deploy.local.sample_app", "--port", str(port), "--work-ms", str(work_ms)], base_env()
    )
    wait_for(lambda: get(port, "/health")[0] == 200, 30, "the sample app's /health")
    return proc, port


def test_health_work_and_errors(procs):
    _, port = start_app(procs)
    assert get(port, "/health") == (200, b"ok\n")
    assert get(port, "/work") == (200, b"done\n")
    assert get(port, "/work?ms=0") == (200, b"done\n")
    status, body = get(port, "/work?ms=abc")
    assert status == 400 and b"ms=abc" in body and b"expected" in body
    assert get(port, "/work?ms=5000")[0] == 400
    assert get(port, "/nowhere")[0] == 404


def test_each_request_burns_its_cpu(procs):
    """CPU tracks the request rate: n requests cost about n x work-ms of the app's CPU time."""
    proc, port = start_app(procs, work_ms=20)
    app = psutil.Process(proc.pid)
    before = sum(app.cpu_times()[:2])
    n = 25
    for _ in range(n):
        assert get(port, "/work")[0] == 200
    used = sum(app.cpu_times()[:2]) - before
    assert used >= 0.9 * n * 0.020, f"{n} requests of 20 ms used only {used:.3f} s of CPU"
    assert used < 3 * n * 0.020 + 0.5, f"{n} requests of 20 ms used {used:.3f} s of CPU"


def test_sigterm_exits_zero(procs):
    proc, _ = start_app(procs)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.mark.parametrize(
    "args, field", [(["--port", "0"], "--port=0"), (["--port", "80", "--work-ms", "-1"], "--work-ms=-1")]
)
def test_bad_arguments_exit_2_naming_the_field(procs, args, field):
    proc = procs.python("sample-app", ["-m", "deploy.local.sample_app", *args], base_env())
    assert proc.wait(timeout=30) == 2
    assert field in proc.output()


def test_port_in_use_is_one_clear_line(procs):
    _, port = start_app(procs)
    proc = procs.python("sample-app-2", ["-m", "deploy.local.sample_app", "--port", str(port)], base_env())
    assert proc.wait(timeout=30) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.output()


def test_sigterm_finishes_requests_in_flight(procs):
    """Connection draining: a request being served when SIGTERM arrives still gets its answer."""
    proc, port = start_app(procs)
    app = psutil.Process(proc.pid)
    result = {}
    before = sum(app.cpu_times()[:2])
    t = threading.Thread(target=lambda: result.update(answer=get(port, "/work?ms=800")))
    t.start()
    wait_for(lambda: sum(app.cpu_times()[:2]) > before + 0.1, 20, "the request to be burning CPU")
    proc.signal(signal.SIGTERM)
    t.join(timeout=30)
    assert result.get("answer") == (200, b"done\n")
    assert proc.wait(timeout=20) == 0


def test_inflight_counts_requests_being_served_but_not_itself_nor_health(procs):
    """What the terminate hook waits on: requests in flight and when the last one arrived. The
    manager's own looks (/health, /inflight) are not traffic: counting them would keep a drained
    app looking busy."""
    _, port = start_app(procs)
    assert get(port, "/health")[0] == 200
    assert inflight(port) == {"inflight": 0, "last_request_at": 0}
    before = time.time()
    result = {}
    t = threading.Thread(target=lambda: result.update(answer=get(port, "/work?ms=800")))
    t.start()
    try:
        seen = wait_inflight(port, 1)
        assert seen["last_request_at"] >= before - 1  # the wall clock, as the hook reads it
        assert get(port, "/health")[0] == 200 and inflight(port)["inflight"] == 1
    finally:
        t.join(timeout=30)
    assert result.get("answer") == (200, b"done\n")
    after = wait_inflight(port, 0)
    assert after["last_request_at"] == seen["last_request_at"]
    assert get(port, "/nowhere")[0] == 404  # any path but the manager's is traffic
    assert inflight(port)["last_request_at"] > seen["last_request_at"]
