"""The one fake in the tests: EC2's instance metadata service (IMDSv2), which cannot run here.

It answers like IMDS: a token from `PUT /latest/api/token` (with the TTL header), then GETs that
carry the token; without it, 401. `answers` maps full paths (`/latest/meta-data/instance-id`,
`/latest/dynamic/instance-identity/document`, …) to bodies; every request is recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "imds-token"


class FakeImds:
    def __init__(self, answers: dict[str, str] | None = None):
        self.answers: dict[str, str] = dict(answers or {})
        self.requests: list[str] = []
        self.url = ""

    def meta(self, **values: str) -> None:
        """Set meta-data answers by name: `instance_id="i-1"` answers /latest/meta-data/instance-id."""
        for key, value in values.items():
            self.answers[f"/latest/meta-data/{key.replace('_', '-')}"] = value


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
            elif self.path in imds.answers:
                self._send(200, imds.answers[self.path])
            else:
                self._send(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    imds.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield imds
    finally:
        server.shutdown()
        server.server_close()
