"""`make bench BENCH_ARGS=drain`: what draining before terminate buys, on the local stack.

The stack is `make demo`'s, run as the demo itself (`python -m deploy.local.demo`: MonitorS and
ControllerASG as processes, local instances running the sample app with their agents, and the load
generator), twice: drain off (`--no-drain`: HELIX_DRAIN_TIMEOUT=0, terminate at once, as before
issue 11) and drain on (the demo's HELIX_DRAIN_TIMEOUT and its terminate hook,
deploy/local/drain_hook.py). The load rises to 3.5 instances' worth, then falls in steps (2.6,
1.7, 0.7), DRAIN_CYCLES times (default 2): the controller scales in three times a cycle.

Prints, for each mode: requests and failures by cause (deploy/local/loadgen.py's rules), the
failures caused by scale-in or replacement (`backend-terminated`), the instances terminated, the
requests in flight to each one when its terminate was decided and when it was carried out, the
requests that reached it after the decision (the load balancer reads the table once a second) and
how many of those failed (all from the load generator's request log), and the time added from the
decision to the terminate (p50 and max). The decision is the
controller's activity-log `terminate` or `replace` entry naming the instance and the terminate its
`drained` entry (with drain off, the decision's own entry: it terminates in the same step); where
the activity log lacks one, the table is used instead (the roster's drain request first seen, the
row gone; looked at every 50 ms) and the line says so.

The e2e test (tests/test_drain_e2e.py) runs the same stack through `run_demo` below.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deploy.local.demo import WORK_MS, tune
from deploy.local.loadgen import CAUSES, TERMINATED
from shared.table import Lifecycle, MetricsTable, State, TableError
from tests.procs import Proc, ProcessPool, base_env, wait_for

# One cycle, in instances' worth of demand per second: a ramp, a hold at peak (4 instances at the
# target), then three steps down, each long enough for the 5 s scale-in window and a drain.
RAMP = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
HOLD = 16
STEPS = [(2.6, 12), (1.7, 12), (0.7, 14)]
START_ALLOWANCE = 8  # seconds of the demo's duration before its load starts (first healthy instance)
WATCH_EVERY = 0.05


def cycle_curve(cycles: int = 1, hold: int = HOLD) -> list[float]:
    one = RAMP + [RAMP[-1]] * hold
    for level, seconds in STEPS:
        one += [level] * seconds
    return one * cycles


def per_instance_rps() -> float:
    """Requests per second one instance serves at the demo's CPU target."""
    t = tune(60, WORK_MS, None)
    return t.cpu_target * float(t.vcpus) / (WORK_MS / 1000.0)


# ---------------------------------------------------------------------------------------------
# Watching the table


@dataclass
class Watched:
    """What the table showed of one instance (wall clock; 0: never seen)."""

    drain_asked: float = 0.0  # first look with a drain deadline on the roster
    deadline: float = 0.0
    draining: float = 0.0  # its row's DRAINING began (the row's own time)
    drained: float = 0.0  # its row's DRAINED began
    in_service: float = 0.0  # first look with its row HEALTHY and IN_SERVICE
    row_gone: float = 0.0  # first look without its row, after one with it


class TableWatch:
    """Looks at a table every WATCH_EVERY seconds from a thread of its own: drains, lifecycles,
    rows leaving. The demo's view is a second apart, too coarse for a hook that takes one."""

    def __init__(self, shm_name: str):
        self.shm_name = shm_name
        self.seen: dict[str, Watched] = {}
        self.serving: list[str] = []  # HEALTHY and IN_SERVICE at the last look
        self.looks = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drain-table-watch", daemon=True)

    def start(self) -> TableWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def get(self) -> dict[str, Watched]:
        with self._lock:
            return dict(self.seen)

    def _run(self) -> None:
        table: MetricsTable | None = None
        try:
            while not self._stop.is_set():
                if table is None:
                    with contextlib.suppress(TableError):
                        table = MetricsTable.attach(self.shm_name)
                if table is not None:
                    with contextlib.suppress(TableError, OSError, ValueError):
                        self._look(table, time.time())
                self._stop.wait(WATCH_EVERY)
        finally:
            if table is not None:
                table.close()

    def _look(self, table: MetricsTable, now: float) -> None:
        rows = {r.instance_id: r for r in table.snapshot().instances()}
        roster = table.roster()
        with self._lock:
            self.looks += 1
            for iid, entry in roster.entries.items():
                if entry.drain_deadline > 0:
                    w = self.seen.setdefault(iid, Watched())
                    if not w.drain_asked:
                        w.drain_asked, w.deadline = now, entry.drain_deadline
            for iid, row in rows.items():
                w = self.seen.setdefault(iid, Watched())
                w.row_gone = 0.0
                if row.lifecycle == Lifecycle.DRAINING and not w.draining:
                    w.draining = row.lifecycle_at or now
                if row.lifecycle == Lifecycle.DRAINED and not w.drained:
                    w.drained = row.lifecycle_at or now
                if row.lifecycle == Lifecycle.IN_SERVICE and row.state == State.HEALTHY and not w.in_service:
                    w.in_service = now
            for iid, w in self.seen.items():
                if iid not in rows and not w.row_gone and (w.in_service or w.draining or w.drained):
                    w.row_gone = now
            self.serving = [
                i for i, r in rows.items() if r.lifecycle == Lifecycle.IN_SERVICE and r.state == State.HEALTHY
            ]


