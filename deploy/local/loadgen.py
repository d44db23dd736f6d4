"""The demo's load generator: replays a demand curve against the healthy instances in the table.

    python -m deploy.local.loadgen --duration 180 --peak-rps 45 [--curve nasa|spike | --trace FILE]
                                   [--stats FILE] [--concurrency 64] [--timeout 2] [--path /work]

Demand. A curve is a list of numbers, one per step (a step is any length: minutes for the NASA
day). It is stretched over `--duration` seconds and averaged over each second, then scaled so its
busiest second asks for `--peak-rps` requests per second. `nasa` (the default) is one day of the
NASA-HTTP 1995 trace, shipped beside this file; `spike` is a ramp and a short spike; `--trace FILE`
reads one number per line (`#` comments allowed) of your own.

Balancing. Each second the generator reads the shared table (HELIX_SHM_NAME, through the one
config loader) and sends to every instance whose row is HEALTHY, at the row's host and `app_port`,
as a load balancer would: each request goes to the instance with the fewest requests in flight
(round robin among ties). An instance that refuses a connection is left out for a few seconds and
the request is retried once elsewhere (nothing was sent, so that is safe). Requests are sent open
loop at the curve's rate; at most `--concurrency` are in flight, above that a request is shed and
counted as failed, as is one with no healthy instance, a timeout or a non-200 answer.

Output. One JSON line per second to `--stats` (default stdout): `t` (seconds since start),
`demand` (requests per second asked), `sent`, `served`, `failed`, `backends`, `latency_ms` (mean of
those served), finally one line with `"final": true` and the totals.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from shared.config import Invalid, load_or_exit, parse_host_port
from shared.table import MetricsTable, Snapshot, State, TableError

HERE = os.path.dirname(os.path.abspath(__file__))
NASA_TRACE = os.path.join(HERE, "nasa-1995-07-06.rpm")
BUILTIN_CURVES = ("nasa", "spike")


# ---------------------------------------------------------------------------------------------
# Demand curves


class CurveError(ValueError):
    """A curve that cannot be used; the message names the file, the line and what was expected."""


def read_curve(path: str) -> np.ndarray:
    """One non-negative number per line; blank lines and `#` comments are skipped."""
    values: list[float] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    value = float("nan")
                if not math.isfinite(value) or value < 0:
                    raise CurveError(f"{path}:{lineno}: {text!r}: expected one non-negative number per line")
                values.append(value)
    except OSError as exc:
        raise CurveError(f"{path}: cannot read the curve ({exc.strerror})") from None
    if not values or max(values) <= 0:
        raise CurveError(f"{path}: expected at least one positive number")
    return np.asarray(values, dtype=float)


def spike_curve() -> np.ndarray:
    """Quiet, a ramp to 60 %, a short spike to 100 %, back to quiet: 100 steps."""
    quiet, high = 0.2, 0.6
    return np.concatenate(
        [
            np.full(15, quiet),
            np.linspace(quiet, high, 20),
            np.full(15, high),
            np.full(15, 1.0),
            np.full(10, high),
            np.full(25, quiet),
        ]
    )


def builtin_curve(name: str) -> np.ndarray:
    if name == "nasa":
        return read_curve(NASA_TRACE)
    if name == "spike":
        return spike_curve()
    raise CurveError(f"curve {name!r}: expected one of {', '.join(BUILTIN_CURVES)}")


def per_second(curve: np.ndarray, duration: int, peak_rps: float) -> np.ndarray:
    """Stretch `curve` over `duration` seconds, average it over each second, and scale it so the
    busiest second is `peak_rps`. Averaging (not sampling) keeps a long trace's shape honest."""
    if duration < 1:
        raise CurveError(f"duration={duration}: expected at least 1 second")
    steps = len(curve)
    # Integral of the step function from 0 to x (in steps), evaluated at each second's edges.
    cum = np.concatenate([[0.0], np.cumsum(curve)])
    edges = np.linspace(0.0, steps, duration + 1)
    whole = np.floor(edges).astype(int).clip(0, steps - 1)
    integral = cum[whole] + (edges - whole) * curve[whole]
    integral[-1] = cum[-1]
    rates = np.diff(integral) / (steps / duration)
    top = rates.max()
    if top <= 0:
        raise CurveError("the curve is zero everywhere")
    return rates * (peak_rps / top)


