"""`make chaos`: the local Helix stack under a seeded random schedule of faults, checked against
its invariants.

    python -m deploy.local.chaos [--duration SECONDS] [--seed N] [--out DIR] [--summary-json FILE]

`--duration` defaults to $CHAOS_DURATION, else 600 seconds of faults; `--seed` to $CHAOS_SEED, else
a random seed, printed at start: the same seed replays the same schedule of faults (their timing
is the machine's).

The stack is `make demo`'s (deploy/local/demo.py builds it): MonitorS and ControllerASG as two
processes started as the systemd units start them (an environment file, a token file, this run's
own segment, state dir, group and port), the `local` provider running deploy/local/sample_app.py
with its agent on every instance, and the load generator spreading a demand curve of 2 to 4
instances' worth over the HEALTHY rows. The settings are small so things happen fast: min 2, max
4 (so the fleet is often at max), a poll and a decision every second, 15 s of health grace, a 10 s scale-in window (any of them
set in your environment wins). Once `min` instances are healthy, every 2 to 6 s it injects one
fault, drawn from a deck shuffled with the seed (every kind once per round):

  monitor-kill           SIGKILL MonitorS; restarted after 0.5-3 s or 7-14 s, as systemd would
  monitor-stop           SIGSTOP MonitorS; SIGCONT after a pause of the same kind
  controller-kill        SIGKILL ControllerASG; restarted after 0.5-4 s
  controller-stop        SIGSTOP ControllerASG; SIGCONT after 0.5-8 s
  controller-kill-at-launch
                         SIGKILL ControllerASG as it launches: 0-25 ms after it logs `launching N`
                         or `replacing`, or the provider's `launched <id>`, or 0-10 ms after the
                         provider writes a new (pid-less) instance record, just before it starts
                         the processes: mid-spawn; restarted after 0.5-4 s
  agent-kill, agent-stop, app-kill, app-stop
                         the same to the agent or the app of one instance, found through the
                         provider's records (HELIX_STATE_DIR/instances/*.json); SIGCONT after 0.5-8 s

Meanwhile it looks at every process of the run every 0.1 s (/proc/*/environ: the agent carries
HELIX_INSTANCE_ID; the app, started without the agent's HELIX_ keys, is attributed through its
process group) and at the table every second, and at the end prints one verdict per invariant:

  1 max-instances      instances with at least one live process (a stopped or terminating one
                       counts) never exceed HELIX_MAX_INSTANCES
  2 untracked          every running instance process belongs to a recorded instance (a record
                       whose pgid is its process group), allowing 2 s for a record being written
                       (a SIGSTOPped controller's pause is not held against it)
  3 registry-survives  after each MonitorS restart, the first table it writes still holds every row
                       of the previous one (the segment is re-attached, not replaced)
  4 frozen-while-down  while MonitorS has been down (SIGKILL or SIGSTOP) longer than 3 poll
                       intervals + the control interval + 2 s, the controller's header says frozen,
                       or the controller is itself down (dead, stopped, or not deciding)
  5 launch-tokens      no instance id in two launch ledgers; no token with more instances seen
                       running, or more ids in its ledger, than the count it was launched for (from
                       the controller's log); nothing running that no ledger lists
  6 nothing-left       after the cleanup (the demo's: controller first, then the load, the instances,
                       MonitorS, then a sweep of everything carrying the run's marker): no process,
                       no segment or lock file, no run directory

It exits 0 when every verdict passes, 1 otherwise (or when it could not run), 2 for a bad setting.
Ctrl-C (or SIGTERM) ends the run early: it cleans up and gives the verdicts of what it saw. The
run's logs and its fault timeline (faults.jsonl) are kept in `--out` (default demo-out/). A run
killed outright is cleaned up by the demo's watchdog, or by the next chaos run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import heapq
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from rich.console import Console

from deploy.local import cleanup, demo
from deploy.local.cleanup import MARKER_KEY
from deploy.local.demo import WORK_MS, Demo, DemoError, Tuning, _tail, tune
from shared.config import Config, ConfigError, load_config
from shared.table import MetricsTable, Snapshot, State, TableError, lock_path

DEFAULT_DURATION = 600
# Its own root, so `make demo` and its tests never see (or clean) a chaos run, and vice versa.
RUNS_ROOT = os.path.join(tempfile.gettempdir(), "helix-chaos-runs")
STARTUP_TIMEOUT = 120.0  # a loaded 2-core CI machine
SCAN_EVERY = 0.1  # processes: a max+1 may last only as long as a SIGTERM takes (a scan costs ~1 ms)
SAMPLE_EVERY = 1.0  # the table
PROGRESS_EVERY = 10.0
RECORD_GRACE = 2.0  # invariant 2: a record being written
FREEZE_MARGIN = 2.0  # invariant 4: 3 poll intervals + the control interval + this
LOW_LOAD, HIGH_LOAD = 2.0, 4.0  # instances' worth of demand

KINDS = (
    "monitor-kill",
    "monitor-stop",
    "controller-kill",
    "controller-stop",
    "controller-kill-at-launch",
    "agent-kill",
    "agent-stop",
    "app-kill",
    "app-stop",
)

# `2025-01-02T03:04:05.678 INFO controller_asg[123] launching 1: ...` (shared/logs.py)
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) (\w+) ([\w.]+)\[(\d+)\] (.*)$")
# What the controller logs as it launches: the activity line (`launching N: ...`, `replacing 1 (id):
# ...`), then the provider's line per instance (`launched <id> in <zone> (agent ..., launch <token>)`).
TRIGGERS = {
    "launching": re.compile(r"^(launching|replacing) \d+"),
    "launched": re.compile(r"^launched \S+ in \S+ \(agent "),
}


class ChaosError(Exception):
    """The run cannot go on; one line saying why."""


def log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").timestamp()


# ---------------------------------------------------------------------------------------------
# Settings and load


def chaos_tuning(duration: int, work_ms: float) -> Tuning:
    """The demo's tuning (sizing, poll and decision every second, warm-up), made small and fast."""
    t = tune(max(duration, 20), work_ms, None)
    t.tuned.update(
        {
            "HELIX_MIN_INSTANCES": "2",
            # Demand of 2 to 4 instances' worth keeps the fleet at max often: where max+1 happens.
            "HELIX_MAX_INSTANCES": "4",
            "HELIX_HEALTH_GRACE": "15",
            "HELIX_SCALE_IN_WINDOW": "10",
            # Rows of killed agents are freed after a minute, not ten: the table stays readable.
            "HELIX_FORGET_AFTER": "60",
        }
    )
    return t


def load_curve(rng: random.Random, seconds: int) -> list[float]:
    """Demand in instances' worth, one value per second: a slow wave between LOW and HIGH with jitter."""
    period = rng.uniform(60.0, 150.0)
    phase = rng.uniform(0.0, 2 * math.pi)
    mid, amp = (LOW_LOAD + HIGH_LOAD) / 2, (HIGH_LOAD - LOW_LOAD) / 2
    out = []
    for s in range(seconds):
        v = mid + 0.85 * amp * math.sin(2 * math.pi * s / period + phase) + rng.gauss(0.0, 0.12)
        out.append(round(min(HIGH_LOAD, max(LOW_LOAD, v)), 3))
    return out


