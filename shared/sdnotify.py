"""The systemd notify protocol (sd_notify(3)), standard library only.

Under a unit with `Type=notify` systemd sets $NOTIFY_SOCKET (a path, or an abstract name written
with a leading '@') and, with `WatchdogSec=`, $WATCHDOG_USEC (and $WATCHDOG_PID: the watchdog is
ours only if it names our pid). Each message is one datagram of `KEY=value` lines.

Without $NOTIFY_SOCKET (a terminal, a test, `make demo`) every call here does nothing. Nothing here
ever raises: a notification that cannot be sent is logged once and the process carries on (a lost
READY fails the unit's start, a lost ping restarts it: both are visible in systemctl).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

_warned = False


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):  # abstract namespace
        return "\0" + path[1:]
    return path


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") as one datagram. False when there is no socket or the
    send failed (logged once per process); never raises."""
    global _warned
    env = os.environ if environ is None else environ
    address = _address(env)
    if address is None or not fields:
        return False
    message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
        return True
    except (OSError, ValueError) as exc:  # ValueError: a name socket() cannot take
        if not _warned:
            _warned = True
            log.warning("cannot notify systemd on NOTIFY_SOCKET=%s: %s (said once)", env.get("NOTIFY_SOCKET"), exc)
        return False


def ready(status: str = "") -> bool:
    """READY=1: start-up is over (Type=notify units count as started from here)."""
    return notify("READY=1", f"STATUS={status}") if status else notify("READY=1")


def status(text: str) -> bool:
    """STATUS=: the one line `systemctl status` shows."""
    return notify(f"STATUS={text}")


def stopping(status: str = "") -> bool:
    """STOPPING=1: shutting down (by request or by itself)."""
    return notify("STOPPING=1", f"STATUS={status}") if status else notify("STOPPING=1")


def watchdog() -> bool:
    """WATCHDOG=1: one keep-alive ping (unthrottled: see `Watchdog` for the loop's)."""
    return notify("WATCHDOG=1")


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds ($WATCHDOG_USEC), or None when there is none for this process:
    no socket, no or a bad $WATCHDOG_USEC, or a $WATCHDOG_PID that is another process's (a child
    that inherited its parent's environment)."""
    env = os.environ if environ is None else environ
    if _address(env) is None:
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


class Watchdog:
    """The watchdog of one loop: call `ping()` every iteration (cheap); it sends WATCHDOG=1 at most
    every half timeout. Disabled (every call a no-op) when systemd asked for no watchdog."""

    def __init__(self, interval: float | None, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last = float("-inf")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Watchdog:
        return cls(watchdog_interval(environ))

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def ping(self) -> None:
        if self.interval is None:
            return
        now = self.clock()
        if now - self._last >= self.interval / 2:
            self._last = now
            notify("WATCHDOG=1")

    def cover(self, period: float, what: str) -> None:
        """Make sure a loop that pings every `period` seconds is not killed between two pings: with
        pings sent at most every half timeout, a ping can come up to `timeout / 2 + period` after
        the last one, so the timeout must be at least 4 periods (a quarter left for a slow step).
        A shorter WatchdogSec= is raised for this process with WATCHDOG_USEC= (logged once)."""
        if self.interval is None or self.interval >= 4 * period:
            return
        needed = 4 * period
        log.warning(
            "WatchdogSec=%gs is too short for %s every %gs: raising it to %gs for this run",
            self.interval,
            what,
            period,
            needed,
        )
        self.interval = needed
        notify(f"WATCHDOG_USEC={int(needed * 1_000_000)}")
        self._last = float("-inf")  # the next ping goes out at once