# ---------------------------------------------------------------------------------------------
# One run of the demo


@dataclass
class Termination:
    instance_id: str
    kind: str  # the activity's action: terminate (scale-in) or replace
    reason: str
    decided_at: float
    terminated_at: float  # 0: not seen terminated
    source: str  # where the two times come from
    in_flight: int  # requests in flight to it when the terminate was decided
    in_flight_at_terminate: int  # ... when it was terminated
    sent_after: int  # requests that reached it after the decision (the balancer's lag)
    failed_after: int  # ... and failed
    drained_through: bool  # the table showed it DRAINING or DRAINED before it went


@dataclass
class DemoRun:
    drain: bool
    summary: dict
    output: str
    logs_dir: str
    activity: list[dict]
    requests: list[dict]
    watched: dict[str, Watched]
    extra: dict = field(default_factory=dict)  # what `during` noted

    @property
    def causes(self) -> dict[str, int]:
        return dict(self.summary.get("failed_by_cause") or {})

    def terminations(self) -> list[Termination]:
        """Every instance the controller decided to terminate, in decision order."""
        decided: dict[str, dict] = {}
        drained: dict[str, dict] = {}
        for entry in self.activity:
            for iid in entry.get("instance_ids") or ():
                if entry["action"] in ("terminate", "replace"):
                    decided.setdefault(iid, entry)
                elif entry["action"] == "drained":
                    drained.setdefault(iid, entry)
        # The table, for any the activity log does not name (it always should).
        for iid, w in self.watched.items():
            if iid not in decided and w.drain_asked:
                decided[iid] = {"time": w.drain_asked, "action": "terminate", "reason": "", "table": True}
        out = []
        for iid, entry in sorted(decided.items(), key=lambda kv: kv[1]["time"]):
            w = self.watched.get(iid, Watched())
            at = float(entry["time"])
            source = "table: drain request first seen" if entry.get("table") else "activity log"
            if iid in drained:
                end = float(drained[iid]["time"])
            elif not self.drain:
                end = at  # terminated in the step that decided it
            elif w.row_gone:
                end, source = w.row_gone, source + ", terminate from the table: row gone"
            else:
                end = 0.0
            mine = [r for r in self.requests if r["instance"] == iid]
            after = [r for r in mine if r["start"] >= at]
            out.append(
                Termination(
                    iid,
                    str(entry["action"]),
                    str(entry.get("reason", "")),
                    at,
                    end,
                    source,
                    sum(1 for r in mine if r["start"] <= at < r["end"]),
                    sum(1 for r in mine if r["start"] <= end < r["end"]) if end else 0,
                    len(after),
                    sum(1 for r in after if r["outcome"] != "served"),
                    bool(w.draining or w.drained),
                )
            )
        return out


_RUN_LINE = re.compile(r"run (\w+): segment /dev/shm/(\S+), state (\S+)")


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def run_demo(
    pool: ProcessPool,
    workdir: str,
    curve: list[float],
    drain: bool,
    during: Callable[[Proc, str, TableWatch, dict], None] | None = None,
    timeout: float = 300.0,
    settings: dict[str, str] | None = None,
) -> DemoRun:
    """`python -m deploy.local.demo` over `curve` (instances' worth per second), watched. `during`
    gets the demo's process, its state dir, the watch and a dict to note things in, while it runs.
    `settings`: HELIX_ settings for the demo's environment (they reach MonitorS and the controller)."""
    os.makedirs(workdir, exist_ok=True)
    trace = os.path.join(workdir, "curve.txt")
    with open(trace, "w", encoding="utf-8") as fh:
        fh.write("# demand in instances' worth, one line per second\n" + "\n".join(f"{x:g}" for x in curve) + "\n")
    out_dir = os.path.join(workdir, "out")
    summary_path = os.path.join(workdir, "summary.json")
    argv = [
        "-m",
        "deploy.local.demo",
        "--duration",
        str(len(curve) + START_ALLOWANCE),
        "--trace",
        trace,
        "--peak-rps",
        f"{max(curve) * per_instance_rps():.2f}",
        "--plain",
        "--out",
        out_dir,
        "--summary-json",
        summary_path,
        "--request-log",
    ]
    if not drain:
        argv.append("--no-drain")
    proc = pool.python("demo-drain-" + ("on" if drain else "off"), argv, base_env(**(settings or {})))
    m = wait_for(lambda: _RUN_LINE.search(proc.output()) or proc.popen.poll() is not None, 60, "the demo's run line")
    if not isinstance(m, re.Match):
        raise AssertionError(f"the demo exited before it started:\n{proc.output()[-3000:]}")
    watch = TableWatch(m.group(2)).start()
    extra: dict = {}
    try:
        if during is not None:
            during(proc, os.path.join(m.group(3), "state"), watch, extra)
        status = proc.wait(timeout=timeout)
    finally:
        watch.stop()
    output = proc.output()
    if status != 0:
        raise AssertionError(f"the demo exited with status {status}:\n{output[-5000:]}")
    with open(summary_path, encoding="utf-8") as fh:
        summary = json.load(fh)
    logs = sorted(glob.glob(os.path.join(out_dir, "helix-demo-*-logs")))
    logs_dir = logs[-1] if logs else ""
    return DemoRun(
        drain,
        summary,
        output,
        logs_dir,
        _read_jsonl(os.path.join(logs_dir, "activity.jsonl")),
        _read_jsonl(os.path.join(logs_dir, "requests.jsonl")),
        watch.get(),
        extra,
    )