# ---------------------------------------------------------------------------------------------
# What runs: processes, records, ledgers


@dataclass(frozen=True)
class InstProc:
    """A live process of an instance of this run."""

    pid: int
    pgid: int
    instance_id: str  # from its HELIX_INSTANCE_ID (agent); "" for an app (no HELIX_ keys)
    stopped: bool


def _stat_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return data[data.rfind(b")") + 2 :][:1].decode()
    except OSError:
        return "X"


def scan_instance_processes(marker: bytes, id_prefix: bytes, exclude: set[int]) -> list[InstProc]:
    """Every live, non-zombie process of this run's instances: processes that carry the run's marker
    (inherited by everything the run starts) or one of its instance ids, and are not MonitorS, the
    controller, the load or anything they fork (those carry HELIX_SHM_NAME; an agent or an app never
    does: the local provider gives them only the agent's own keys)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        iid = b""
        ours = infra = False
        for var in env:
            if var == marker:
                ours = True
            elif var.startswith(b"HELIX_INSTANCE_ID="):
                iid = var[18:]
            elif var.startswith(b"HELIX_SHM_NAME="):
                infra = True
        if iid and not iid.startswith(id_prefix):
            continue  # another group's instance (a test or demo that shares our environment)
        if infra or not (ours or iid):
            continue
        state = _stat_state(pid)
        if state in ("Z", "X", "x"):
            continue
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        out.append(InstProc(pid, pgid, iid.decode(errors="replace"), state in ("T", "t")))
    return out


def read_json_dir(folder: str) -> dict[str, dict]:
    """`<name>.json` files of a folder, by name; unreadable ones (never half-written: the provider
    writes then renames) are skipped."""
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, name), encoding="utf-8") as fh:
                    out[name[:-5]] = json.load(fh)
    return out


def try_snapshot(table: MetricsTable, lock_fd: int) -> Snapshot | None:
    """The table, or None while a writer holds its lock: a SIGSTOPped MonitorS or controller may
    hold it for seconds, and this loop must go on (it sends the SIGCONT). A shared lock of our own
    is taken without waiting first; the snapshot's own shared lock is then granted at once."""
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    try:
        return table.snapshot()
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)


def launch_counts(lines: list[str]) -> dict[str, int]:
    """The count each launch token was launched for, from the controller's log (all its restarts):
    the activity line before a token's first `launched` line (`launching N`, or the `replacing`
    lines of one step, one instance each), or `resuming launch <token> of N` after a restart."""
    counts: dict[str, int] = {}
    per_pid: dict[str, dict] = {}
    for line in lines:
        m = LOG_LINE.match(line)
        if not m:
            continue
        pid, msg = m.group(4), m.group(5)
        st = per_pid.setdefault(pid, {"launch": 0, "replace": 0, "last": "", "open": False})
        if mm := re.match(r"launching (\d+)", msg):
            st.update(launch=int(mm.group(1)), last="launch", open=False)
        elif mm := re.match(r"replacing (\d+)", msg):
            if not st["open"]:
                st.update(replace=0, open=True)
            st["replace"] += int(mm.group(1))
            st["last"] = "replace"
        elif mm := re.match(r"resuming launch (\S+) of (\d+)", msg):
            counts[mm.group(1)] = int(mm.group(2))
        elif mm := re.match(r"launched \S+ in \S+ \(agent .*launch (\S+)\)$", msg):
            token = mm.group(1)
            if token not in counts:
                counts[token] = st["replace"] if st["last"] == "replace" else st["launch"]
            st["open"] = False
    return counts


# ---------------------------------------------------------------------------------------------
# The invariants


@dataclass
class Verdict:
    number: int
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"verdict {self.number} {self.name}: {'PASS' if self.ok else 'FAIL'}: {self.detail}"


class MaxCheck:
    """1: distinct instances with a live process never above max."""

    def __init__(self, limit: int):
        self.limit = limit
        self.samples = 0
        self.worst = 0
        self.worst_at = 0.0
        self.worst_ids: list[str] = []
        self.over_samples = 0
        self.over_seconds = 0.0
        self.over_first = 0.0
        # The same count over recorded instances only: tells a max+1 of the controller's own
        # instances apart from orphans it no longer knows of.
        self.worst_recorded = 0
        self.worst_recorded_at = 0.0
        self.worst_recorded_ids: list[str] = []

    def observe(self, t: float, dt: float, live: dict[str, str], recorded: set[str]) -> None:
        self.samples += 1
        n = len(live)
        if n > self.worst:
            self.worst, self.worst_at = n, t
            self.worst_ids = [f"{i}{' (' + note + ')' if note else ''}" for i, note in sorted(live.items())]
        if len(recorded) > self.worst_recorded:
            self.worst_recorded, self.worst_recorded_at = len(recorded), t
            self.worst_recorded_ids = [f"{i}{' (' + live[i] + ')' if live.get(i) else ''}" for i in sorted(recorded)]
        if n > self.limit:
            self.over_samples += 1
            self.over_seconds += dt
            self.over_first = self.over_first or t

    def verdict(self) -> Verdict:
        recorded = f"recorded instances alone: at most {self.worst_recorded}, first at t={self.worst_recorded_at:.1f}s"
        if self.worst_recorded > self.limit:
            recorded += f" [{', '.join(self.worst_recorded_ids)}]"
        if self.worst > self.limit:
            return Verdict(
                1,
                "max-instances",
                False,
                f"{self.worst} live instances > max {self.limit} at t={self.worst_at:.1f}s "
                f"[{', '.join(self.worst_ids)}]; above max in {self.over_samples} of {self.samples} "
                f"samples (~{self.over_seconds:.1f}s), first at t={self.over_first:.1f}s; {recorded}",
            )
        return Verdict(
            1,
            "max-instances",
            True,
            f"at most {self.worst} live instances (max {self.limit}), first at t={self.worst_at:.1f}s; "
            f"{self.samples} samples",
        )


@dataclass
class Episode:
    instance_id: str
    pgid: int
    first: float
    last: float
    blamed: float = 0.0  # seconds untracked while the controller was not paused by us
    open: bool = True


class UntrackedCheck:
    """2: every running instance process group has a record with that pgid (after a grace)."""

    def __init__(self, grace: float):
        self.grace = grace
        self.open: dict[int, Episode] = {}
        self.closed: list[Episode] = []
        self.samples = 0

    def observe(self, t: float, dt: float, untracked: dict[int, str], controller_paused: bool) -> None:
        self.samples += 1
        for pgid, iid in untracked.items():
            ep = self.open.get(pgid)
            if ep is None:
                self.open[pgid] = Episode(iid, pgid, t, t)
                continue
            ep.last = t
            ep.instance_id = ep.instance_id if ep.instance_id.startswith("local-") else iid
            if not controller_paused:
                ep.blamed += dt
        for pgid in [p for p in self.open if p not in untracked]:
            ep = self.open.pop(pgid)
            ep.open = False
            self.closed.append(ep)

    def episodes(self) -> list[Episode]:
        return self.closed + list(self.open.values())

    def verdict(self, context: Callable[[float], str]) -> Verdict:
        eps = self.episodes()
        bad = sorted((e for e in eps if e.blamed > self.grace), key=lambda e: -e.blamed)
        if bad:
            w = bad[0]
            end = "still running untracked when the run ended" if w.open else f"until t={w.last:.1f}s"
            return Verdict(
                2,
                "untracked",
                False,
                f"{len(bad)} instance(s) ran without a record; worst {w.instance_id} (pgid {w.pgid}) "
                f"{w.blamed:.1f}s untracked from t={w.first:.1f}s, {end}; {context(w.first)}",
            )
        worst = max((e.blamed for e in eps), default=0.0)
        return Verdict(
            2,
            "untracked",
            True,
            f"every instance process had a record within {self.grace:g}s (longest wait "
            f"{worst:.1f}s, {len(eps)} brief gaps); {self.samples} samples",
        )


