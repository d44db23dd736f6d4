"""The demo's app: a small threaded HTTP service whose CPU tracks its request rate.

    python -m deploy.local.sample_app --port 8080 [--host 127.0.0.1] [--work-ms 10]

`GET /health` answers 200 at once. `GET /work` burns `--work-ms` milliseconds of CPU time (of the
handling thread, so the cost per request stays fixed however many requests run at once) and
answers 200; `/work?ms=N` burns N instead (0..1000). Anything else is a 404. `GET /inflight`
answers `{"inflight": n, "last_request_at": t}`: the requests being handled right now and when the
last one arrived (epoch seconds, 0 before the first), which the demo's terminate hook
(deploy/local/drain_hook.py) waits on. Neither it nor `/health` counts as a request: they are the
manager's own look at the app, and counting them would keep a drained app looking busy. The app
prints one line when it listens; on SIGTERM or SIGINT it stops accepting, finishes the requests it
has, and exits 0. Stdlib only, so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_WORK_MS = 1000.0


def burn(ms: float) -> None:
    """Spin until this thread has used `ms` milliseconds of CPU time."""
    end = time.thread_time() + ms / 1000.0
    x = 0
    while time.thread_time() < end:
        for _ in range(200):  # a little work between clock reads
            x += 1


class Handler(BaseHTTPRequestHandler):
    server_version = "helix-sample-app/1"
    protocol_version = "HTTP/1.1"  # keep-alive, so a load balancer may reuse connections

    def do_GET(self) -> None:  # BaseHTTPRequestHandler's name for it
        url = urlsplit(self.path)
        if url.path == "/health":
            self._reply(200, b"ok\n")
        elif url.path == "/inflight":
            inflight, last = self.server.traffic.now()  # type: ignore[attr-defined]
            body = json.dumps({"inflight": inflight, "last_request_at": last}).encode() + b"\n"
            self._reply(200, body, "application/json")
        else:  # traffic: counted while it is handled, so a drain can wait for it
            with self.server.traffic.request():  # type: ignore[attr-defined]
                self._serve(url.path, url.query)

    def _serve(self, path: str, query: str) -> None:
        if path == "/work":
            ms = self.server.work_ms  # type: ignore[attr-defined]
            raw = parse_qs(query).get("ms")
            if raw:
                try:
                    ms = float(raw[0])
                except ValueError:
                    ms = -1.0
                if not 0 <= ms <= MAX_WORK_MS:
                    self._reply(400, f"ms={raw[0]}: expected a number from 0 to {MAX_WORK_MS:g}\n".encode())
                    return
            burn(ms)
            self._reply(200, b"done\n")
        else:
            self._reply(404, b"not found\n")

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # one line per request would drown the demo's logs


class Traffic:
    """Requests in flight and when the last one arrived, for `/inflight`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inflight = 0
        self.last_request_at = 0.0

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            self.inflight += 1
            self.last_request_at = time.time()
        try:
            yield
        finally:
            with self._lock:
                self.inflight -= 1

    def now(self) -> tuple[int, float]:
        with self._lock:
            return self.inflight, self.last_request_at


class App(ThreadingHTTPServer):
    # On SIGTERM, requests already accepted are finished before the process exits (server_close
    # joins their threads), as a load balancer's connection draining expects.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, work_ms: float):
        super().__init__((host, port), Handler)
        self.work_ms = work_ms
        self.traffic = Traffic()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.sample_app", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--work-ms", type=float, default=10.0, help="CPU milliseconds each /work request burns (default 10)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port={args.port}: expected a port from 1 to 65535")
    if not 0 <= args.work_ms <= MAX_WORK_MS:
        parser.error(f"--work-ms={args.work_ms:g}: expected a number from 0 to {MAX_WORK_MS:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        app = App(args.host, args.port, args.work_ms)
    except OSError as exc:
        print(f"sample_app: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever to return, so it must run on another thread.
        threading.Thread(target=app.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"sample_app: listening on {args.host}:{args.port}, {args.work_ms:g} ms of CPU per /work", flush=True)
    try:
        app.serve_forever(poll_interval=0.2)
    finally:
        app.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
