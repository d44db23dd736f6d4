"""Lifecycle hooks on the instance: HELIX_LAUNCH_HOOK (Agent.Prepare) and HELIX_TERMINATE_HOOK
(Agent.Drain), as EC2 Auto Scaling's lifecycle hooks.

One `HookRunner` per kind lives as long as the agent. The command is the instance's own
configuration, never the caller's: the caller only says how long it may run and why. A hook runs
at most once per agent process, so a caller that lost its stream (MonitorS restarted, a network
blip) calls again and follows the same run, or gets its result if it ended.

The command is split into words (shlex) and executed without a shell (an operator who wants one
writes `sh -c '...'`), in a session and process group of its own, so a hook that outlives its
timeout is stopped with everything it started: SIGTERM to the group, SIGKILL after KILL_GRACE.
Its output (stdout and stderr together) goes to the agent's log, one line per line, prefixed with
the hook's kind; its last line is the result's detail when it exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import psutil

from shared.config import settings

HEARTBEAT_SECONDS = 2.0  # a RUNNING message this often while the hook runs
KILL_GRACE = 2.0  # SIGTERM to the hook's group, then SIGKILL after this
# After the hook exited, output still in the pipe is read for this long: a child it left in the
# background may hold the pipe open forever, and must not hold the result back.
DRAIN_AFTER_EXIT = 0.5
MAX_LOG_LINES = 200  # per run; then one line saying the rest is not logged
MAX_LOG_CHARS = 300  # per logged line
DETAIL_CHARS = 40  # of the last output line, in the result's detail
READ_CHUNK = 4096

KEYS = {"launch": "HELIX_LAUNCH_HOOK", "terminate": "HELIX_TERMINATE_HOOK"}
# The agent's secrets (its token, its instance secret, cloud keys) are not the hook's business.
_SECRET_KEYS = frozenset(k for info in settings() if info.secret for k in (info.key, *info.aliases))


class Result(enum.Enum):
    """As HookProgress.Result in protos/helix.proto (same names)."""

    RUNNING = "RUNNING"
    CONTINUE = "CONTINUE"
    ABANDON = "ABANDON"
    TIMEOUT = "TIMEOUT"


@dataclass(frozen=True)
class Progress:
    result: Result
    elapsed: float  # seconds since the hook started
    detail: str


def parse_command(kind: str, command: str) -> list[str]:
    """The hook's argv ([] for none); ValueError naming the setting when it is not shell words."""
    try:
        return shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"{KEYS[kind]}={command}: expected shell words ({exc})") from None


def _printable(raw: bytes) -> str:
    # One log line per output line: a hook's control characters never reach the log as such.
    text = raw.decode("utf-8", "replace").rstrip("\r").replace("\t", " ")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a member that changed user: still there
    return True


def _group_alive(pgid: int) -> bool:
    """True while a member of the group still runs. Zombies do not count: an orphan's zombie waits
    for init to reap it, which some inits do only every few seconds."""
    if not _group_exists(pgid):
        return False
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Output:
    """The hook's output, split into lines: each logged (up to MAX_LOG_LINES), the last kept."""

    def __init__(self, kind: str, log: logging.Logger):
        self.kind, self.log = kind, log
        self.buffer = b""
        self.logged = 0
        self.last = ""

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LOG_CHARS * 4:  # no newline in sight: log what there is
            lines.append(self.buffer)
            self.buffer = b""
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self.buffer:
            self._line(self.buffer)
            self.buffer = b""

    def _line(self, raw: bytes) -> None:
        text = _printable(raw).strip()
        if not text:
            return
        self.last = text
        self.logged += 1
        if self.logged <= MAX_LOG_LINES:
            self.log.info("%s hook: %s", self.kind, text[:MAX_LOG_CHARS])
        elif self.logged == MAX_LOG_LINES + 1:
            self.log.info("%s hook: more than %d lines of output; the rest is not logged", self.kind, MAX_LOG_LINES)