class RegistryCheck:
    """3: each MonitorS restart re-attaches the table with every row of the previous one."""

    def __init__(self) -> None:
        self.restarts: list[dict] = []
        self.replaced: list[str] = []

    def observe_restart(
        self, t: float, old_pid: int, new_pid: int, before: set[str], now: set[str], excused: set[str]
    ) -> None:
        lost = sorted(before - now - excused)
        self.restarts.append(
            {"t": round(t, 2), "old": old_pid, "new": new_pid, "before": len(before), "after": len(now), "lost": lost}
        )

    def segment_replaced(self, t: float, what: str) -> None:
        self.replaced.append(f"t={t:.1f}s: {what}")

    def verdict(self) -> Verdict:
        bad = [r for r in self.restarts if r["lost"]]
        if bad or self.replaced:
            parts = []
            if bad:
                w = max(bad, key=lambda r: len(r["lost"]))
                parts.append(
                    f"after the restart at t={w['t']:.1f}s (MonitorS pid {w['old']} -> {w['new']}) "
                    f"{len(w['lost'])} of {w['before']} rows were gone: {', '.join(w['lost'])}; "
                    f"{len(bad)} of {len(self.restarts)} restarts lost rows"
                )
            if self.replaced:
                parts.append("segment replaced: " + "; ".join(self.replaced))
            return Verdict(3, "registry-survives", False, "; ".join(parts))
        if not self.restarts:
            return Verdict(3, "registry-survives", True, "not exercised: no MonitorS restart was seen")
        most = max(r["before"] for r in self.restarts)
        return Verdict(
            3,
            "registry-survives",
            True,
            f"{len(self.restarts)} MonitorS restarts, each kept every row (0 lost; up to {most} rows)",
        )


class FrozenCheck:
    """4: frozen (or itself down) while MonitorS has been down long enough."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.checked = 0
        self.frozen = 0
        self.controller_down = 0
        self.not_deciding = 0
        self.violations: list[str] = []
        self.outages: list[tuple[float, float, str]] = []  # (start t, length, how)

    def verdict(self) -> Verdict:
        longest = max((o[1] for o in self.outages), default=0.0)
        what = (
            f"{len(self.outages)} MonitorS outages (longest {longest:.1f}s); {self.checked} samples past "
            f"{self.threshold:.1f}s down: frozen in {self.frozen}, controller down in {self.controller_down}, "
            f"not deciding in {self.not_deciding}"
        )
        if self.violations:
            return Verdict(
                4,
                "frozen-while-down",
                False,
                f"{len(self.violations)} samples not frozen; first: {self.violations[0]}; {what}",
            )
        if not self.checked:
            return Verdict(4, "frozen-while-down", True, f"not exercised: {what}")
        return Verdict(4, "frozen-while-down", True, what)


def token_verdict(
    ledgers: dict[str, dict], counts: dict[str, int], token_of: dict[str, str], seen_running: dict[str, float]
) -> Verdict:
    """5: no launch token doubled."""
    problems = []
    listed: dict[str, list[str]] = {}
    ledger_ids: dict[str, list[str]] = {}
    for rec in ledgers.values():
        token, ids = str(rec.get("token", "")), [str(i) for i in rec.get("ids", [])]
        ledger_ids[token] = ids
        for i in ids:
            listed.setdefault(i, []).append(token)
    for iid, tokens in sorted(listed.items()):
        if len(tokens) > 1:
            problems.append(f"{iid} is listed by {len(tokens)} launch ledgers ({', '.join(tokens)})")
    running_by_token: dict[str, set[str]] = {}
    for iid, t in sorted(seen_running.items(), key=lambda kv: kv[1]):
        token = token_of.get(iid) or (listed.get(iid) or [""])[0]
        if iid not in listed:
            problems.append(f"{iid} ran (from t={t:.1f}s) but no launch ledger lists it (token {token or 'unknown'})")
        running_by_token.setdefault(token, set()).add(iid)
    worst = (0, 0, "")
    unknown = 0
    for token, ids in ledger_ids.items():
        count = counts.get(token)
        running = running_by_token.get(token, set())
        if count is None:
            unknown += 1
            continue
        if len(running) > count:
            problems.append(
                f"launch {token} was for {count} but {len(running)} instances ran with it: {', '.join(sorted(running))}"
            )
        if len(ids) > count:
            problems.append(f"launch {token} was for {count} but its ledger lists {len(ids)}: {', '.join(ids)}")
        if count and len(running) / count > (worst[0] / worst[1] if worst[1] else -1):
            worst = (len(running), count, token)
    what = (
        f"{len(ledger_ids)} launch tokens, {len(listed)} ids in ledgers, {len(seen_running)} instances seen "
        f"running" + (f", {unknown} tokens with no count in the controller's log" if unknown else "")
    )
    if problems:
        return Verdict(
            5,
            "launch-tokens",
            False,
            f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "") + f"; {what}",
        )
    extra = f"; fullest: {worst[0]} of {worst[1]} ({worst[2]})" if worst[1] else ""
    return Verdict(5, "launch-tokens", True, what + extra)


# ---------------------------------------------------------------------------------------------
# Killing the controller as it launches


@dataclass(frozen=True)
class Fired:
    """What set the trigger off: a log line of the controller (with its pid and its own timestamp),
    or a new instance record (written, pid-less, just before the provider starts the processes)."""

    what: str
    pid: int = 0
    logged_at: float = 0.0


class LaunchTrigger(threading.Thread):
    """When armed, watches every millisecond for the controller's next launch, and calls `fire`
    after the armed delay: on a log line matching TRIGGERS[trigger], or (trigger `spawn`) on a new
    record file in the provider's instances/ folder."""

    def __init__(self, log_path: str, records_dir: str, fire: Callable[[Fired, float], bool]):
        super().__init__(name="chaos-launch-trigger", daemon=True)
        self.log_path = log_path
        self.records_dir = records_dir
        self.fire = fire
        self._lock = threading.Lock()
        self._armed: tuple[str, float, float] | None = None  # trigger, delay, until (monotonic)
        self._halt = threading.Event()
        self._offset = 0
        self._known: set[str] = set()
        self.expired = 0

    def _records(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.records_dir) if n.endswith(".json")}
        except FileNotFoundError:
            return set()

    def arm(self, trigger: str, delay: float, until: float) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                self._offset = os.path.getsize(self.log_path)  # only what is logged from now on
            self._known = self._records()
            self._armed = (trigger, delay, until)

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def stop(self) -> None:
        with self._lock:
            self._armed = None
        self._halt.set()

    def _disarm(self, armed: tuple[str, float, float], expired: bool = False) -> None:
        with self._lock:
            if self._armed == armed:
                self._armed = None
                self.expired += expired

    def _next_line(self, fd: int, pending: bytes, trigger: str) -> tuple[Fired | None, bytes]:
        data = os.pread(fd, 65536, self._offset)
        if not data:
            return None, pending
        self._offset += len(data)
        *lines, pending = (pending + data).split(b"\n")
        for raw in lines:
            m = LOG_LINE.match(raw.decode("utf-8", errors="replace"))
            if m and TRIGGERS[trigger].match(m.group(5)):
                return Fired(m.group(5), int(m.group(4)), log_time(m.group(1))), b""
        return None, pending

    def run(self) -> None:
        fd = -1
        pending = b""
        try:
            while not self._halt.is_set():
                with self._lock:
                    armed = self._armed
                if armed is None:
                    pending = b""
                    self._halt.wait(0.02)
                    continue
                trigger, delay, until = armed
                if time.monotonic() > until:
                    self._disarm(armed, expired=True)
                    continue
                fired = None
                if trigger == "spawn":
                    new = sorted(self._records() - self._known)
                    if new:
                        fired = Fired(f"record {new[0]} appeared")
                        self._known |= set(new)
                else:
                    if fd < 0:
                        try:
                            fd = os.open(self.log_path, os.O_RDONLY)
                        except FileNotFoundError:
                            self._halt.wait(0.01)
                            continue
                    fired, pending = self._next_line(fd, pending, trigger)
                if fired is None:
                    time.sleep(0.001)
                    continue
                if delay:
                    time.sleep(delay)
                if self.fire(fired, delay):
                    self._disarm(armed)
        finally:
            if fd >= 0:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Down:
    since: float  # wall time MonitorS went down
    how: str  # SIGKILL | SIGSTOP | exited
    pid: int
    t: float  # run time


