"""A tiny stand-in for systemd's side of `Type=notify` + `WatchdogSec=` + `Restart=on-failure`,
for tests: systemd is not PID 1 here, so this plays it for one service.

It binds a Unix datagram socket (NOTIFY_SOCKET), starts the service through a ProcessPool with
NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (the child's own pid: a `sh` that exports `$$` and
execs the service, which keeps that pid), and records every notification with its sender's pid
(SO_PASSCRED). As `NotifyAccess=main`, only the main process's messages count. The watchdog is
armed by READY=1 or the first WATCHDOG=1; when no WATCHDOG=1 arrives within the timeout (which a
WATCHDOG_USEC= message may change), it sends SIGABRT and SIGCONT, then SIGKILL after
`abort_timeout`, as systemd does. A process that fails (not exit 0 or 2, not a clean signal) is
restarted after `restart_sec`.

Processes are started through the test's ProcessPool, so they die with the test whatever happens;
`close()` (done by the fixture first) stops the supervising thread so nothing restarts meanwhile.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tests.procs import Proc, ProcessPool, wait_for

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
CLEAN_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE}  # systemd's "clean" deaths
PREVENT_EXIT = {2}  # RestartPreventExitStatus=2 (bad configuration)


@dataclass
class Message:
    run: int  # which start of the service (0 first, 1 after the first restart, ...)
    pid: int | None  # the sender (SO_PASSCRED)
    fields: dict[str, str]
    at: float  # time.monotonic() when received
    accepted: bool  # sent by the main process (NotifyAccess=main)


@dataclass
class Run:
    index: int
    proc: Proc
    started_at: float
    watchdog: float | None  # current timeout, seconds
    ready_at: float | None = None
    last_ping: float | None = None  # the watchdog's reference point (READY or the last WATCHDOG=1)
    watchdog_fired_at: float | None = None
    exited_at: float | None = None
    returncode: int | None = None
    pings: list[float] = field(default_factory=list)


class NotifySupervisor:
    def __init__(
        self,
        pool: ProcessPool,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        watchdog: float | None,
        restart_sec: float = 0.2,
        abort_timeout: float = 10.0,
    ):
        self.pool = pool
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.watchdog = watchdog
        self.restart_sec = restart_sec
        self.abort_timeout = abort_timeout
        self.messages: list[Message] = []
        self.runs: list[Run] = []
        self.events: list[str] = []  # what the supervisor did, for failure messages
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dir = tempfile.mkdtemp(prefix="helix-notify-")  # short: sun_path is 108 bytes
        self.socket_path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.socket_path)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._thread = threading.Thread(target=self._loop, name=f"notify-supervisor-{name}", daemon=True)

    # -- control -------------------------------------------------------------------------------

    def start(self) -> NotifySupervisor:
        self._spawn()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._sock.close()
        try:
            os.unlink(self.socket_path)
            os.rmdir(self._dir)
        except OSError:
            pass

    # -- what the tests look at ----------------------------------------------------------------

    def run(self, index: int) -> Run:
        with self._lock:
            return self.runs[index]

    def current(self) -> Run:
        with self._lock:
            return self.runs[-1]

    def accepted(self, run: int | None = None, key: str | None = None) -> list[Message]:
        with self._lock:
            return [
                m
                for m in self.messages
                if m.accepted and (run is None or m.run == run) and (key is None or key in m.fields)
            ]

    def wait_ready(self, run: int, timeout: float) -> Run:
        wait_for(
            lambda: len(self.runs) > run and self.run(run).ready_at is not None,
            timeout,
            self._what(f"READY=1 from run {run}"),
        )
        return self.run(run)

    def wait_pings(self, run: int, count: int, timeout: float) -> list[float]:
        """Wait for `count` WATCHDOG=1 from run `run` after its READY; their arrival times."""

        def pings() -> list[float]:
            r = self.run(run)
            after = [t for t in r.pings if r.ready_at is not None and t >= r.ready_at]
            return after if len(after) >= count else []

        return wait_for(pings, timeout, self._what(f"{count} watchdog pings from run {run}"))

    def _what(self, what: str) -> str:
        with self._lock:
            runs = [(r.index, r.proc.pid, r.returncode) for r in self.runs]
            events = list(self.events)
        return f"{what} (runs {runs}, supervisor: {events})"

    # -- the supervisor ------------------------------------------------------------------------

    def _spawn(self) -> None:
        env = dict(self.env, NOTIFY_SOCKET=self.socket_path)
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        if self.watchdog is not None:
            env["WATCHDOG_USEC"] = str(int(self.watchdog * 1_000_000))
        # systemd sets WATCHDOG_PID in the child after fork; a sh that execs keeps its pid ($$).
        # No core file from the SIGABRT (it would land in the checkout).
        script = 'ulimit -c 0; WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"'
        argv = ["/bin/sh", "-c", script, "sh", *self.argv]
        with self._lock:
            index = len(self.runs)
        proc = self.pool.start(f"{self.name}-run{index}", argv, env)
        with self._lock:
            self.runs.append(Run(index, proc, time.monotonic(), self.watchdog))
            self.events.append(f"started run {index} as pid {proc.pid}")

    def _loop(self) -> None:
        restart_at: float | None = None
        while not self._stop.is_set():
            readable, _, _ = select.select([self._sock], [], [], 0.02)
            if readable:
                self._receive()
            now = time.monotonic()
            with self._lock:
                run = self.runs[-1]
            if run.exited_at is None:
                rc = run.proc.popen.poll()
                if rc is not None:
                    self._exited(run, rc, now)
                    if self._should_restart(rc):
                        restart_at = now + self.restart_sec
                elif run.last_ping is not None and run.watchdog is not None and now - run.last_ping > run.watchdog:
                    self._fire_watchdog(run, now)
            elif restart_at is not None and now >= restart_at:
                restart_at = None
                self._spawn()

    def _receive(self) -> None:
        try:
            data, ancdata, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
        except OSError:
            return
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields = {}
        for line in data.decode("utf-8", "replace").split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        now = time.monotonic()
        with self._lock:
            run = self.runs[-1]
            accepted = pid == run.proc.pid
            self.messages.append(Message(run.index, pid, fields, now, accepted))
            if not accepted:
                self.events.append(f"ignored {fields} from pid {pid} (NotifyAccess=main)")
                return
            if "WATCHDOG_USEC" in fields:
                run.watchdog = int(fields["WATCHDOG_USEC"]) / 1_000_000
                run.last_ping = now  # systemd resets the timer with the new timeout
            if fields.get("READY") == "1" and run.ready_at is None:
                run.ready_at = now
                run.last_ping = now  # the watchdog is armed from here (start-post)...
            if fields.get("WATCHDOG") == "1":
                run.pings.append(now)
                run.last_ping = now  # ... or from the first ping, whichever comes first

    def _exited(self, run: Run, rc: int, now: float) -> None:
        with self._lock:
            run.exited_at, run.returncode = now, rc
            self.events.append(f"run {run.index} (pid {run.proc.pid}) exited {rc}")

    def _should_restart(self, rc: int) -> bool:
        if rc == 0 or rc in PREVENT_EXIT:
            return False
        return not (rc < 0 and -rc in CLEAN_SIGNALS)

    def _fire_watchdog(self, run: Run, now: float) -> None:
        """As systemd: `Watchdog timeout (limit Ns)!`, the watchdog signal (SIGABRT) and SIGCONT
        (a stopped process must run to die of it), then SIGKILL after TimeoutAbortSec."""
        pid = run.proc.pid
        with self._lock:
            run.watchdog_fired_at = now
            self.events.append(f"watchdog timeout (limit {run.watchdog}s) for run {run.index}: SIGABRT to pid {pid}")
        for sig in (signal.SIGABRT, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            rc = run.proc.popen.wait(timeout=self.abort_timeout)
        except subprocess.TimeoutExpired:  # it did not die of SIGABRT
            with self._lock:
                self.events.append(f"run {run.index} still alive {self.abort_timeout}s after SIGABRT: SIGKILL")
            os.kill(pid, signal.SIGKILL)
            rc = run.proc.popen.wait(timeout=30)
        self._exited(run, rc, time.monotonic())
        # Restart=on-failure restarts after a watchdog kill; the loop sees exited_at and spawns.
        with self._lock:
            self.events.append(f"restarting in {self.restart_sec}s")
        time.sleep(self.restart_sec)
        if not self._stop.is_set():
            self._spawn()