# ---------------------------------------------------------------------------------------------
# Backends and balancing


@dataclass(frozen=True)
class Backend:
    instance_id: str
    host: str
    port: int


def healthy_backends(snapshot: Snapshot) -> list[Backend]:
    """Every HEALTHY row with a known app port, in table order."""
    out = []
    for row in snapshot.instances():
        if row.state != State.HEALTHY or not row.app_port:
            continue
        try:
            host, _ = parse_host_port(row.address)
        except Invalid:
            continue
        out.append(Backend(row.instance_id, host, row.app_port))
    return out


class Balancer:
    """Least outstanding requests, round robin among ties; passive ejection on refused connects."""

    def __init__(self, eject_seconds: float = 3.0, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._backends: list[Backend] = []
        self._outstanding: dict[Backend, int] = {}
        self._ejected_until: dict[Backend, float] = {}
        self._turn = itertools.count()
        self.eject_seconds = eject_seconds
        self._clock = clock

    def update(self, backends: Sequence[Backend]) -> None:
        with self._lock:
            self._backends = list(backends)
            for b in self._backends:
                self._outstanding.setdefault(b, 0)

    @property
    def backends(self) -> list[Backend]:
        with self._lock:
            return list(self._backends)

    def acquire(self, avoid: Backend | None = None) -> Backend | None:
        """The backend for the next request (its count is raised), or None if there is none."""
        with self._lock:
            now = self._clock()
            usable = [b for b in self._backends if b != avoid and self._ejected_until.get(b, 0.0) <= now]
            if not usable:
                return None
            low = min(self._outstanding[b] for b in usable)
            ties = [b for b in usable if self._outstanding[b] == low]
            chosen = ties[next(self._turn) % len(ties)]
            self._outstanding[chosen] += 1
            return chosen

    def release(self, backend: Backend, refused: bool = False) -> None:
        with self._lock:
            self._outstanding[backend] = max(0, self._outstanding.get(backend, 0) - 1)
            if refused:
                self._ejected_until[backend] = self._clock() + self.eject_seconds

    def outstanding(self, backend: Backend) -> int:
        with self._lock:
            return self._outstanding.get(backend, 0)


# ---------------------------------------------------------------------------------------------
# Sending


@dataclass
class Counters:
    sent: int = 0
    served: int = 0
    failed: int = 0
    latency_total: float = 0.0

    def take(self) -> Counters:
        """Copy and reset (the caller holds the lock)."""
        copy = Counters(self.sent, self.served, self.failed, self.latency_total)
        self.sent = self.served = self.failed = 0
        self.latency_total = 0.0
        return copy


class _Refused(Exception):
    """The connection was refused or could not be made: nothing was sent."""


def get(backend: Backend, path: str, timeout: float) -> int:
    """One GET on a fresh connection; the HTTP status. Raises _Refused if the connect failed."""
    conn = http.client.HTTPConnection(backend.host, backend.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except (TimeoutError, ConnectionRefusedError, OSError) as exc:
            raise _Refused(str(exc)) from exc
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@dataclass
class LoadGenerator:
    """Sends at a given rate and keeps per-second counters; `run` drives it from a rate schedule."""

    balancer: Balancer
    path: str = "/work"
    timeout: float = 2.0
    concurrency: int = 64
    counters: Counters = field(default_factory=Counters)
    totals: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="loadgen")

    def _count(self, outcome: str, latency: float = 0.0) -> None:
        with self._lock:
            for c in (self.counters, self.totals):
                if outcome == "sent":
                    c.sent += 1
                elif outcome == "served":
                    c.served += 1
                    c.latency_total += latency
                else:
                    c.failed += 1

    def submit(self) -> None:
        """Send one request now (asynchronously); shed it if `concurrency` are already in flight."""
        self._count("sent")
        with self._lock:
            if self._in_flight >= self.concurrency:
                shed = True
            else:
                shed = False
                self._in_flight += 1
        if shed:
            self._count("failed")
            return
        self._pool.submit(self._one)

    def _one(self) -> None:
        started = time.monotonic()
        ok = False
        try:
            tried: Backend | None = None
            for _ in range(2):  # a refused connect is retried once on another instance
                backend = self.balancer.acquire(avoid=tried)
                if backend is None:
                    break
                refused = False
                try:
                    ok = get(backend, self.path, self.timeout) == 200
                    break
                except _Refused:
                    refused = True
                except (OSError, http.client.HTTPException):
                    break
                finally:
                    self.balancer.release(backend, refused=refused)
                tried = backend
        finally:
            with self._lock:
                self._in_flight -= 1
            self._count("served" if ok else "failed", time.monotonic() - started)

    def take_second(self) -> Counters:
        with self._lock:
            return self.counters.take()

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def run(
        self,
        rates: np.ndarray,
        refresh: Callable[[], list[Backend]],
        emit: Callable[[dict], None],
        stop: threading.Event,
    ) -> Counters:
        """Second i sends rates[i] requests, evenly spaced; backends are refreshed every second."""
        start = time.monotonic()
        due = 0.0  # seconds after start at which the next request is due
        for second, rate in enumerate(rates):
            if stop.is_set():
                break
            try:
                self.balancer.update(refresh())
            except Exception as exc:  # noqa: BLE001 - keep sending to the last known instances
                print(f"loadgen: cannot read the table: {exc}", file=sys.stderr, flush=True)
            end = second + 1.0
            if rate > 0:
                due = max(due, float(second))
                while due < end and not stop.is_set():
                    wait = start + due - time.monotonic()
                    if wait > 0:
                        stop.wait(wait)
                    self.submit()
                    due += 1.0 / rate
            else:
                due = end
            wait = start + end - time.monotonic()
            if wait > 0:
                stop.wait(wait)
            c = self.take_second()
            emit(
                {
                    "t": second + 1,
                    "demand": round(float(rate), 3),
                    "sent": c.sent,
                    "served": c.served,
                    "failed": c.failed,
                    "backends": len(self.balancer.backends),
                    "latency_ms": round(1000 * c.latency_total / c.served, 2) if c.served else None,
                }
            )
        return self.totals


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.loadgen",
        description="Replay a demand curve against the healthy instances in the table.",
    )
    parser.add_argument("--duration", type=int, default=180, help="seconds to run; the curve is stretched over them")
    parser.add_argument(
        "--peak-rps", type=float, default=45.0, help="requests per second at the curve's busiest second"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--curve", choices=BUILTIN_CURVES, default="nasa", help="built-in curve (default nasa)")
    source.add_argument("--trace", metavar="FILE", help="your own curve: one non-negative number per line")
    parser.add_argument("--stats", metavar="FILE", help="append one JSON line per second here (default stdout)")
    parser.add_argument("--concurrency", type=int, default=64, help="most requests in flight (default 64)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per request (default 2)")
    parser.add_argument("--path", default="/work", help="request path (default /work)")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 86400:
        parser.error(f"--duration={args.duration}: expected 1 to 86400 seconds")
    if not 0 < args.peak_rps <= 10000:
        parser.error(f"--peak-rps={args.peak_rps:g}: expected a number greater than 0, at most 10000")
    if not 1 <= args.concurrency <= 1024:
        parser.error(f"--concurrency={args.concurrency}: expected 1 to 1024")
    if not 0 < args.timeout <= 60:
        parser.error(f"--timeout={args.timeout:g}: expected a number greater than 0, at most 60")
    return args


def load_rates(args: argparse.Namespace) -> np.ndarray:
    curve = read_curve(args.trace) if args.trace else builtin_curve(args.curve)
    return per_second(curve, args.duration, args.peak_rps)


class TableReader:
    """Attaches lazily (MonitorS may not have created the table yet) and keeps the handle."""

    def __init__(self, name: str):
        self.name = name
        self.table: MetricsTable | None = None

    def backends(self) -> list[Backend]:
        if self.table is None:
            try:
                self.table = MetricsTable.attach(self.name)
            except TableError:
                return []
        return healthy_backends(self.table.snapshot())

    def close(self) -> None:
        if self.table is not None:
            self.table.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_or_exit(prog="loadgen")
    try:
        rates = load_rates(args)
    except CurveError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    out: IO[str] = open(args.stats, "a", encoding="utf-8") if args.stats else sys.stdout

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reader = TableReader(cfg.shm_name)
    gen = LoadGenerator(Balancer(), path=args.path, timeout=args.timeout, concurrency=args.concurrency)
    try:
        gen.run(rates, reader.backends, emit, stop)
    finally:
        gen.close(wait=not stop.is_set())
        reader.close()
        t = gen.totals
        emit({"final": True, "sent": t.sent, "served": t.served, "failed": t.failed})
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