# ---------------------------------------------------------------------------------------------
# The bench


def _fmt_seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f} s"


def report(runs: list[DemoRun]) -> list[str]:
    """The comparison, one row per figure, one column per run."""
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values: list[str]) -> None:
        rows.append((label, values))

    terms = [r.terminations() for r in runs]
    add("", ["drain off" if not r.drain else "drain on" for r in runs])
    add("requests", [str(r.summary["served"] + r.summary["failed"]) for r in runs])
    add(
        "failed",
        [f"{r.summary['failed']} ({100 * r.summary.get('failed_fraction', 0.0):.2f} %)" for r in runs],
    )
    for cause in CAUSES:
        add(f"  {cause}", [str(r.causes.get(cause, 0)) for r in runs])
    if any(r.causes.get("unknown") for r in runs):
        add("  unknown", [str(r.causes.get("unknown", 0)) for r in runs])
    add("failed by scale-in or replacement", [str(r.causes.get(TERMINATED, 0)) for r in runs])
    add(
        "terminated (scale-in / replacement)",
        [f"{sum(t.kind == 'terminate' for t in ts)} / {sum(t.kind == 'replace' for t in ts)}" for ts in terms],
    )
    add("in flight at each decision", [" ".join(str(t.in_flight) for t in ts) or "-" for ts in terms])
    add(
        "in flight at decision: mean / max",
        [
            f"{statistics.fmean(t.in_flight for t in ts):.1f} / {max(t.in_flight for t in ts)}" if ts else "-"
            for ts in terms
        ],
    )
    add("in flight at each terminate", [" ".join(str(t.in_flight_at_terminate) for t in ts) or "-" for ts in terms])
    add(
        "sent to it after the decision (failed)",
        [f"{sum(t.sent_after for t in ts)} ({sum(t.failed_after for t in ts)})" for ts in terms],
    )
    add(
        "decision to terminate: p50 / max",
        [_fmt_seconds([t.terminated_at - t.decided_at for t in ts if t.terminated_at]) for ts in terms],
    )
    add("drained through the hook", [f"{sum(t.drained_through for t in ts)} of {len(ts)}" for ts in terms])
    add("times from", [", ".join(sorted({t.source for t in ts})) or "-" for ts in terms])
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(v[i]) for _, v in rows) + 3 for i in range(len(runs))]
    return [
        label.ljust(width) + "".join(v.ljust(c) for v, c in zip(values, cols, strict=True)) for label, values in rows
    ]


def main() -> None:
    cycles = int(os.environ.get("DRAIN_CYCLES", "2"))
    curve = cycle_curve(cycles)
    rps = per_instance_rps()
    levels = " -> ".join(f"{x:g}" for x in [RAMP[-1]] + [lvl for lvl, _ in STEPS])
    print(
        f"local stack (make demo's), {cycles} cycle(s) of load {levels} instances' worth "
        f"({rps:g} req/s each), {len(curve)} s of load per run",
        flush=True,
    )
    tmp = tempfile.mkdtemp(prefix="helix-bench-drain-")
    runs: list[DemoRun] = []
    for drain in (False, True):
        mode = "on" if drain else "off"
        os.makedirs(os.path.join(tmp, f"logs-{mode}"))
        pool = ProcessPool(log_dir=os.path.join(tmp, f"logs-{mode}"))
        started = time.monotonic()
        try:
            runs.append(run_demo(pool, os.path.join(tmp, mode), curve, drain))
        except BaseException:
            print(f"drain {mode}: the run failed; its logs are kept in {tmp}", flush=True)
            raise
        finally:
            pool.stop_all()
        print(
            f"drain {mode}: {time.monotonic() - started:.0f} s, {len(runs[-1].terminations())} terminated", flush=True
        )
    for line in report(runs):
        print(line, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)  # the demos' logs and plots: the figures above are the result