@dataclass(order=True)
class Event:
    due: float
    seq: int
    what: str = field(compare=False)
    action: Callable[[], None] = field(compare=False)


class Chaos(Demo):
    def __init__(self, args: argparse.Namespace, console: Console):
        super().__init__(args, console)
        self.tuning = chaos_tuning(args.duration, args.work_ms)
        self.shm_name = f"helix-chaos-{self.run_id}"
        self.group = f"chaos-{self.run_id}"
        self.rng = random.Random(args.seed)
        self.cfg: Config | None = None
        self.lock = threading.RLock()  # the controller's and MonitorS's processes (the trigger thread kills too)
        self.events: list[Event] = []
        self._seq = 0
        self.deck: list[str] = []
        self.faults: list[dict] = []
        self.fault_counts: Counter = Counter()
        self.intended: set[int] = set()  # pids we killed
        self.stopped: dict[int, tuple[float, str]] = {}  # pid -> (create time, name) while SIGSTOPped by us
        self.restart_due: set[str] = set()
        self.retired: list[subprocess.Popen] = []
        self.unexpected: list[str] = []
        self.monitor_down: Down | None = None
        self.trigger: LaunchTrigger | None = None
        self.launch_restart_delay = 1.0
        self.token_result: Verdict | None = None
        self.marker = b""
        self.id_prefix = b""
        self.chaos_t0 = 0.0
        self.chaos_end = 0.0
        # what was seen
        self.pgid_of_id: dict[str, int] = {}
        self.id_of_pgid: dict[int, str] = {}
        self.token_of: dict[str, str] = {}
        self.seen_running: dict[str, float] = {}
        self.records: dict[str, dict] = {}
        self.recorded_pids: set[int] = set()
        self.last_scan = 0.0
        self.live_now: dict[str, str] = {}
        self.lock_fd = -1
        self.seg_ino = 0
        self.last_mpid = 0
        self.last_rows: tuple[float, set[str]] = (0.0, set())
        self.left_monitor: dict[str, float] = {}  # id -> wall time MonitorS deregistered or forgot it
        self.mon_offset = 0
        self.locked_samples = 0
        self.samples_taken = 0
        self.last_snap: Snapshot | None = None
        self.max_check: MaxCheck | None = None
        self.untracked = UntrackedCheck(RECORD_GRACE)
        self.registry = RegistryCheck()
        self.frozen_check: FrozenCheck | None = None
        self.loadgen_totals: dict = {}
        self.verdicts: list[Verdict] = []
        self._next_scan = self._next_sample = 0.0
        # Not an invariant (faults can always take the fleet below min), but worth a line: how long
        # the run had fewer than min instances with a live process, once min had been reached.
        self.below_min_total = 0.0
        self.below_min_since = 0.0
        self.below_min_longest = (0.0, 0.0)  # (seconds, from t)

    # -- small helpers ----------------------------------------------------------------------------

    def t(self, wall: float | None = None) -> float:
        return (time.time() if wall is None else wall) - self.t0

    def say(self, msg: str) -> None:
        self.console.print(f"t={self.t():6.1f}s {msg}")

    def schedule(self, delay: float, what: str, action: Callable[[], None]) -> None:
        with self.lock:  # the trigger's thread schedules too
            self._seq += 1
            heapq.heappush(self.events, Event(time.monotonic() + delay, self._seq, what, action))

    def note_fault(self, kind: str, target: str, pid: int, detail: str, **extra: object) -> None:
        entry = {"t": round(self.t(), 3), "kind": kind, "target": target, "pid": pid, "detail": detail, **extra}
        self.faults.append(entry)
        self.fault_counts[kind] += 1
        with contextlib.suppress(OSError), open(self.path("faults.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.say(f"fault {kind}: {detail}")

    def alive(self, name: str) -> subprocess.Popen | None:
        """The part's process if it runs and is not SIGSTOPped by us."""
        p = self.popen.get(name)
        if p is None or p.poll() is not None or p.pid in self.stopped or name in self.restart_due:
            return None
        return p

    # -- building the stack -----------------------------------------------------------------------

    def setup_env(self) -> None:
        env = self.build_env()  # the demo's: env file, token file, this run's own keys
        env["HELIX_GROUP"] = self.group
        self.tuning.own["HELIX_GROUP"] = self.group
        try:
            cfg = load_config(env)
        except ConfigError as exc:
            raise ChaosError("bad configuration: " + "; ".join(exc.errors)) from None
        self.cfg = cfg
        self.env = env
        self.max_check = MaxCheck(cfg.max_instances)
        self.frozen_check = FrozenCheck(3 * cfg.poll_interval + cfg.effective_control_interval + FREEZE_MARGIN)
        self.marker = f"{MARKER_KEY}={self.run_id}".encode()
        self.id_prefix = ("local-" + re.sub(r"[^A-Za-z0-9-]", "-", self.group)[:40] + "-").encode()

    def start_part(self, name: str) -> subprocess.Popen:
        module = {"monitor": "monitor_s", "controller": "controller_asg"}[name]
        with self.lock:
            old = self.popen.get(name)
            if old is not None:
                self.retired.append(old)
            proc = self.start(name, [sys.executable, "-m", module], self.env)
            self.restart_due.discard(name)
        return proc

    # -- faults -----------------------------------------------------------------------------------

    def draw_kind(self) -> str:
        if not self.deck:
            self.deck = list(KINDS)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def inject(self) -> None:
        for _ in range(len(KINDS)):
            kind = self.draw_kind()
            if self.apply(kind):
                return
        self.say("no fault applies right now (everything is down or stopped)")

    def monitor_pause(self) -> float:
        # Short outages, and ones long enough for the controller to freeze (invariant 4).
        return self.rng.uniform(0.5, 3.0) if self.rng.random() < 0.5 else self.rng.uniform(7.0, 14.0)

    def apply(self, kind: str) -> bool:
        target, _, action = kind.partition("-")
        if target in ("monitor", "controller"):
            name = target
            if action == "kill-at-launch":
                return self.arm_launch_kill()
            with self.lock:
                proc = self.alive(name)
                if proc is None or (name == "monitor" and self.monitor_down is not None):
                    return False
                pause = (
                    self.monitor_pause()
                    if name == "monitor"
                    else (self.rng.uniform(0.5, 4.0) if action == "kill" else self.rng.uniform(0.5, 8.0))
                )
                if name == "monitor":
                    self.monitor_going_down()
                if action == "kill":
                    self.intended.add(proc.pid)
                    os.kill(proc.pid, signal.SIGKILL)
                    self.restart_due.add(name)
                    if name == "monitor":
                        self.monitor_down = Down(time.time(), "SIGKILL", proc.pid, self.t())
                    self.schedule(pause, f"restart {name}", functools.partial(self.restart, name))
                    self.note_fault(
                        kind,
                        name,
                        proc.pid,
                        f"SIGKILL {name} pid {proc.pid}; restart in {pause:.1f}s",
                        pause=round(pause, 2),
                    )
                else:
                    self.sigstop(proc.pid, name, pause)
                    if name == "monitor":
                        self.monitor_down = Down(time.time(), "SIGSTOP", proc.pid, self.t())
                    self.note_fault(
                        kind,
                        name,
                        proc.pid,
                        f"SIGSTOP {name} pid {proc.pid}; SIGCONT in {pause:.1f}s",
                        pause=round(pause, 2),
                    )
            return True
        # an instance's agent or app
        role = target
        choices = []
        for iid, rec in sorted(self.records.items()):
            for m in rec.get("members", []):
                if (
                    m.get("role") == role
                    and m.get("pid") not in self.stopped
                    and cleanup.same_process(int(m["pid"]), float(m["started"])) is not None
                ):
                    choices.append((iid, int(m["pid"]), float(m["started"])))
        if not choices:
            return False
        iid, pid, started = self.rng.choice(choices)
        if action == "kill":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.note_fault(kind, iid, pid, f"SIGKILL the {role} of {iid} (pid {pid})")
        else:
            pause = self.rng.uniform(0.5, 8.0)
            self.sigstop(pid, f"{role} of {iid}", pause, started)
            self.note_fault(
                kind,
                iid,
                pid,
                f"SIGSTOP the {role} of {iid} (pid {pid}); SIGCONT in {pause:.1f}s",
                pause=round(pause, 2),
            )
        return True

    def sigstop(self, pid: int, name: str, pause: float, started: float | None = None) -> None:
        started = started if started is not None else cleanup.process_started(pid) or 0.0
        os.kill(pid, signal.SIGSTOP)
        self.stopped[pid] = (started, name)
        self.schedule(pause, f"SIGCONT {name}", lambda: self.sigcont(pid))

    def sigcont(self, pid: int) -> None:
        with self.lock:
            entry = self.stopped.pop(pid, None)
            if entry is None:
                return
            started, name = entry
            if cleanup.same_process(pid, started) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                self.say(f"SIGCONT {name} (pid {pid})")
            if self.monitor_down is not None and self.monitor_down.pid == pid and self.monitor_down.how == "SIGSTOP":
                self.monitor_back()

    def arm_launch_kill(self) -> bool:
        if self.trigger is None or self.trigger.armed:
            return False
        trigger = self.rng.choice(("launching", "launched", "spawn", "spawn"))
        if trigger == "spawn":  # the processes start within a millisecond or two of the record
            delay = 0.0 if self.rng.random() < 1 / 4 else round(self.rng.uniform(0.0, 0.010), 4)
            what = "a new instance record appears"
        else:
            delay = 0.0 if self.rng.random() < 1 / 3 else round(self.rng.uniform(0.0, 0.025), 4)
            what = f"its next '{trigger}' log line"
        self.launch_restart_delay = self.rng.uniform(0.5, 4.0)
        self.trigger.arm(trigger, delay, time.monotonic() + 30.0)
        self.say(f"armed: SIGKILL the controller {delay * 1000:.0f} ms after {what} (for 30s)")
        return True

    def fire_at_launch(self, fired: Fired, delay: float) -> bool:
        """In the trigger's thread: SIGKILL the controller that is launching."""
        killed_at = time.time()
        with self.lock:
            proc = self.alive("controller")
            if proc is None or (fired.pid and proc.pid != fired.pid):
                return False
            self.intended.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            self.restart_due.add("controller")
            pause = self.launch_restart_delay
            self.schedule(pause, "restart controller", functools.partial(self.restart, "controller"))
            if fired.logged_at:
                after_ms = (killed_at - fired.logged_at) * 1000
                when = f"{after_ms:.0f} ms after it logged '{fired.what[:90]}'"
            else:
                after_ms = delay * 1000
                when = f"{after_ms:.1f} ms after {fired.what}"
            self.note_fault(
                "controller-kill-at-launch",
                "controller",
                proc.pid,
                f"SIGKILL controller pid {proc.pid} {when}; restart in {pause:.1f}s",
                line=fired.what,
                after_ms=round(after_ms, 1),
                delay_ms=round(delay * 1000, 1),
            )
        return True

    def restart(self, name: str) -> None:
        proc = self.start_part(name)
        self.say(f"restarted {name}: pid {proc.pid}")

    # -- MonitorS outages -------------------------------------------------------------------------

    def monitor_going_down(self) -> None:
        """Before MonitorS goes down: the table as it stands (for invariant 3)."""
        self.sample()

    def monitor_back(self) -> None:
        down = self.monitor_down
        if down is not None:
            assert self.frozen_check is not None
            self.frozen_check.outages.append((down.t, time.time() - down.since, down.how))
        self.monitor_down = None

    # -- supervision ------------------------------------------------------------------------------

    def supervise(self) -> None:
        with self.lock:
            for name in ("monitor", "controller"):
                proc = self.popen.get(name)
                if proc is None or name in self.restart_due or proc.poll() is None:
                    continue
                if proc.pid in self.intended:
                    continue  # its restart is scheduled
                rc = proc.returncode
                msg = f"{name} pid {proc.pid} exited on its own with status {rc}"
                self.unexpected.append(f"t={self.t():.1f}s {msg}")
                self.failed_part = name
                if rc == 2:
                    raise ChaosError(f"{msg} (bad configuration; systemd would not restart it); see its log")
                self.say(f"{msg}: restarting it in 2s, as systemd would")
                self.restart_due.add(name)
                if name == "monitor" and self.monitor_down is None:
                    self.monitor_down = Down(time.time(), "exited", proc.pid, self.t())
                self.schedule(2.0, f"restart {name}", functools.partial(self.restart, name))
            self.retired = [p for p in self.retired if p.poll() is None]
        gen = self.popen.get("loadgen")
        if gen is not None and gen.poll() not in (None, 0):
            self.failed_part = "loadgen"
            raise ChaosError(f"the load generator exited with status {gen.returncode}")

    def run_due(self) -> None:
        now = time.monotonic()
        with self.lock:
            while self.events and self.events[0].due <= now:
                ev = heapq.heappop(self.events)
                ev.action()

    # -- observing --------------------------------------------------------------------------------

    def scan(self) -> None:
        """Processes and records: invariants 1 and 2, and what invariant 5 needs."""
        now = time.monotonic()
        dt = min(now - self.last_scan, 2 * SCAN_EVERY) if self.last_scan else 0.0
        self.last_scan = now
        t = self.t()
        state = self.path("state")
        records = read_json_dir(os.path.join(state, "instances"))
        self.records = records
        recorded_pgids = set()
        for iid, rec in records.items():
            pgid = int(rec.get("pgid") or 0)
            if rec.get("token"):
                self.token_of[iid] = str(rec["token"])
            if pgid:
                recorded_pgids.add(pgid)
                self.id_of_pgid[pgid] = iid
                self.pgid_of_id[iid] = pgid
        procs = scan_instance_processes(self.marker, self.id_prefix, {os.getpid()})
        for p in procs:
            if p.instance_id:
                self.id_of_pgid[p.pgid] = p.instance_id
        live: dict[str, str] = {}
        untracked: dict[int, str] = {}
        recorded_live: set[str] = set()
        for p in procs:
            iid = p.instance_id or self.id_of_pgid.get(p.pgid) or f"unknown-group-{p.pgid}"
            note = []
            record = records.get(iid)
            if record is not None and record.get("terminate_at"):
                note.append(f"terminating {time.time() - float(record['terminate_at']):.1f}s")
            if p.stopped:
                note.append("stopped")
            if iid not in live or note:
                live[iid] = ", ".join(note) if note else live.get(iid, "")
            if p.pgid not in recorded_pgids:
                untracked[p.pgid] = iid
            else:
                recorded_live.add(iid)
            if iid.startswith("local-"):
                self.seen_running.setdefault(iid, t)
            if p.pid not in self.recorded_pids and self.record is not None:
                self.recorded_pids.add(p.pid)
                self.record.add("instance", p.pid)  # for the watchdog, should this process die
        self.live_now = live
        assert self.max_check is not None and self.cfg is not None
        if self.chaos_t0 and len(live) < self.cfg.min_instances:
            self.below_min_total += dt
            self.below_min_since = self.below_min_since or t
            if t - self.below_min_since > self.below_min_longest[0]:
                self.below_min_longest = (t - self.below_min_since, self.below_min_since)
        else:
            self.below_min_since = 0.0
        self.max_check.observe(t, dt, live, recorded_live)
        ctl = self.popen.get("controller")
        paused = ctl is not None and ctl.pid in self.stopped
        self.untracked.observe(t, dt, untracked, paused)

    def tail_monitor_log(self) -> None:
        lines, self.mon_offset = _tail(self.path("monitor.log"), self.mon_offset)
        for line in lines:
            m = LOG_LINE.match(line)
            if not m:
                continue
            mm = re.match(r"(?:deregistered|forgot) (\S+)", m.group(5))
            if mm:
                self.left_monitor[mm.group(1)] = log_time(m.group(1))

    def attach_table(self) -> bool:
        seg = f"/dev/shm/{self.shm_name}"
        try:
            ino = os.stat(seg).st_ino
        except FileNotFoundError:
            if self.seg_ino > 0:
                self.registry.segment_replaced(self.t(), f"/dev/shm/{self.shm_name} disappeared")
                self.seg_ino = -1
            return False
        if self.table is not None and ino != self.seg_ino:
            self.registry.segment_replaced(self.t(), f"{seg} is a new segment (inode {self.seg_ino} -> {ino})")
            self.table.close()
            self.table = None
        if self.table is None:
            try:
                self.table = MetricsTable.attach(self.shm_name)
            except TableError:
                return False
            self.seg_ino = ino
            if self.lock_fd < 0:
                self.lock_fd = os.open(lock_path(self.shm_name), os.O_RDWR | os.O_CREAT, 0o600)
        return True

    def sample(self) -> None:
        """The table: invariants 3 and 4."""
        if not self.attach_table():
            return
        assert self.table is not None and self.cfg is not None and self.frozen_check is not None
        snap = try_snapshot(self.table, self.lock_fd)
        if snap is None:
            self.locked_samples += 1
            return
        self.samples_taken += 1
        self.last_snap = snap
        wall = time.time()
        t = self.t(wall)
        ids = {r.instance_id for r in snap.instances()}
        mon = snap.monitor
        # 3: a new MonitorS's first table holds every row of the previous one's last.
        if mon.pid and mon.heartbeat > 0 and mon.pid != self.last_mpid:
            if self.last_mpid:
                self.tail_monitor_log()
                before_t, before = self.last_rows
                excused = {i for i, at in self.left_monitor.items() if at >= before_t - 2.0}
                self.registry.observe_restart(t, self.last_mpid, mon.pid, before, ids, excused)
            self.last_mpid = mon.pid
        if mon.pid == self.last_mpid:
            self.last_rows = (wall, ids)
        down = self.monitor_down
        current = self.popen.get("monitor")
        if (
            down is not None
            and down.how != "SIGSTOP"
            and current is not None
            and mon.pid == current.pid
            and mon.pid != down.pid
            and mon.heartbeat > down.since
        ):
            self.monitor_back()
            down = None
        # 4: past the threshold, the controller's latest decision (made with MonitorS's heartbeat
        # already stale) must say frozen, unless the controller is down or not deciding.
        if down is not None and wall - down.since > self.frozen_check.threshold and mon.heartbeat <= down.since:
            fc = self.frozen_check
            fc.checked += 1
            ctl = snap.controller
            proc = self.alive("controller")
            stale_at = down.since + 3 * (mon.poll_interval or self.cfg.poll_interval)
            if proc is None:
                fc.controller_down += 1
            elif ctl.pid != proc.pid or ctl.heartbeat <= stale_at + 0.05:
                fc.not_deciding += 1
            elif ctl.frozen:
                fc.frozen += 1
            else:
                fc.violations.append(
                    f"t={t:.1f}s, MonitorS down {wall - down.since:.1f}s ({down.how} of pid {down.pid} at "
                    f"t={down.t:.1f}s), controller pid {ctl.pid} decided {wall - ctl.heartbeat:.1f}s ago "
                    f"with frozen=false (action {ctl.action!r}: {ctl.reason[:80]!r})"
                )

    def progress(self) -> None:
        assert self.cfg is not None
        snap = self.last_snap
        healthy = desired = 0
        frozen = "?"
        if snap is not None:
            healthy = sum(1 for r in snap.instances() if r.state == State.HEALTHY)
            desired = snap.controller.desired
            frozen = "yes" if snap.controller.frozen else "no"
        parts = [
            f"live {len(self.live_now)} (max {self.cfg.max_instances})",
            f"healthy {healthy}",
            f"desired {desired}",
            f"frozen {frozen}",
            f"faults {len(self.faults)}",
        ]
        down = [n for n in ("monitor", "controller") if self.alive(n) is None]
        if down:
            parts.append("down: " + ", ".join(down))
        self.say("  ".join(parts))

    def observe(self) -> None:
        """One turn of the loop: events due, supervision, and whatever observation is due."""
        self.run_due()
        self.supervise()
        now = time.monotonic()
        if now >= self._next_scan:
            self.scan()
            self._next_scan = max(self._next_scan + SCAN_EVERY, now)
        if now >= self._next_sample:
            self.sample()
            self._next_sample = max(self._next_sample + SAMPLE_EVERY, now)

    def wait_until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.stop_reason:
                return
            if time.monotonic() > deadline:
                raise ChaosError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.observe()
            time.sleep(0.05)

    def min_healthy(self) -> bool:
        snap = self.last_snap
        assert self.cfg is not None
        return (
            snap is not None
            and sum(1 for r in snap.instances() if r.state == State.HEALTHY and r.app_port) >= self.cfg.min_instances
        )

    # -- the whole run ----------------------------------------------------------------------------

    def run(self, view: object = None) -> None:  # Demo's signature; there is no view here
        self._next_scan = self._next_sample = time.monotonic()
        assert self.cfg is not None
        if self.stop_reason:
            return
        self.start_part("monitor")
        self.wait_until(lambda: self.attach_table(), 60, "MonitorS's table")
        if self.stop_reason:
            return
        self.start_part("controller")
        self.trigger = LaunchTrigger(self.path("controller.log"), self.path("state", "instances"), self.fire_at_launch)
        self.trigger.start()
        self.wait_until(self.min_healthy, STARTUP_TIMEOUT, f"{self.cfg.min_instances} healthy instances")
        if self.stop_reason:
            return
        duration = self.args.duration
        curve = load_curve(self.rng, duration + 120)
        trace = self.path("demand.txt")
        with open(trace, "w", encoding="utf-8") as fh:
            fh.write("# demand in instances' worth, one line per second\n" + "\n".join(map(str, curve)) + "\n")
        per_instance = self.cfg.cpu_target * self.cfg.local_vcpus / (self.tuning.work_ms / 1000.0)
        peak = round(max(curve) * per_instance, 2)
        self.start(
            "loadgen",
            [
                sys.executable,
                "-m",
                "deploy.local.loadgen",
                "--trace",
                trace,
                "--peak-rps",
                str(peak),
                "--duration",
                str(len(curve)),
                "--stats",
                self.path("loadgen.jsonl"),
            ],
            self.env,
        )
        self.chaos_t0 = time.time()
        self.say(
            f"{self.cfg.min_instances} instances healthy: load {LOW_LOAD:g}-{HIGH_LOAD:g} instances' worth "
            f"({LOW_LOAD * per_instance:.0f}-{HIGH_LOAD * per_instance:.0f} req/s); faults for {duration}s"
        )
        self.schedule(self.rng.uniform(self.args.gap_min, self.args.gap_max), "fault", self.next_fault)
        end = time.monotonic() + duration
        next_progress = time.monotonic() + PROGRESS_EVERY
        while not self.stop_reason:
            now = time.monotonic()
            if now >= end:
                self.stop_reason = f"{duration}s of faults are up"
                break
            self.observe()
            if now >= next_progress:
                self.progress()
                next_progress += PROGRESS_EVERY
            wake = min(self._next_scan, self._next_sample, self.events[0].due if self.events else end, end)
            time.sleep(min(0.05, max(0.0, wake - time.monotonic())))

    def next_fault(self) -> None:
        self.inject()
        self.schedule(self.rng.uniform(self.args.gap_min, self.args.gap_max), "fault", self.next_fault)

    def finish(self) -> None:
        """Stop injecting, undo our SIGSTOPs (a stopped process would hold the cleanup back), take
        the last look, and gather what invariant 5 needs before the state dir goes."""
        self.chaos_end = time.time()
        if self.trigger is not None:
            self.trigger.stop()
            self.trigger.join(timeout=5)
        self.events.clear()
        with self.lock:
            for pid in list(self.stopped):
                self.sigcont(pid)
            if self.monitor_down is not None and self.frozen_check is not None:
                self.monitor_back()  # an outage still open counts too
        if self.record is None or self.cfg is None:
            return
        with contextlib.suppress(Exception):
            self.scan()
        ledgers = read_json_dir(self.path("state", "launches"))
        try:
            with open(self.path("controller.log"), encoding="utf-8", errors="replace") as fh:
                counts = launch_counts(fh.read().splitlines())
        except OSError:
            counts = {}
        self.token_result = token_verdict(ledgers, counts, self.token_of, self.seen_running)
        lines, _ = _tail(self.path("loadgen.jsonl"), 0)
        served = failed = 0
        for line in lines:
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                if not rec.get("final"):
                    served += rec["served"]
                    failed += rec["failed"]
        self.loadgen_totals = {"served": served, "failed": failed}

    def leftovers(self) -> list[str]:
        """6: what the run left behind after its cleanup."""
        left = []
        procs = cleanup.marked_processes(self.run_id)
        if procs:
            left.append(f"{len(procs)} processes ({', '.join(str(p.pid) for p in procs[:5])})")
        strays: list[InstProc] = (
            scan_instance_processes(b"\0", self.id_prefix, {os.getpid()}) if self.cfg is not None else []
        )
        if strays:
            left.append(f"{len(strays)} instance processes ({', '.join(str(p.pid) for p in strays[:5])})")
        if os.path.exists(f"/dev/shm/{self.shm_name}"):
            left.append(f"/dev/shm/{self.shm_name}")
        if os.path.exists(lock_path(self.shm_name)):
            left.append(lock_path(self.shm_name))
        if self.record is not None and os.path.exists(self.record.run_dir):
            left.append(self.record.run_dir)
        return left

    def context(self, t: float) -> str:
        """The faults just before run time `t` (evidence for a verdict)."""
        near = [f for f in self.faults if t - 15.0 <= f["t"] <= t + 0.5]
        if not near:
            return "no fault in the 15 s before"
        return "faults just before: " + "; ".join(f"t={f['t']:.1f}s {f['detail']}" for f in near[-3:])

    def copy_logs(self) -> None:
        super().copy_logs()  # the demo's: *.log, *.jsonl, *.env and the instances' logs
        dest = os.path.join(self.args.out, f"helix-chaos-{self.stamp}-logs")
        with contextlib.suppress(OSError):
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(self.logs_dir, dest)
            self.logs_dir = dest

    def shutdown(self, log: Callable[[str], None]) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        super().shutdown(log)
        for proc in self.retired:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.chaos", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration",
        type=int,
        default=None,
        help=f"seconds of faults (default $CHAOS_DURATION, else {DEFAULT_DURATION})",
    )
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (default $CHAOS_SEED, else random)")
    parser.add_argument("--gap-min", type=float, default=2.0, help="fewest seconds between two faults (default 2)")
    parser.add_argument("--gap-max", type=float, default=6.0, help="most seconds between two faults (default 6)")
    parser.add_argument("--work-ms", type=float, default=WORK_MS, help=f"CPU ms per request (default {WORK_MS:g})")
    parser.add_argument(
        "--out", default="demo-out", help="directory for the logs and the fault timeline (default demo-out)"
    )
    parser.add_argument("--summary-json", metavar="FILE", help="also write the verdicts and the faults as JSON here")
    args = parser.parse_args(argv)
    for key, attr in (("CHAOS_DURATION", "duration"), ("CHAOS_SEED", "seed")):
        if getattr(args, attr) is None and os.environ.get(key, "").strip():
            raw = os.environ[key].strip()
            try:
                setattr(args, attr, int(raw))
            except ValueError:
                parser.error(f"{key}={raw}: expected a whole number")
    if args.duration is None:
        args.duration = DEFAULT_DURATION
    if not 10 <= args.duration <= 86400:
        parser.error(f"duration={args.duration}: expected 10 to 86400 seconds")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**9)
    if not 0.2 <= args.gap_min <= args.gap_max <= 3600:
        parser.error(f"--gap-min={args.gap_min:g} --gap-max={args.gap_max:g}: expected 0.2 <= min <= max <= 3600")
    if not 0 < args.work_ms <= 200:
        parser.error(f"--work-ms={args.work_ms:g}: expected a number greater than 0, at most 200")
    args.out = os.path.abspath(args.out)
    # What the demo's constructor expects.
    args.peak_rps, args.curve, args.trace, args.plain = None, "nasa", None, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(highlight=False, markup=False, soft_wrap=True)
    sys.setswitchinterval(0.001)  # the launch trigger's thread must not wait 5 ms for the GIL
    chaos = Chaos(args, console)
    refused = demo.prepare_run(chaos, "chaos", console, RUNS_ROOT, args.out)
    if refused:
        return refused
    run_dir, watchdog = demo.begin_run(chaos, RUNS_ROOT)
    assert chaos.record is not None

    started = time.monotonic()
    error = ""
    try:
        chaos.setup_env()
        cfg = chaos.cfg
        assert cfg is not None
        console.print(
            f"Helix chaos: {args.duration}s of faults, seed {args.seed} (CHAOS_SEED={args.seed} replays this schedule)"
        )
        console.print(f"run {chaos.run_id}: segment /dev/shm/{chaos.shm_name}, state {run_dir}, group {chaos.group}")
        console.print(
            "settings: "
            + " ".join(chaos.tuning.shown()[:-2])
            + f" (effective: min {cfg.min_instances}, max {cfg.max_instances}, poll {cfg.poll_interval:g}s, "
            f"decide every {cfg.effective_control_interval:g}s)"
        )
        console.print("Ctrl-C stops it at any time and cleans up.")
        chaos.run()
    except (ChaosError, DemoError) as exc:
        error = str(exc)
    except BaseException as exc:  # noqa: BLE001 - whatever happened, clean up below, then say what
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup must not be cut short
        try:
            chaos.finish()
        except BaseException as exc:  # noqa: BLE001
            error = error or f"while finishing: {type(exc).__name__}: {exc}"
        chaos.shutdown(lambda m: console.print(m))
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=10)
    left = chaos.leftovers()
    if error:
        console.print(f"chaos stopped: {error}")
        if chaos.failed_part and chaos.logs_dir:
            log_path = os.path.join(chaos.logs_dir, f"{chaos.failed_part}.log")
            with contextlib.suppress(OSError), open(log_path, encoding="utf-8", errors="replace") as fh:
                console.print(fh.read()[-3000:])
    elif chaos.stop_reason:
        console.print(f"chaos ended: {chaos.stop_reason}")
    verdicts = []
    if chaos.max_check is not None and chaos.frozen_check is not None:
        verdicts = [
            chaos.max_check.verdict(),
            chaos.untracked.verdict(chaos.context),
            chaos.registry.verdict(),
            chaos.frozen_check.verdict(),
            chaos.token_result or Verdict(5, "launch-tokens", False, "not computed"),
        ]
    verdicts.append(
        Verdict(
            6,
            "nothing-left",
            not left,
            "left behind: " + "; ".join(left)
            if left
            else f"no process, segment /dev/shm/{chaos.shm_name} and {run_dir} removed",
        )
    )
    chaos.verdicts = verdicts
    elapsed = time.monotonic() - started
    console.print("summary")
    console.print(
        f"  seed {args.seed}; {len(chaos.faults)} faults in {chaos.chaos_end - chaos.chaos_t0:.0f}s of chaos "
        f"({elapsed:.0f}s in all): " + ", ".join(f"{k} {n}" for k, n in sorted(chaos.fault_counts.items()))
    )
    if chaos.trigger is not None and chaos.trigger.expired:
        console.print(f"  kill-at-launch armed but no launch came within 30s: {chaos.trigger.expired} times")
    if chaos.unexpected:
        console.print("  exited on their own: " + "; ".join(chaos.unexpected))
    console.print(
        f"  instances seen: {len(chaos.seen_running)}; table samples {chaos.samples_taken} "
        f"(+{chaos.locked_samples} skipped: lock held by a stopped process); requests served "
        f"{chaos.loadgen_totals.get('served', 0)}, failed {chaos.loadgen_totals.get('failed', 0)}"
    )
    if chaos.cfg is not None:
        longest, since = chaos.below_min_longest
        console.print(
            f"  fewer than min ({chaos.cfg.min_instances}) live instances (not an invariant): "
            f"{chaos.below_min_total:.0f}s in all, longest {longest:.0f}s"
            + (f" from t={since:.1f}s" if longest else "")
        )
    console.print(f"  logs: {chaos.logs_dir or '(none)'}")
    for v in verdicts:
        console.print(v.line())
    ok = not error and all(v.ok for v in verdicts) and len(verdicts) == 6
    console.print(
        f"chaos: {'PASS' if ok else 'FAIL'} ({sum(v.ok for v in verdicts)}/6 verdicts pass"
        f"{'; ' + error if error else ''}), seed {args.seed}"
    )
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "ok": ok,
                    "seed": args.seed,
                    "run_id": chaos.run_id,
                    "shm_name": chaos.shm_name,
                    "run_dir": run_dir,
                    "group": chaos.group,
                    "error": error,
                    "stop_reason": chaos.stop_reason,
                    "elapsed": round(elapsed, 1),
                    "verdicts": [v.__dict__ for v in verdicts],
                    "faults": chaos.faults,
                    "registry_restarts": chaos.registry.restarts,
                    "untracked": [e.__dict__ for e in chaos.untracked.episodes()],
                    "procs": [p.__dict__ for p in chaos.record.procs],
                    "logs": chaos.logs_dir,
                    "loadgen": chaos.loadgen_totals,
                    "below_min_seconds": round(chaos.below_min_total, 1),
                    "below_min_longest": [round(x, 1) for x in chaos.below_min_longest],
                },
                fh,
                indent=1,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
