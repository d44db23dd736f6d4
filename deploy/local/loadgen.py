"""The demo's load generator: replays a demand curve against the healthy instances in the table.

    python -m deploy.local.loadgen --duration 180 --peak-rps 45 [--curve nasa|spike | --trace FILE]
                                   [--stats FILE] [--requests FILE] [--concurrency 64] [--timeout 2]
                                   [--path /work]

Demand. A curve is a list of numbers, one per step (a step is any length: minutes for the NASA
day). It is stretched over `--duration` seconds and averaged over each second, then scaled so its
busiest second asks for `--peak-rps` requests per second. `nasa` (the default) is one day of the
NASA-HTTP 1995 trace, shipped beside this file; `spike` is a ramp and a short spike; `--trace FILE`
reads one number per line (`#` comments allowed) of your own.

Balancing. Each second the generator reads the shared table (HELIX_SHM_NAME, through the one
config loader) and sends to every instance in service, at the row's host and `app_port`, as a load
balancer would: a row that is HEALTHY and IN_SERVICE (past its launch hook, not draining) and,
once the controller publishes a roster, on it and not asked to drain (the roster is re-read only
when republished). Each request goes to the instance with the fewest requests in flight (round
robin among ties). Requests already sent to an instance that starts draining run to completion;
none are sent to it after the look that shows the drain. An instance that refuses a connection is
left out for a few seconds and the request is retried once elsewhere (nothing was sent, so that is
safe). Requests are sent open loop at the curve's rate; at most `--concurrency` are in flight.

Failures. Every failed request is counted under exactly one cause: `no-healthy-backend` (nothing
to route to), `backend-died` (refused or broken off by a backend in service, not draining, not
terminated), `backend-terminated` (by a backend that was draining or asked to drain, or had left
the table, when it failed), `timeout` (no answer within `--timeout`), `http-error` (an answer
other than 200), `shed` (over `--concurrency`, never sent). Telling a terminated backend from one
that died takes the table's next few looks (`Attribution`), so a cause may be counted a second or
two after its failure.

Output. One JSON line per second to `--stats` (default stdout): `t` (seconds since start),
`demand` (requests per second asked), `sent`, `served`, `failed` (requests that ended in that
second), `causes` (failures whose cause became known in that second, by cause), `backends`,
`latency_ms` (mean of those served), finally one line with `"final": true` and the totals, where
`causes` adds up to `failed`. `--requests FILE` appends one line per request: `start`, `end`
(wall clock), `instance` (of its last attempt, "" if none) and `outcome` ("served" or the cause).
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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from shared.config import Invalid, load_or_exit, parse_host_port
from shared.table import InstanceRow, Lifecycle, MetricsTable, Roster, Snapshot, State, TableError

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
# Backends: whom the table says to send to


@dataclass(frozen=True)
class Backend:
    instance_id: str
    host: str
    port: int


@dataclass(frozen=True)
class TableView:
    """One look at the table: whom to send to, and what failure attribution needs to know."""

    at: float  # wall clock of the look
    backends: tuple[Backend, ...] = ()  # routable, in table order
    rows: Mapping[str, InstanceRow] = field(default_factory=dict)  # every row, by instance id
    drains: Mapping[str, float] = field(default_factory=dict)  # asked to drain: id -> drain deadline
    roster: frozenset[str] | None = None  # ids on the roster; None: no controller ever published one


def table_view(snapshot: Snapshot, roster: Roster | None, at: float) -> TableView:
    """Route to a row only when it is HEALTHY, IN_SERVICE (past its launch hook, not draining) and
    has an app port; with a roster, only when it is on it and not asked to drain. The roster says
    "drain" before MonitorS has asked the agent, so it is what stops new requests first. Without a
    roster (no controller: a test table, HELIX_ROSTER=off) the rows alone decide."""
    rows = {r.instance_id: r for r in snapshot.instances()}
    published = roster is not None and roster.published_at > 0
    entries = roster.entries if roster is not None and published else {}
    drains = {i: e.drain_deadline for i, e in entries.items() if e.drain_deadline > 0}
    on_roster = frozenset(entries) if published else None
    backends = []
    for row in rows.values():
        if row.state != State.HEALTHY or row.lifecycle != Lifecycle.IN_SERVICE or not row.app_port:
            continue
        if on_roster is not None and (row.instance_id not in on_roster or row.instance_id in drains):
            continue
        try:
            host, _ = parse_host_port(row.address)
        except Invalid:
            continue
        backends.append(Backend(row.instance_id, host, row.app_port))
    return TableView(at, tuple(backends), rows, drains, on_roster)


# ---------------------------------------------------------------------------------------------
# Failure causes


NO_BACKEND = "no-healthy-backend"  # nothing to route to (none in service, or every one refused)
DIED = "backend-died"  # refused or broken by a backend in service, not draining, not terminated
TERMINATED = "backend-terminated"  # refused or broken by a backend draining, asked to drain, or gone
TIMEOUT = "timeout"  # no answer within --timeout
HTTP_ERROR = "http-error"  # an answer other than 200
SHED = "shed"  # --concurrency requests already in flight: dropped here, never sent
CAUSES = (NO_BACKEND, DIED, TERMINATED, TIMEOUT, HTTP_ERROR, SHED)
# How long a broken request waits for the table to say whether its backend was being terminated:
# a terminated instance's agent deregisters at once (its row goes within a look or two), a crashed
# app's agent stays and reports the app down within a poll or two.
SETTLE_SECONDS = 3.0


@dataclass
class _Pending:
    instance_id: str
    at: float  # wall clock of the failure
    record: dict


class Attribution:
    """Names the cause of a request a backend refused or broke off, from what the table said about
    that backend around then. In order:

    1. its drain began at or before the failure (the roster's drain deadline less
       HELIX_DRAIN_TIMEOUT, the row's DRAINING time, or the look that first showed either):
       backend-terminated;
    2. the last look at its row showed the app down under a live agent (a crash, or a killed app,
       which the controller then replaces): backend-died;
    3. its row left the table, or it left the roster (its agent deregistered: the instance was
       terminated): backend-terminated;
    4. none of that within SETTLE_SECONDS: backend-died (registered, app up, not draining: it
       dropped the request by itself).

    Until one applies the failure is pending; `observe` resolves what each look settles."""

    def __init__(self, drain_timeout: float, settle: float = SETTLE_SECONDS):
        self.drain_timeout = drain_timeout
        self.settle = settle
        self._lock = threading.Lock()
        self._drain_from: dict[str, float] = {}
        self._app_down: dict[str, bool] = {}  # at the last look that showed its row
        self._gone_at: dict[str, float] = {}
        self._known: set[str] = set()
        self._pending: list[_Pending] = []

    def observe(self, view: TableView) -> list[tuple[dict, str]]:
        """Learn from one look; the pending failures it settles, with their causes."""
        with self._lock:
            for iid, row in view.rows.items():
                self._known.add(iid)
                if view.roster is None or iid in view.roster:
                    self._gone_at.pop(iid, None)  # back (a MonitorS that lost its table): not gone
                self._app_down[iid] = row.state == State.APP_DOWN
                if row.lifecycle in (Lifecycle.DRAINING, Lifecycle.DRAINED) and row.lifecycle_at > 0:
                    self._drain_began(iid, row.lifecycle_at)
            for iid, deadline in view.drains.items():
                began = deadline - self.drain_timeout if self.drain_timeout > 0 else view.at
                self._drain_began(iid, min(began, view.at))
            for iid in self._known:
                if iid not in view.rows or (view.roster is not None and iid not in view.roster):
                    self._gone_at.setdefault(iid, view.at)
            return self._resolve(view.at, final=False)

    def broken(self, instance_id: str, at: float, record: dict) -> str | None:
        """A request `instance_id` refused or broke off at `at`: its cause, or None while pending."""
        with self._lock:
            pending = _Pending(instance_id, at, record)
            cause = self._decide(pending, at, final=False)
            if cause is None:
                self._pending.append(pending)
            return cause

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> list[tuple[dict, str]]:
        """The end of the run: settle every pending failure on what is known now."""
        with self._lock:
            return self._resolve(0.0, final=True)

    def _drain_began(self, instance_id: str, at: float) -> None:
        self._drain_from[instance_id] = min(at, self._drain_from.get(instance_id, at))

    def _decide(self, p: _Pending, now: float, final: bool) -> str | None:
        began = self._drain_from.get(p.instance_id)
        if began is not None and began <= p.at:
            return TERMINATED
        if self._app_down.get(p.instance_id):
            return DIED
        if p.instance_id in self._gone_at:
            return TERMINATED
        if final or now - p.at >= self.settle:
            return DIED
        return None

    def _resolve(self, now: float, final: bool) -> list[tuple[dict, str]]:
        done, still = [], []
        for p in self._pending:
            cause = self._decide(p, now, final)
            if cause is None:
                still.append(p)
            else:
                done.append((p.record, cause))
        self._pending = still
        return done


# ---------------------------------------------------------------------------------------------
# Balancing


class Balancer:
    """Least outstanding requests, round robin among ties; passive ejection on refused connects.
    `update` changes only where new requests go: those already sent to a backend that left the
    list (draining, say) run to completion and are released as usual."""

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
    causes: Counter[str] = field(default_factory=Counter)  # failures whose cause is known

    def take(self) -> Counters:
        """Copy and reset (the caller holds the lock)."""
        copy = Counters(self.sent, self.served, self.failed, self.latency_total, Counter(self.causes))
        self.sent = self.served = self.failed = 0
        self.latency_total = 0.0
        self.causes.clear()
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


_BROKEN = "broken"  # refused or broken off by a backend: Attribution names the cause


@dataclass
class LoadGenerator:
    """Sends at a given rate and keeps per-second counters; `run` drives it from a rate schedule.
    Every failed request gets one cause (CAUSES); `request_log`, when set, gets one record per
    request once its outcome is known: start and end (wall clock), the instance of its last
    attempt ("" if none), and "served" or the cause."""

    balancer: Balancer
    path: str = "/work"
    timeout: float = 2.0
    concurrency: int = 64
    attribution: Attribution = field(default_factory=lambda: Attribution(drain_timeout=0.0))
    request_log: Callable[[dict], None] | None = None
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

    def _settled(self, record: dict, outcome: str) -> None:
        """A request's outcome is known: count its cause (if it failed) and log it."""
        if outcome != "served":
            with self._lock:
                for c in (self.counters, self.totals):
                    c.causes[outcome] += 1
        if self.request_log is not None:
            self.request_log(record | {"outcome": outcome})

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
            now = time.time()
            self._settled({"start": now, "end": now, "instance": ""}, SHED)
            return
        self._pool.submit(self._one)

    def _one(self) -> None:
        started = time.monotonic()
        started_wall = time.time()
        outcome = NO_BACKEND
        last: Backend | None = None
        try:
            tried: Backend | None = None
            for _ in range(2):  # a refused connect is retried once on another instance
                backend = self.balancer.acquire(avoid=tried)
                if backend is None:
                    break  # NO_BACKEND, or the refusal of the one tried, which `last` names
                last = backend
                refused = False
                try:
                    outcome = "served" if get(backend, self.path, self.timeout) == 200 else HTTP_ERROR
                    break
                except _Refused:
                    refused = True
                    outcome = _BROKEN
                except TimeoutError:
                    outcome = TIMEOUT
                    break
                except (OSError, http.client.HTTPException):  # reset, or closed before the answer
                    outcome = _BROKEN
                    break
                finally:
                    self.balancer.release(backend, refused=refused)
                tried = backend
        finally:
            with self._lock:
                self._in_flight -= 1
            self._count("served" if outcome == "served" else "failed", time.monotonic() - started)
        ended = time.time()
        record = {"start": started_wall, "end": ended, "instance": last.instance_id if last else ""}
        if outcome == _BROKEN:
            assert last is not None
            cause = self.attribution.broken(last.instance_id, ended, record)
            if cause is None:
                return  # settled by a later look at the table
            outcome = cause
        self._settled(record, outcome)

    def look(self, refresh: Callable[[], TableView]) -> None:
        """Read the table: route by it, and settle the failures it explains."""
        try:
            view = refresh()
        except Exception as exc:  # noqa: BLE001 - keep sending to the last known instances
            print(f"loadgen: cannot read the table: {exc}", file=sys.stderr, flush=True)
            return
        self.balancer.update(view.backends)
        for record, cause in self.attribution.observe(view):
            self._settled(record, cause)

    def settle(self, refresh: Callable[[], TableView], stop: threading.Event, wait: float = SETTLE_SECONDS) -> None:
        """At the end: give pending failures up to `wait` seconds of looks, then settle the rest."""
        deadline = time.monotonic() + wait
        while self.attribution.pending() and time.monotonic() < deadline and not stop.is_set():
            stop.wait(0.5)
            self.look(refresh)
        for record, cause in self.attribution.flush():
            self._settled(record, cause)

    def take_second(self) -> Counters:
        with self._lock:
            return self.counters.take()

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def run(
        self,
        rates: np.ndarray,
        refresh: Callable[[], TableView],
        emit: Callable[[dict], None],
        stop: threading.Event,
    ) -> Counters:
        """Second i sends rates[i] requests, evenly spaced; the table is read every second."""
        start = time.monotonic()
        due = 0.0  # seconds after start at which the next request is due
        for second, rate in enumerate(rates):
            if stop.is_set():
                break
            self.look(refresh)
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
                    "causes": dict(c.causes),
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
    parser.add_argument(
        "--requests", metavar="FILE", help="append one JSON line per request here (start, end, instance, outcome)"
    )
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
    """Attaches lazily (MonitorS may not have created the table yet) and keeps the handle. The
    roster is read again only when the controller has published a new one."""

    def __init__(self, name: str):
        self.name = name
        self.table: MetricsTable | None = None
        self._roster: Roster | None = None
        self._roster_at = 0.0

    def look(self) -> TableView:
        now = time.time()
        if self.table is None:
            try:
                self.table = MetricsTable.attach(self.name)
            except TableError:
                return TableView(now)
        snapshot = self.table.snapshot()
        published = self.table.roster_published_at()
        if published != self._roster_at:
            self._roster = self.table.roster()
            self._roster_at = published
        return table_view(snapshot, self._roster, now)

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
    requests: IO[str] | None = open(args.requests, "a", encoding="utf-8") if args.requests else None
    log_lock = threading.Lock()

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    def log_request(record: dict) -> None:
        assert requests is not None
        line = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}) + "\n"
        with log_lock:  # worker threads and the look at the table both settle requests
            requests.write(line)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reader = TableReader(cfg.shm_name)
    gen = LoadGenerator(
        Balancer(),
        path=args.path,
        timeout=args.timeout,
        concurrency=args.concurrency,
        attribution=Attribution(cfg.drain_timeout),
        request_log=log_request if requests is not None else None,
    )
    try:
        gen.run(rates, reader.look, emit, stop)
    finally:
        gen.close(wait=not stop.is_set())
        gen.settle(reader.look, stop)
        reader.close()
        t = gen.totals
        emit({"final": True, "sent": t.sent, "served": t.served, "failed": t.failed, "causes": dict(t.causes)})
        if out is not sys.stdout:
            out.close()
        if requests is not None:
            requests.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
