"""Leave nothing behind: the demo's run record, its cleanup, and the watchdog that runs it.

A demo run owns one run directory under RUNS_ROOT holding `run.json` (the demo's pid, the segment
name, a marker and every process it has seen), the state dir, logs and the token file. Whatever
stops the demo, the same idempotent `clean_run` ends everything the run started and removes its
segment and directory:

- the demo's own `finally` (normal end, Ctrl-C, SIGTERM, an exception, a part that crashed),
- the watchdog, a small process in its own session started first by the demo
  (`python -m deploy.local.cleanup --watch <demo pid> <run dir>`), which cleans up when the demo
  disappears without doing so (SIGKILL, OOM), and exits when the run directory is gone,
- the next demo, which cleans every run whose demo is no longer alive (the watchdog was killed too).

Finding the processes does not rely on one record alone: the run's environment marker
(DEMO_RUN_ID, inherited by every process the demo starts and by everything they start, instances
included), the pids recorded in `run.json` (with start times, so a reused pid is never hit), and
the process groups of both. The demo's own process group is never signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import psutil

from shared.table import MetricsTable

RUNS_ROOT = os.path.join(tempfile.gettempdir(), "helix-demo-runs")
MARKER_KEY = "DEMO_RUN_ID"  # not HELIX_: the config loader rejects unknown HELIX_ keys


@dataclass
class Seen:
    name: str
    pid: int
    started: float  # psutil create_time, to tell a reused pid apart


@dataclass
class RunRecord:
    run_dir: str
    run_id: str
    shm_name: str
    demo_pid: int
    demo_started: float
    procs: list[Seen] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.run_dir, "run.json")

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(asdict(self), fh)
        os.replace(tmp, self.path)  # a reader never sees half a record

    def add(self, name: str, pid: int) -> None:
        started = process_started(pid)
        if started is not None and all(s.pid != pid for s in self.procs):
            self.procs.append(Seen(name, pid, started))
            self.save()

    @classmethod
    def load(cls, run_dir: str) -> RunRecord | None:
        try:
            with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as fh:
                raw = json.load(fh)
            raw["procs"] = [Seen(**s) for s in raw.get("procs", [])]
            return cls(**raw)
        except (OSError, ValueError, TypeError):
            return None


def process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(pid: int, started: float) -> psutil.Process | None:
    """The process if `pid` is still the one that started at `started`, else None."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


def marked_processes(run_id: str) -> list[psutil.Process]:
    """Every live process whose environment carries this run's marker (never this process)."""
    wanted = f"{MARKER_KEY}={run_id}"
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if wanted.encode() in env:
            found.append(proc)
    return found


def signal_group_or_process(proc: psutil.Process, sig: int) -> None:
    """Signal the process's whole group if it leads one of its own, else just the process."""
    protected = {os.getpgrp()}
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pgid == proc.pid and pgid not in protected:
            os.killpg(pgid, sig)
        else:
            os.kill(proc.pid, sig)


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` seconds for every process to exit; those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _running(p)]
    return left


def terminate(procs: Iterable[psutil.Process], grace: float) -> None:
    """SIGTERM each (and its group), wait up to `grace` seconds, then SIGKILL what is left."""
    procs = [p for p in procs if _running(p)]
    for p in procs:
        signal_group_or_process(p, signal.SIGTERM)
    alive = wait_gone(procs, grace)
    for p in alive:
        signal_group_or_process(p, signal.SIGKILL)
    wait_gone(alive, 5)


def live_recorded(record: RunRecord, names: set[str] | None = None) -> list[psutil.Process]:
    out = []
    for s in record.procs:
        if names is None or s.name in names:
            proc = same_process(s.pid, s.started)
            if proc is not None:
                out.append(proc)
    return out


def sweep(record: RunRecord) -> int:
    """SIGKILL every process of the run that is still there (recorded or marked); how many."""
    names = {s.name for s in record.procs} - {"watchdog"}  # it leaves when the run dir is gone
    procs = {p.pid: p for p in live_recorded(record, names) + marked_processes(record.run_id)}
    procs.pop(os.getpid(), None)
    procs.pop(record.demo_pid, None)  # the demo cleans up itself; the watchdog waits for it to die
    for p in procs.values():
        signal_group_or_process(p, signal.SIGKILL)
    wait_gone(procs.values(), 5)
    return len(procs)


def remove_run(record: RunRecord) -> None:
    MetricsTable.remove(record.shm_name)
    shutil.rmtree(record.run_dir, ignore_errors=True)


def clean_run(record: RunRecord, grace: float = 3.0) -> None:
    """Stop everything a run started, in the order the demo uses, then sweep and remove. Idempotent."""
    stop_run(record, grace)
    remove_run(record)


def stop_run(record: RunRecord, grace: float = 3.0) -> None:
    """Stop every process of the run: controller, load, instances, MonitorS, then a SIGKILL sweep."""
    terminate(live_recorded(record, {"controller"}), grace)  # first, so it does not replace instances
    terminate(live_recorded(record, {"loadgen"}), grace)
    # Everything else of the run but MonitorS and its helpers (its resource tracker ignores
    # SIGTERM and leaves with MonitorS): the instances, and anything they started.
    monitor = live_recorded(record, {"monitor"})
    spare = {record.demo_pid} | {p.pid for p in monitor}
    for p in monitor:
        with contextlib.suppress(psutil.Error):
            spare |= {c.pid for c in p.children(recursive=True)}
    instances = {
        p.pid: p for p in live_recorded(record, {"instance"}) + marked_processes(record.run_id) if p.pid not in spare
    }
    terminate(instances.values(), grace)
    terminate(monitor, grace)
    sweep(record)


def clean_stale_runs(root: str = RUNS_ROOT) -> list[str]:
    """Clean every run under `root` whose demo is gone; the run dirs cleaned."""
    cleaned = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(root)):
            run_dir = os.path.join(root, entry)
            record = RunRecord.load(run_dir)
            if record is None:
                # No record: a run that died before writing one, old enough not to be starting now.
                with contextlib.suppress(OSError):
                    if time.time() - os.path.getmtime(run_dir) > 60:
                        shutil.rmtree(run_dir, ignore_errors=True)
                        cleaned.append(run_dir)
                continue
            if same_process(record.demo_pid, record.demo_started) is None:
                clean_run(record, grace=1.0)
                cleaned.append(run_dir)
    return cleaned


def watch(demo_pid: int, run_dir: str, interval: float = 0.5) -> int:
    """The watchdog: wait for the demo to die or the run to be removed; clean up in the first case."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the demo's to handle
    started = process_started(demo_pid)
    while True:
        if not os.path.isdir(run_dir):
            return 0  # the demo cleaned up
        if started is None or same_process(demo_pid, started) is None:
            break
        time.sleep(interval)
    record = RunRecord.load(run_dir)
    if record is not None:
        print(
            f"helix demo watchdog: demo pid {demo_pid} died without cleaning up; cleaning {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        clean_run(record, grace=1.0)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.cleanup", description="Clean up demo runs whose demo has died."
    )
    parser.add_argument(
        "--watch",
        nargs=2,
        metavar=("DEMO_PID", "RUN_DIR"),
        help="stay until the demo exits; clean its run if it did not",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.watch:
        return watch(int(args.watch[0]), args.watch[1])
    for run_dir in clean_stale_runs():
        print(f"cleaned {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