class HookRunner:
    """Runs one kind of hook ("launch" or "terminate") at most once for this agent's life.

    `follow(timeout, reason)` starts it (the first call's timeout and reason win) or joins the run
    under way, and yields a RUNNING Progress every `heartbeat` seconds until the final one:
    CONTINUE (exit 0, or no command: detail "no hook"), ABANDON (non-zero exit: "exit N: <last
    output line>"; or it could not start; or the agent stopped it) or TIMEOUT (its group was
    killed). Once ended, every call yields that same final Progress. A follower that goes away
    (its caller hung up) never stops the hook. `close()` stops a running hook (agent shutdown).
    """

    def __init__(
        self,
        kind: str,
        command: str,
        instance_id: str,
        log: logging.Logger,
        *,
        heartbeat: float = HEARTBEAT_SECONDS,
        kill_grace: float = KILL_GRACE,
        environ: Mapping[str, str] | None = None,
    ):
        if kind not in KEYS:
            raise ValueError(f"kind={kind!r}: expected one of {', '.join(KEYS)}")
        self.kind = kind
        self.argv = parse_command(kind, command)
        self.instance_id = instance_id
        self.log = log
        self.heartbeat = heartbeat
        self.kill_grace = kill_grace
        self.environ = environ
        self.timeout = 0.0
        self.reason = ""
        self.pgid = 0  # the running hook's process group (its pid); 0 when none runs
        self._started = 0.0
        self._final: Progress | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def final(self) -> Progress | None:
        """The result, once the hook ended (None before it started and while it runs)."""
        return self._final

    @property
    def running(self) -> bool:
        return self._task is not None and self._final is None

    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0

    def start(self, timeout: float, reason: str) -> bool:
        """Start the hook unless it started before; True when this call started it."""
        if self._task is not None or self._final is not None:
            return False
        self.timeout, self.reason = timeout, reason
        if not self.argv:
            self._final = Progress(Result.CONTINUE, 0.0, "no hook")
            self.log.info("%s hook: none configured: CONTINUE (reason: %r)", self.kind, reason)
            return True
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._main(), name=f"{self.kind}-hook")
        return True

    async def follow(self, timeout: float, reason: str) -> AsyncIterator[Progress]:
        self.start(timeout, reason)
        while self._final is None:
            assert self._task is not None
            # asyncio.wait never cancels the task: a follower cancelled here leaves the hook running.
            await asyncio.wait({self._task}, timeout=self.heartbeat)
            if self._final is None:
                yield Progress(Result.RUNNING, self.elapsed(), "running")
        yield self._final

    async def result(self, timeout: float, reason: str) -> Progress:
        """The final Progress (starting the hook, or waiting for the run under way)."""
        return [progress async for progress in self.follow(timeout, reason)][-1]

    async def close(self) -> None:
        """Stop a running hook (its whole group) and wait until it is stopped; its result is ABANDON."""
        if self._task is None or self._task.done():
            return
        self._stop.set()
        await asyncio.wait({self._task})

    # --- the run ------------------------------------------------------------------------------

    async def _main(self) -> None:
        try:
            final = await self._run()
        except asyncio.CancelledError:
            # The loop is going away without close(): never leave the group running.
            if self.pgid:
                _signal_group(self.pgid, signal.SIGKILL)
            self._final = Progress(Result.ABANDON, self.elapsed(), "stopped: agent stopping")
            raise
        except Exception as exc:  # a follower must get a result whatever went wrong (logged)
            self.log.exception("%s hook: failed to run", self.kind)
            final = Progress(Result.ABANDON, self.elapsed(), f"agent error: {type(exc).__name__}")
        self.log.info("%s hook ended: %s after %.1fs (%s)", self.kind, final.result.name, final.elapsed, final.detail)
        self.pgid = 0
        self._final = final

    def _env(self) -> dict[str, str]:
        base = os.environ if self.environ is None else self.environ
        env = {k: v for k, v in base.items() if k not in _SECRET_KEYS}
        env.update(
            HELIX_HOOK=self.kind,
            HELIX_INSTANCE_ID=self.instance_id,
            HELIX_HOOK_TIMEOUT=f"{self.timeout:g}",
            HELIX_HOOK_REASON=self.reason,
        )
        return env

    async def _run(self) -> Progress:
        loop = asyncio.get_running_loop()
        output = _Output(self.kind, self.log)
        # Our own pipe rather than asyncio's: it is closed when the run ends even if a background
        # child of the hook still holds its write end.
        read_fd, write_fd = os.pipe()
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=write_fd,
                    stderr=write_fd,
                    env=self._env(),
                    start_new_session=True,  # its own group: the timeout kills all it started
                )
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                self.log.error("%s hook: cannot run %s: %s", self.kind, shlex.join(self.argv), reason)
                return Progress(Result.ABANDON, self.elapsed(), f"cannot run {self.argv[0][:24]}: {reason}"[:80])
            finally:
                os.close(write_fd)
            self.pgid = proc.pid
            self.log.info(
                "%s hook started (pid %d, timeout %gs, reason: %r): %s",
                self.kind,
                proc.pid,
                self.timeout,
                self.reason,
                shlex.join(self.argv),
            )
            eof = asyncio.Event()

            def readable() -> None:
                try:
                    data = os.read(read_fd, READ_CHUNK)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if data:
                    output.feed(data)
                else:
                    loop.remove_reader(read_fd)
                    eof.set()

            os.set_blocking(read_fd, False)
            loop.add_reader(read_fd, readable)
            try:
                return await self._wait(proc, output, eof)
            finally:
                loop.remove_reader(read_fd)
                output.close()
        finally:
            os.close(read_fd)

    async def _wait(self, proc: asyncio.subprocess.Process, output: _Output, eof: asyncio.Event) -> Progress:
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({exited, stopping}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if exited.done():
            code = exited.result()
            await self._drain(eof)
            if code == 0:
                return Progress(Result.CONTINUE, self.elapsed(), "exit 0")
            what = f"exit {code}" if code > 0 else f"killed by {signal.Signals(-code).name}"
            return Progress(Result.ABANDON, self.elapsed(), self._detail(what, output))
        stopped = self._stop.is_set()
        elapsed = self.elapsed()
        self.log.warning(
            "%s hook: %s: stopping its process group %d",
            self.kind,
            "agent stopping" if stopped else f"still running after {self.timeout:g}s",
            proc.pid,
        )
        await self._kill_group(proc.pid)
        await exited
        await self._drain(eof)
        if stopped:
            return Progress(Result.ABANDON, elapsed, "stopped: agent stopping")
        return Progress(Result.TIMEOUT, elapsed, self._detail(f"timed out after {self.timeout:g}s", output))

    async def _kill_group(self, pgid: int) -> None:
        _signal_group(pgid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.kill_grace
        while _group_alive(pgid) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        # Only a group that still exists: an empty one's id may be reused by then.
        if _group_exists(pgid):
            _signal_group(pgid, signal.SIGKILL)

    @staticmethod
    async def _drain(eof: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(eof.wait(), DRAIN_AFTER_EXIT)

    @staticmethod
    def _detail(what: str, output: _Output) -> str:
        return f"{what}: {output.last[:DETAIL_CHARS]}" if output.last else what


__all__ = ["HEARTBEAT_SECONDS", "KEYS", "HookRunner", "Progress", "Result", "parse_command"]
