"""The demo's terminate hook: wait until the sample app on this instance has nothing in flight.

    python -m deploy.local.drain_hook --port PORT [--host 127.0.0.1] [--quiet 1.0]

The demo sets `HELIX_TERMINATE_HOOK="python -m deploy.local.drain_hook --port {port}"`; the local
provider puts each instance's app port in place of `{port}`, and the agent runs it when MonitorS
asks it to drain (the controller has already published the drain on the roster).

It asks the app's `GET /inflight` every `--interval` seconds and exits 0 once no request is in
flight and none has arrived for `--quiet` seconds. The quiet time counts from the later of the last
request and the hook's own start: the load balancer reads the table about once a second, so
requests may still arrive for up to a second after the drain was published, even to an app that
was idle before it. It exits 0 at once if the app is gone (nothing to wait for), 1 if
HELIX_HOOK_TIMEOUT (set by the agent; else --timeout) runs out first, 2 if the app answers but not
as the sample app does. One line at the end, short (the agent keeps its first few dozen bytes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_TIMEOUT = 300.0  # HELIX_DRAIN_TIMEOUT's default, for a run without the agent's setting
EXIT_DRAINED, EXIT_GAVE_UP, EXIT_NOT_SAMPLE_APP = 0, 1, 2


class AppGone(Exception):
    """Nothing listens on the port any more: nothing can be in flight."""


class NotSampleApp(Exception):
    """The app answered, but not with the sample app's /inflight."""


@dataclass(frozen=True)
class Traffic:
    inflight: int
    last_request_at: float  # epoch seconds; 0 before the first request


def read_traffic(host: str, port: int, timeout: float) -> Traffic:
    """The app's /inflight. Raises AppGone on a refused connection, NotSampleApp on an answer that
    is not one, OSError (a timeout among them) when the app is there but did not answer in time."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError as exc:
            raise AppGone(str(exc)) from exc
        conn.request("GET", "/inflight")
        resp = conn.getresponse()
        body = resp.read()
    except http.client.HTTPException as exc:
        raise OSError(f"no answer: {exc!r}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise NotSampleApp(f"GET /inflight answered {resp.status}")
    try:
        data = json.loads(body)
        return Traffic(int(data["inflight"]), float(data["last_request_at"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise NotSampleApp(f"GET /inflight answered {body[:40]!r}") from exc


def hook_timeout(environ: dict[str, str], fallback: float) -> float:
    """HELIX_HOOK_TIMEOUT as the agent sets it; `fallback` when it is absent or not a positive number."""
    raw = environ.get("HELIX_HOOK_TIMEOUT", "").strip()
    try:
        value = float(raw)
    except ValueError:
        return fallback
    return value if 0 < value < float("inf") else fallback


def give_up_after(timeout: float) -> float:
    """A little before the agent's own limit, so the hook says why it stopped instead of being
    killed mid-wait: 10 % of the time, at most a second."""
    return timeout - min(1.0, 0.1 * timeout)


def drain(
    look: Callable[[], Traffic],
    quiet: float,
    budget: float,
    interval: float,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, str]:
    """Wait as the module says; (exit status, the one line to print)."""
    started = clock()
    last_error = ""
    seen: Traffic | None = None
    while True:
        now = clock()
        try:
            seen = look()
        except AppGone:
            return EXIT_DRAINED, f"app gone after {now - started:.1f}s: nothing in flight"
        except NotSampleApp as exc:
            return EXIT_NOT_SAMPLE_APP, f"cannot drain: {exc}"
        except OSError as exc:  # there, but slow (a stopped or overloaded app): ask again
            last_error = str(exc) or type(exc).__name__
        else:
            last_error = ""
            quiet_since = max(seen.last_request_at, started)
            if seen.inflight == 0 and now - quiet_since >= quiet:
                return EXIT_DRAINED, f"drained in {now - started:.1f}s"
        if now - started >= budget:
            if seen is None or last_error:
                why = f"app not answering ({last_error})" if last_error else "app not answering"
            else:
                why = f"{seen.inflight} in flight"
            return EXIT_GAVE_UP, f"gave up after {now - started:.0f}s: {why}"
        sleep(interval)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.drain_hook", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the app's port")
    parser.add_argument("--host", default="127.0.0.1", help="the app's address (default 127.0.0.1)")
    parser.add_argument(
        "--quiet", type=float, default=1.0, help="seconds with no request arriving before it is drained (default 1)"
    )
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between two looks (default 0.1)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait at most when HELIX_HOOK_TIMEOUT is not set (default {DEFAULT_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port={args.port}: expected a port from 1 to 65535")
    if not 0 <= args.quiet <= 600:
        parser.error(f"--quiet={args.quiet:g}: expected 0 to 600 seconds")
    if not 0.01 <= args.interval <= 10:
        parser.error(f"--interval={args.interval:g}: expected 0.01 to 10 seconds")
    if not 0 < args.timeout <= 86400:
        parser.error(f"--timeout={args.timeout:g}: expected a number greater than 0, at most 86400")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    budget = give_up_after(hook_timeout(dict(os.environ), args.timeout))
    # Each look may take at most one interval (at least 0.5 s): a stopped app must not hold the
    # hook past its budget on one request.
    per_look = max(0.5, args.interval)
    status, line = drain(lambda: read_traffic(args.host, args.port, per_look), args.quiet, budget, args.interval)
    print(line, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
