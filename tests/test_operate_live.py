"""Issue 13 live: the demo's local stack under load (`make demo`'s processes, as bench/bench_drain.py
runs them), steered with the real `helix-ctl` over the controller's control socket:

- an instance refresh of the whole fleet: no request fails because of it, and at least the
  min-healthy share of the fleet is in service at every look (every 50 ms);
- an override that raises the fleet, then expires by itself;
- launch suspended while the operator pins a spike of capacity, then resumed;
- a webhook receiver that fails at first, then recovers: every event arrives, in order, once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.bench_drain import TableWatch, run_demo
from deploy.local.loadgen import TERMINATED
from tests.procs import ROOT, Proc, base_env, serve_in_thread, wait_for

HOLD = 240  # seconds of steady load at 3.5 instances' worth; the test ends the demo when done
FAIL_FIRST = 4  # POSTs the webhook receiver refuses before it recovers


class Receiver:
    """A webhook endpoint on loopback: refuses the first FAIL_FIRST POSTs (HTTP 500), then keeps
    every event it is given."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.refused = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    if receiver.refused < FAIL_FIRST:
                        receiver.refused += 1
                        self.send_response(500)
                        self.end_headers()
                        return
                    receiver.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/helix"

    def types(self) -> list[str]:
        with self.lock:
            return [e["type"] for e in self.events]


def ctl(socket_path: str, *words: str) -> dict:
    """`python -m controller_asg.ctl … --json`, as an operator runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "controller_asg.ctl", *words, "--json", "--socket", socket_path],
        capture_output=True,
        text=True,
        timeout=30,
        env=base_env(),
        cwd=ROOT,
    )
    assert out.returncode == 0, f"helix-ctl {' '.join(words)}: exit {out.returncode}: {out.stderr}"
    return json.loads(out.stdout)


@pytest.mark.slow
def test_refresh_override_and_suspend_under_load_with_a_webhook(procs, tmp_path):
    receiver = Receiver()
    serve_in_thread(receiver.server, "receiver")

    def operate(proc: Proc, state_dir: str, watch: TableWatch, notes: dict) -> None:
        sock = os.path.join(state_dir, "controller", "ctl.sock")
        wait_for(lambda: len(watch.serving) >= 4 or proc.popen.poll() is not None, 90, "4 instances in service")
        assert proc.popen.poll() is None, proc.output()[-3000:]
        wait_for(lambda: os.path.exists(sock), 10, "the control socket")
        before = set(watch.serving)
        desired = ctl(sock, "status")["desired"]
        floor = math.floor(desired * 0.9)
        started = ctl(sock, "refresh", "start", "--no-skip-matching", "--warmup", "2s", "--reason", "live test")
        assert "refresh-" in started["message"], started
        looks: list[int] = []
        deadline = time.monotonic() + 150
        state = ""
        while time.monotonic() < deadline:
            looks.append(len(watch.serving))
            if len(looks) % 20 == 0:
                state = ctl(sock, "refresh", "status")["refresh"]["state"]
                if state != "in-progress":
                    break
            time.sleep(0.05)
        notes["refresh"] = (state, desired, floor, min(looks), len(looks))
        assert state == "successful", notes["refresh"]
        assert min(looks) >= floor, f"{min(looks)} in service at one look, min healthy {floor} of {desired}"
        assert before.isdisjoint(watch.serving), "every instance was replaced"

        # An override that raises the fleet, and expires by itself.
        ctl(sock, "set-capacity", "--desired", "5", "--for", "12s", "--reason", "a planned event")
        wait_for(lambda: len(watch.serving) >= 5, 60, "5 in service under the override")
        wait_for(lambda: ctl(sock, "status")["override"] is None, 60, "the override to expire")

        # Launch suspended during a spike the operator pins: nothing launches until resumed.
        ctl(sock, "suspend", "launch", "--reason", "incident")
        ctl(sock, "set-capacity", "--desired", "6", "--for", "60s", "--reason", "a spike")
        held = time.monotonic() + 6
        while time.monotonic() < held:
            assert len(watch.serving) <= 5, "launched while launch was suspended"
            time.sleep(0.1)
        ctl(sock, "resume", "launch", "--reason", "incident over")
        wait_for(lambda: len(watch.serving) >= 6, 60, "6 in service once launch resumed")
        ctl(sock, "set-capacity", "--clear")
        history = ctl(sock, "history", "--action", "refresh-start")["entries"]
        notes["history"] = history
        proc.signal(signal.SIGTERM)  # done: end the demo's run now, not at the end of its curve

    curve = [1.0, 2.0, 3.0] + [3.5] * HOLD
    try:
        run = run_demo(
            procs,
            str(tmp_path),
            curve,
            drain=True,
            during=operate,
            timeout=120,
            settings={"HELIX_WEBHOOK_URL": receiver.url},
        )
        # The sink flushes what is queued when the controller stops.
        wait_for(lambda: "set-capacity" in receiver.types(), 10, "the webhook events")
    finally:
        receiver.server.shutdown()
    noted = run.extra
    s = run.summary
    assert s["error"] == "", run.output[-3000:]
    assert run.causes.get(TERMINATED, 0) == 0, f"requests failed because their instance went: {run.causes}"
    assert noted["history"] and "live test" in noted["history"][0]["reason"]
    # The webhook: refused at first, then every event once, in order.
    with receiver.lock:
        sequences = [e["sequence"] for e in receiver.events]
        ids = [e["id"] for e in receiver.events]
    assert receiver.refused == FAIL_FIRST
    assert len(set(ids)) == len(ids) and sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    types = receiver.types()
    for kind in ("refresh-start", "replace", "refresh", "set-capacity", "override-expired", "suspend", "resume"):
        assert kind in types, (kind, types)
