"""The one fake in the tests: EC2's instance metadata service (IMDSv2), which cannot run here.

It answers like IMDS: a token from `PUT /latest/api/token` (with the TTL header), then GETs that
carry the token; without it, 401. `answers` maps full paths (`/latest/meta-data/instance-id`,
`/latest/dynamic/instance-identity/document`, …) to bodies; every request is recorded.
Spot's notices: `spot_action(...)` and `rebalance(...)` set (or, with None, remove) the documents
EC2 publishes; `failing = 500` answers every GET with that status; `stop()` takes it down early.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.procs import serve_in_thread

TOKEN = "imds-token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"


class FakeImds:
    def __init__(self, answers: dict[str, str] | None = None):
        self.answers: dict[str, str] = dict(answers or {})
        self.requests: list[str] = []
        self.url = ""
        self.failing = 0  # an HTTP status every GET answers with (0: answer normally)
        self.server: ThreadingHTTPServer | None = None
        self.stopped = False

    def meta(self, **values: str) -> None:
        """Set meta-data answers by name: `instance_id="i-1"` answers /latest/meta-data/instance-id."""
        for key, value in values.items():
            self.answers[f"/latest/meta-data/{key.replace('_', '-')}"] = value

    def spot_action(self, action: str | None, time: str = "2026-11-30T05:10:00Z") -> None:
        """The interruption notice (`terminate`, `stop` or `hibernate` at `time`); None: none (404)."""
        if action is None:
            self.answers.pop(ACTION_PATH, None)
        else:
            self.answers[ACTION_PATH] = json.dumps({"action": action, "time": time})

    def rebalance(self, notice_time: str | None) -> None:
        """The rebalance recommendation issued at `notice_time`; None: none (404)."""
        if notice_time is None:
            self.answers.pop(REBALANCE_PATH, None)
        else:
            self.answers[REBALANCE_PATH] = json.dumps({"noticeTime": notice_time})

    def stop(self) -> None:
        """Take IMDS down now (connections refused from here on)."""
        if self.server is not None and not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()


@contextmanager
def serve_imds(answers: dict[str, str] | None = None) -> Iterator[FakeImds]:
    imds = FakeImds(answers)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            imds.requests.append(f"PUT {self.path}")
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self._send(200, TOKEN) if ok else self._send(400)

        def do_GET(self) -> None:
            imds.requests.append(f"GET {self.path}")
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                self._send(401)  # IMDSv2 only: no token, no answer
            elif imds.failing:
                self._send(imds.failing)
            elif self.path in imds.answers:
                self._send(200, imds.answers[self.path])
            else:
                self._send(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serve_in_thread(server, "fake-imds")
    imds.url = f"http://127.0.0.1:{server.server_address[1]}"
    imds.server = server
    try:
        yield imds
    finally:
        imds.stop()
