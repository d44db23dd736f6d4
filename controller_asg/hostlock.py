"""At most one acting controller per group on a host: an exclusive lock held for the process's life.

`flock` on `<HELIX_STATE_DIR>/controller/<group>.lock`, taken without waiting: the kernel drops
it when the holder exits, however it exits (SIGKILL included), so a crashed controller never
blocks the next one. The holder writes its pid into the file so a second controller can name it.
A dry run acts on nothing and takes no lock. Across hosts the same guarantee needs a lease (the
HA issue); the controller asks a `Fence` before every act, and this lock is the host's fence.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from typing import Protocol


class Fence(Protocol):
    def may_act(self) -> str:
        """'' when this controller may act now, else why not (one line)."""
        ...

    @property
    def epoch(self) -> int:
        """The leader lease's epoch held (controller_asg/lease.py); 0 for a fence without one."""
        ...


class AlwaysFence:
    """No fence (dry runs, tests of the pure parts)."""

    def may_act(self) -> str:
        return ""

    @property
    def epoch(self) -> int:
        return 0


class HostLockHeld(Exception):
    """Another controller holds the lock; the message names it."""


class HostLock:
    def __init__(self, state_dir: str, group: str):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", group)[:100]
        self.path = os.path.join(state_dir, "controller", f"{safe}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise HostLockHeld(
                    f"another controller ({who}) already acts for this group: it holds {self.path}; "
                    "stop it first, or run this one with --dry-run"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def may_act(self) -> str:
        return "" if self._fd is not None else f"the host lock {self.path} is not held"

    @property
    def epoch(self) -> int:
        return 0

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0
    except OSError:
        return 0
