"""The metrics table: a fixed-layout numpy structured array in one POSIX shared-memory segment,
or in one file mapped into memory in a private directory (HELIX_SHM_DIR).

Where. By default the table is the segment `/dev/shm/<name>` and its lock `/dev/shm/<name>.lock`.
With a directory (HELIX_SHM_DIR; the systemd units use their RuntimeDirectory /run/helix, a tmpfs)
they are `<dir>/<name>`, mapped with mmap, and `<dir>/<name>.lock`. The directory must be this
user's with mode 0700, checked on every open, and files are opened relative to the descriptor that
was checked: nobody else can plant, swap or read a file in it. Both backings expose the same
segment interface (`_Segment`), so everything from the layout down is one code path.

MonitorS owns it and writes the monitor part of the header and the rows; ControllerASG writes only
the controller part of the header; anyone may read. Layout: a HEADER_SIZE-byte header, then
`capacity` rows of ROW_DTYPE.

Locking. One `fcntl.flock` on the lock file `<name>.lock` beside the table: writers take it exclusive, readers shared.
The kernel drops a flock when its holder dies, even by SIGKILL, so a crashed holder can never
wedge the table. flock belongs to the open file description, so threads of one process also
serialise on a `threading.Lock`. Readers copy the bytes under the lock and decode the copy, so a
reader never sees a torn row or a row half old and half new; writers hold the lock only for the
few assignments of one update (MonitorS batches a poll cycle into chunks), so readers wait
microseconds. MonitorS also holds it exclusive while it creates the table, writing the magic last,
and `attach` checks the layout under it shared: a reader never takes a table being made for a
foreign one. A table whose creator died before its magic is 'not there yet' to readers, and the
next MonitorS replaces it.

Trust. Nothing read from the segment is taken at face value: a stray write or a bug elsewhere
can leave any byte anywhere, and one bad byte must not wedge every reader. A snapshot clamps a
high-water mark beyond the capacity, leaves every row that fails `check_rows` out of
`instances()` and describes it in `problems` (never raises), and reads a bad header number as 0,
'never written'. MonitorS, the rows' one writer, frees such rows when it starts (`repair`).

Lifecycle. Python 3.11's resource tracker unlinks every segment a process opened when that
process exits (and the creator's when the creator is SIGKILLed), which would wipe the registry on
every MonitorS crash and break every reader on exit. Helix unregisters each segment from the
tracker the moment it is opened, so nothing is unlinked behind anyone's back. The segment lives
until someone calls `MetricsTable.remove` (the demo and the tests do, at the end), an operator
resets it (`HELIX_SHM_RESET=1` when the layout changed), or the machine reboots (/dev/shm and /run
are tmpfs; agents then register again). A file-backed table has no tracker to keep away.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from functools import cached_property
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Protocol

import numpy as np

MAGIC = 0x31425458494C4548  # b"HELIXTB1" little-endian
# 2: the roster region after the rows (the controller's list of owned instances, which MonitorS
# registers against); a version-1 table is refused until HELIX_SHM_RESET=1 replaces it.
# 3: each row's lifecycle (launch and terminate hooks) and interruption notice; the roster's drain
# requests; the app's requests/s (`rps`). Still 3: no release shipped 3 without `rps`, and a table
# made before it is refused anyway by its row size.
LAYOUT_VERSION = 3
HEADER_SIZE = 1024
SHM_DIR = "/dev/shm"

ID_BYTES = 64
ADDRESS_BYTES = 64
ZONE_BYTES = 32
VERSION_BYTES = 16
DETAIL_BYTES = 40
ACTION_BYTES = 16
REASON_BYTES = 400
POLICY_BYTES = 16


class State(IntEnum):
    FREE = 0
    REGISTERING = 1  # registered, not polled successfully yet
    HEALTHY = 2
    UNHEALTHY = 3  # HELIX_UNHEALTHY_AFTER consecutive failed polls
    APP_DOWN = 4  # agent answers, app liveness probe fails

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Lifecycle(IntEnum):
    """Where an instance is between launch and terminate, beside its health (`State`). MonitorS
    writes it as it runs the agent's hooks; only IN_SERVICE instances serve, and only they give the
    policy CPU samples (a preparing app's CPU, or a draining one's falling CPU, says nothing about
    the load)."""

    NONE = 0  # registered, launch hook not started (not polled successfully yet)
    PREPARING = 1  # the launch hook (Prepare) runs
    IN_SERVICE = 2  # the launch hook said CONTINUE (or there is none)
    ABANDONED = 3  # the launch hook said ABANDON or timed out: a failed launch
    DRAINING = 4  # the controller asked for a drain; the terminate hook (Drain) runs
    DRAINED = 5  # the terminate hook ended (see HookResult): ready to terminate

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class HookResult(IntEnum):
    """How the last hook ended (ASG's lifecycle-action results, plus what the poller saw)."""

    NONE = 0
    CONTINUE = 1
    ABANDON = 2
    TIMEOUT = 3
    FAILED = 4  # the agent could not be asked (unreachable, or an error): nothing more to wait for

    @property
    def label(self) -> str:
        return self.name.lower()


class Notice(IntEnum):
    """What EC2 announced to the instance through its metadata (the agent reports it)."""

    NONE = 0
    REBALANCE = 1  # a rebalance recommendation: elevated risk of a Spot interruption
    INTERRUPTION = 2  # an instance action (Spot interruption): stopped or terminated at `notice_at`

    @property
    def label(self) -> str:
        return self.name.lower()


_HEADER_FIELDS = [
    ("magic", "<u8"),
    ("layout_version", "<u4"),
    ("capacity", "<u4"),
    ("row_size", "<u4"),
    ("high_water", "<u4"),  # rows at or past this index have never been used
    ("seq", "<u8"),  # bumped on every write
    # monitor section: written by MonitorS only
    ("monitor_pid", "<i4"),
    ("registered", "<u4"),
    ("monitor_started_at", "<f8"),
    ("monitor_heartbeat", "<f8"),
    ("poll_interval", "<f8"),
    ("cycle_seconds", "<f8"),
    # controller section: written by ControllerASG only
    ("controller_pid", "<i4"),
    ("desired", "<i4"),
    ("in_service", "<i4"),
    ("pending", "<i4"),
    ("controller_heartbeat", "<f8"),
    ("decision_at", "<f8"),
    ("frozen", "u1"),
    ("dry_run", "u1"),
    ("decision_action", f"S{ACTION_BYTES}"),
    ("decision_reason", f"S{REASON_BYTES}"),
    ("policy", f"S{POLICY_BYTES}"),
    # Added after LAYOUT_VERSION 1 shipped, carved out of the reserved tail so no earlier field
    # moves: a table made before them reads zeros here, which are the defaults.
    ("breaker", "u1"),  # 1 while the controller's launch breaker is tripped
    ("breaker_failures", "<u4"),  # consecutive failed launches
    ("billable", "<i4"),  # instances that may be billed, as the launch gate counts them
    ("max_instances", "<i4"),  # the maximum the controller enforces
    ("table_problems", "<u4"),  # bad rows the controller's last snapshot left out
    ("roster_count", "<u4"),  # entries in the roster region (written by ControllerASG with the region)
    ("roster_at", "<f8"),  # when ControllerASG last published the roster (0: never)
]
_header_core = np.dtype(_HEADER_FIELDS)
HEADER_DTYPE = np.dtype(_HEADER_FIELDS + [("_reserved", f"V{HEADER_SIZE - _header_core.itemsize}")])
assert HEADER_DTYPE.itemsize == HEADER_SIZE, "the header outgrew HEADER_SIZE: take fewer bytes from _reserved"

ROW_DTYPE = np.dtype(
    [
        ("instance_id", f"S{ID_BYTES}"),
        ("address", f"S{ADDRESS_BYTES}"),
        ("zone", f"S{ZONE_BYTES}"),
        ("agent_version", f"S{VERSION_BYTES}"),
        ("app_detail", f"S{DETAIL_BYTES}"),
        ("registered_at", "<f8"),
        ("last_seen", "<f8"),  # last successful poll (any answer)
        ("last_metrics", "<f8"),  # last metrics written
        ("sample_time", "<f8"),  # the agent's own clock at sampling
        ("net_rx", "<f8"),  # bytes/s
        ("net_tx", "<f8"),
        ("failures", "<u4"),  # consecutive failed polls
        ("app_down_polls", "<u4"),  # consecutive polls with the app not live
        ("cpu", "<f4"),  # 0..1 over the agent's last interval
        ("mem", "<f4"),  # 0..1
        ("disk", "<f4"),  # 0..1
        ("load1", "<f4"),
        ("load5", "<f4"),
        ("load15", "<f4"),
        ("poll_latency", "<f4"),  # seconds, last successful poll
        ("vcpus", "<u2"),
        ("app_port", "<u2"),  # where the instance's app listens (label app_port), 0 if unknown
        ("state", "u1"),
        ("app_live", "u1"),
        ("lifecycle", "u1"),  # Lifecycle
        ("hook_result", "u1"),  # HookResult of the last hook that ended
        ("notice", "u1"),  # Notice
        ("lifecycle_at", "<f8"),  # when the current lifecycle phase began
        ("notice_at", "<f8"),  # Notice.INTERRUPTION: when the instance goes (0: not said)
        ("hook_detail", f"S{DETAIL_BYTES}"),  # the last hook's own words, short
        # Requests/s the app served, from its own counter (the agent's HELIX_APP_METRICS_URL); 0 when
        # not configured. Last, so every earlier column keeps its offset.
        ("rps", "<f4"),
    ]
)
# The roster: every instance the controller's provider owns, as the cloud reports it. Written by
# ControllerASG only (each publish replaces it whole), read by MonitorS, which registers only
# instances on it, from the address on it.
ROSTER_DTYPE = np.dtype(
    [
        ("instance_id", f"S{ID_BYTES}"),
        ("address", f"S{ADDRESS_BYTES}"),  # "host" (EC2: the private IP) or "host:port" (local: the agent's)
        # SHA-256 of a per-instance secret the provider gave the agent (raw bytes: "V", since numpy's
        # "S" strips trailing NULs and a digest may end in one); `has_secret` 0: none.
        ("secret_digest", "V32"),
        ("has_secret", "u1"),
        ("state", "u1"),  # 1: on the roster
        # > 0: drain it (run its terminate hook) by then, epoch seconds; the controller terminates it
        # once drained. 0: keep it in service.
        ("drain_deadline", "<f8"),
    ]
)
# numpy types `names`/`fields` as Optional (None for a plain dtype); both structured dtypes have
# them, so they are checked once here and the narrowed values used below.
assert HEADER_DTYPE.names is not None and ROW_DTYPE.names is not None and ROW_DTYPE.fields is not None
_HEADER_NAMES: tuple[str, ...] = HEADER_DTYPE.names
_ROW_NAMES: tuple[str, ...] = ROW_DTYPE.names
_ROW_FIELDS = ROW_DTYPE.fields


class TableError(Exception):
    """Base class: every table error carries a one-line message."""


class TableNotFound(TableError):
    pass


class LayoutMismatch(TableError):
    pass


class NotPrivate(TableError):
    """The table's directory, segment or lock file is not this user's alone (planted by someone else?)."""


def check_private(fd: int, path: str, what: str) -> None:
    """Refuse a file another user owns or others may read or write, as sshd's StrictModes does:
    anyone who could plant the segment (or hold its lock) before MonitorS starts could feed the
    controller rows, or stall it. Raises NotPrivate with one line naming the file."""
    st = os.fstat(fd)
    uid = os.geteuid()
    if st.st_uid != uid:
        raise NotPrivate(
            f"{what} {path} is owned by uid {st.st_uid}, expected uid {uid} (this user): "
            "refusing it; remove it if it is not Helix's"
        )
    if st.st_mode & 0o077:
        raise NotPrivate(
            f"{what} {path} has mode {st.st_mode & 0o777:04o}, expected 0600 (only its owner may "
            f"read or write it): refusing it; remove it, or chmod 600 it if it is Helix's"
        )


def check_private_dir(fd: int, directory: str) -> None:
    """Refuse a table directory (HELIX_SHM_DIR) that is not this user's alone: whoever may enter or
    write it could plant the table or its lock before MonitorS creates them, or read the rows.
    Raises NotPrivate with one line naming it, its owner and mode, and what is expected."""
    st = os.fstat(fd)
    uid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid and not mode & 0o077:
        return
    fix = "chmod 700 it if it is Helix's" if st.st_uid == uid else "use a directory this user owns"
    raise NotPrivate(
        f"HELIX_SHM_DIR={directory}: directory owned by uid {st.st_uid} with mode {mode:04o}, expected one "
        f"owned by uid {uid} (this user) with mode 0700 (only its owner may enter it): refusing it; {fix}"
    )


def _open_private_dir(directory: str) -> int:
    """A descriptor on the table directory, checked by check_private_dir. A directory that is
    missing or cannot be opened is NotPrivate too: one line, and the processes exit 2 on it."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise NotPrivate(
            f"HELIX_SHM_DIR={directory}: cannot open it ({exc.strerror}), expected an existing directory "
            f"owned by uid {os.geteuid()} (this user) with mode 0700 (systemd: RuntimeDirectory=)"
        ) from None
    try:
        check_private_dir(fd, directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_in(directory: str, name: str, flags: int) -> int:
    """Open `name` (created 0600 with O_CREAT) where the table lives: /dev/shm, or the private
    directory, opened relative to the very descriptor that was checked, so the directory cannot be
    swapped between the check and the open."""
    if not directory:
        return os.open(os.path.join(SHM_DIR, name), flags, 0o600)
    dir_fd = _open_private_dir(directory)
    try:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _open_lock(name: str, directory: str = "", *, private: bool = True) -> int:
    """The lock file: created 0600 if absent, never followed through a symlink, and ours alone. A
    read-only look (`private` False) opens an existing one as it is."""
    if not private:
        return _open_in(directory, f"{name}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fd = _open_in(directory, f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        check_private(fd, lock_path(name, directory), "lock file")
    except BaseException:
        os.close(fd)
        raise
    return fd


class TableFull(TableError):
    pass


# ---------------------------------------------------------------------------------------------
# Row records


def encode_text(field_name: str, value: str, size: int) -> bytes:
    """UTF-8 encode for a fixed-size field; never silently cut, never a NUL (numpy strips them)."""
    data = value.encode("utf-8")
    if len(data) > size:
        raise ValueError(f"{field_name}: {value[:80]!r} is {len(data)} bytes, expected at most {size}")
    if b"\x00" in data:
        raise ValueError(f"{field_name}: {value[:80]!r} contains a NUL character, expected none")
    return data


def decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def clip_text(value: str, size: int) -> str:
    """For free-text details only (not identities): cut at a character boundary with an ellipsis."""
    data = value.replace("\x00", " ").encode("utf-8")
    if len(data) <= size:
        return value.replace("\x00", " ")
    return data[: size - 3].decode("utf-8", errors="ignore") + "…"


# Derived from the layout, so a column added to ROW_DTYPE is encoded and checked without edits here.
_TEXT_FIELDS = {name: ROW_DTYPE[name].itemsize for name in _ROW_NAMES if ROW_DTYPE[name].kind == "S"}
_INT_FIELDS = {name for name in _ROW_NAMES if ROW_DTYPE[name].kind in "ui"}


@dataclass
class InstanceRow:
    """One instance as the table holds it (decoded)."""

    instance_id: str
    address: str
    state: State = State.REGISTERING
    zone: str = ""
    agent_version: str = ""
    app_detail: str = ""
    registered_at: float = 0.0
    last_seen: float = 0.0
    last_metrics: float = 0.0
    sample_time: float = 0.0
    net_rx: float = 0.0
    net_tx: float = 0.0
    failures: int = 0
    app_down_polls: int = 0
    cpu: float = 0.0
    mem: float = 0.0
    disk: float = 0.0
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    poll_latency: float = 0.0
    vcpus: int = 0
    app_port: int = 0
    app_live: bool = False
    lifecycle: Lifecycle = Lifecycle.NONE
    hook_result: HookResult = HookResult.NONE
    notice: Notice = Notice.NONE
    lifecycle_at: float = 0.0
    notice_at: float = 0.0
    hook_detail: str = ""
    rps: float = 0.0

    def to_record(self) -> tuple:
        """The row as a tuple in ROW_DTYPE order; raises ValueError naming a field that does not fit."""
        values = []
        for name in _ROW_NAMES:
            value = getattr(self, name)
            if name in _TEXT_FIELDS:
                value = encode_text(name, value, _TEXT_FIELDS[name])
            elif name in _INT_FIELDS:
                value = int(value)
                limit = np.iinfo(ROW_DTYPE[name]).max
                if not 0 <= value <= limit:
                    raise ValueError(f"{name}: {value} expected an integer from 0 to {limit}")
            values.append(value)
        return tuple(values)

    @classmethod
    def from_record(cls, rec: np.void) -> InstanceRow:
        kwargs: dict[str, Any] = {}  # one type per field, as `fields(cls)` declares them
        for f in fields(cls):
            value = rec[f.name]
            if f.name in _TEXT_FIELDS:
                kwargs[f.name] = decode_text(bytes(value))
            elif f.name in _ENUM_FIELDS:
                kwargs[f.name] = _ENUM_FIELDS[f.name](int(value))
            elif f.name == "app_live":
                kwargs[f.name] = bool(value)
            elif f.name in _INT_FIELDS:
                kwargs[f.name] = int(value)
            else:
                kwargs[f.name] = float(value)
        return cls(**kwargs)


@dataclass(slots=True)
class PollSample:
    """One answered poll as MonitorS writes it (`MetricsTable.write_samples`): the agent's metrics
    and the row's health after it. `slot` is where MonitorS holds `instance_id`."""

    slot: int
    instance_id: str
    state: State
    app_down_polls: int
    poll_latency: float  # seconds
    cpu: float  # written clipped to 0..1
    mem: float
    disk: float
    load1: float
    load5: float
    load15: float
    net_rx: float
    net_tx: float
    sample_time: float
    vcpus: int  # written capped at 65535
    app_live: bool
    app_detail: str  # written clipped to DETAIL_BYTES
    notice: Notice = Notice.NONE  # what the instance's metadata announced (the agent reports it)
    notice_at: float = 0.0  # Notice.INTERRUPTION: when it goes, epoch seconds (0: not said)
    rps: float = 0.0  # the app's requests/s (the agent's HELIX_APP_METRICS_URL); written capped at 1e9


@dataclass(slots=True)
class PollFailure:
    """One failed poll as MonitorS writes it (`MetricsTable.mark_failures`)."""

    slot: int
    instance_id: str
    state: State
    failures: int


# ---------------------------------------------------------------------------------------------
# Validation: what a reader trusts
#
# The table is plain bytes in shared memory: a bug, a stray write or a damaged page can leave any
# value in any field, and no reader may wedge on one. A snapshot therefore checks its rows (once, on
# first use: most readers never look at every row) and leaves a bad row out of `instances()`,
# describing it in `problems` instead of raising. A clean table, the common case, costs a few
# whole-array reductions; the per-row work runs only when one of them trips.

# Bounds for every float column of a live row: finite and within [low, high]. cpu/mem/disk are 0..1
# ratios (1.5 leaves room for an agent's rounding without letting nonsense through); the rest are
# times, rates, loads and latencies: finite and >= 0. Derived from the layout, so a float column
# added to ROW_DTYPE is checked without edits here.
RATIO_MAX = 1.5
ROW_BOUNDS: dict[str, tuple[float, float]] = {
    name: (0.0, RATIO_MAX if name in ("cpu", "mem", "disk") else float(np.finfo(ROW_DTYPE[name]).max))
    for name in _ROW_NAMES
    if ROW_DTYPE[name].kind == "f"
}
# MonitorS keys its registry by the id and dials the address: neither may be empty, hold a NUL or
# fail to decode (a replacement character would name a different instance).
_IDENTITY_FIELDS = ("instance_id", "address")
# _identity_shape reads both in one pass: two adjacent 64-byte columns, each packed into one word.
_IDENTITY_SPAN = slice(_ROW_FIELDS["instance_id"][1], _ROW_FIELDS["instance_id"][1] + 2 * 64)
assert [_ROW_FIELDS[name][:2] for name in _IDENTITY_FIELDS] == [
    (np.dtype("S64"), _IDENTITY_SPAN.start),
    (np.dtype("S64"), _IDENTITY_SPAN.start + 64),
], "identity columns moved"
_ENUM_FIELDS: dict[str, type[IntEnum]] = {
    "state": State,
    "lifecycle": Lifecycle,
    "hook_result": HookResult,
    "notice": Notice,
}
_ENUM_MAX = {name: int(max(enum)) for name, enum in _ENUM_FIELDS.items()}
_ENUM_EXPECTED = {
    name: f"a {name.replace('_', ' ')} from 0 to {_ENUM_MAX[name]} ({', '.join(m.label for m in enum)})"  # type: ignore[attr-defined]
    for name, enum in _ENUM_FIELDS.items()
}
_HEADER_FLOATS = tuple(name for name in _HEADER_NAMES if HEADER_DTYPE[name].kind == "f")


def _float_runs() -> list[tuple[int, int, np.dtype, int]]:
    """Consecutive float columns of one type and one bound, as (byte offset, byte length, unsigned
    type of the column's width, bit pattern of the bound). For numbers >= +0 the IEEE bit patterns
    sort like the numbers, and every negative number, inf and NaN has a pattern above any finite
    positive bound, so one unsigned max() per run tells whether all its values are in [0, bound].
    (-0.0 fails this quick test too; the exact per-column test then accepts it.)"""
    runs: list[tuple[int, int, np.dtype, int]] = []
    for name, (low, high) in ROW_BOUNDS.items():
        assert low == 0.0, "the bit-pattern test needs a lower bound of 0"
        dtype, offset = _ROW_FIELDS[name][:2]
        uint = np.dtype(f"<u{dtype.itemsize}")
        bits = int(np.array(high, dtype=dtype).view(uint))
        if runs and runs[-1][0] + runs[-1][1] == offset and runs[-1][2] == uint and runs[-1][3] == bits:
            runs[-1] = (runs[-1][0], runs[-1][1] + dtype.itemsize, uint, bits)
        else:
            runs.append((offset, dtype.itemsize, uint, bits))
    return runs


_FLOAT_RUNS = _float_runs()


def _byte_view(rows: np.ndarray) -> np.ndarray:
    """The rows as an (n, row size) uint8 array, sharing their memory."""
    return rows.view(np.uint8).reshape(len(rows), ROW_DTYPE.itemsize)


def _text_bytes(raw: np.ndarray, name: str) -> np.ndarray:
    offset = _ROW_FIELDS[name][1]
    return raw[:, offset : offset + ROW_DTYPE[name].itemsize]


def _identity_shape(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the identity columns, per row and column: (empty, NUL inside). One bit per byte, set
    where the byte is not NUL, first byte highest, packs a 64-byte field into one uint64. numpy pads
    a value with trailing NULs, so a well-formed one is 1s then 0s: its complement is 0s then 1s,
    one less than a power of two; any other pattern has a NUL before a non-NUL byte."""
    bits = np.packbits(raw[:, _IDENTITY_SPAN] != 0, axis=1).view(">u8")
    rest = ~bits
    return bits == 0, (rest & (rest + np.uint64(1))) != 0


def _looks_clean(rows: np.ndarray, raw: np.ndarray, occupied: np.ndarray) -> bool:
    """True if no occupied row can fail a check, decided by whole-array reductions only."""
    for name, top in _ENUM_MAX.items():
        if rows[name].max() > top:
            return False
    for offset, length, uint, bits in _FLOAT_RUNS:
        if raw[:, offset : offset + length].view(uint).max() > bits:
            return False
    if raw[:, _IDENTITY_SPAN].max() >= 0x80:  # not ASCII: whether it is valid UTF-8 is decided row by row
        return False
    empty, nul_inside = _identity_shape(raw)
    return not (nul_inside.any() or (empty & occupied[:, None]).any())


@dataclass(frozen=True)
class RowProblem:
    """Why an occupied row was left out: the first of its fields that fails a check."""

    slot: int
    field: str
    value: str  # as found, printable
    expected: str
    instance_id: str = ""  # the row's id as far as it decodes, to help find it; "" when the id is the problem

    def __str__(self) -> str:
        who = f" ({self.instance_id})" if self.instance_id else ""
        return f"slot {self.slot}{who}: {self.field} {self.value}, expected {self.expected}"


@dataclass(frozen=True)
class RowCheck:
    good: np.ndarray  # bool per row: occupied and passes every check
    problems: tuple[RowProblem, ...]  # one per occupied row that does not, by slot


def _shown(value: object) -> str:
    if isinstance(value, bytes):
        return repr(value)[:80]
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _row_problem(rows: np.ndarray, slot: int, name: str, expected: str) -> RowProblem:
    value = rows[name][slot]
    value = bytes(value) if name in _TEXT_FIELDS else value.item()
    who = "" if name == "instance_id" else repr(decode_text(bytes(rows["instance_id"][slot])))[:80]
    return RowProblem(slot, name, _shown(value), expected, who)


def check_rows(rows: np.ndarray) -> RowCheck:
    """Validate rows (a contiguous ROW_DTYPE array; slot = index) without raising: state known,
    identities non-empty UTF-8 without NUL, every float within ROW_BOUNDS. Free rows are not checked."""
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)  # the checks read the rows as one byte array
    occupied = rows["state"] != State.FREE
    if not len(rows):
        return RowCheck(occupied, ())
    raw = _byte_view(rows)
    if _looks_clean(rows, raw, occupied):
        return RowCheck(occupied, ())
    # (field, failing rows, expected), in the order a row is described: its first failure names it.
    failing: list[tuple[str, np.ndarray, str]] = [
        (name, rows[name] > top, _ENUM_EXPECTED[name]) for name, top in _ENUM_MAX.items()
    ]
    empty, nul_inside = _identity_shape(raw)
    for column, name in enumerate(_IDENTITY_FIELDS):
        failing.append((name, empty[:, column], "a non-empty value"))
        failing.append((name, nul_inside[:, column], "no NUL byte inside"))
    for name, (low, high) in ROW_BOUNDS.items():
        values = rows[name]
        bounded = high < np.finfo(values.dtype).max
        within = f"a number from {low:g} to {high:g}" if bounded else f"a finite number >= {low:g}"
        failing.append((name, ~((values >= low) & (values <= high)), within))
    problems: list[RowProblem] = []
    done = ~occupied  # free rows, and rows already described
    for name, fails, expected in failing:
        hit = fails & ~done
        for slot in np.flatnonzero(hit):
            problems.append(_row_problem(rows, int(slot), name, expected))
        done |= hit
    # UTF-8: only a row with a byte >= 0x80 in an identity can fail, so only those are decoded.
    for name in _IDENTITY_FIELDS:
        for slot in np.flatnonzero(~done & (_text_bytes(raw, name).max(axis=1) >= 0x80)):
            try:
                bytes(rows[name][slot]).decode("utf-8")
            except UnicodeDecodeError:
                problems.append(_row_problem(rows, int(slot), name, "valid UTF-8"))
                done[slot] = True
    problems.sort(key=lambda p: p.slot)
    return RowCheck(~done, tuple(problems))


def _sane_time(value: float) -> float:
    """A header number as readers may use it: non-finite or negative reads as 0, 'never written'."""
    return value if math.isfinite(value) and value >= 0.0 else 0.0


@dataclass
class MonitorStatus:
    pid: int
    registered: int
    started_at: float
    heartbeat: float
    poll_interval: float
    cycle_seconds: float

    def heartbeat_age(self, now: float) -> float:
        """Seconds since the heartbeat; inf if there is none (0) or it is no time at all (NaN, inf)."""
        if not (math.isfinite(self.heartbeat) and self.heartbeat > 0):
            return float("inf")
        return now - self.heartbeat

    def alive(self, now: float, intervals: float = 3.0) -> bool:
        """MonitorS counts as alive while its heartbeat is younger than `intervals` poll intervals.
        A heartbeat as far in the future is no sign of life either: a damaged value must not keep a
        dead MonitorS 'alive' forever (a clock stepped back only costs one poll interval). MonitorS
        always writes an interval > 0 with its heartbeat, so without one there is no life to judge."""
        if not (math.isfinite(self.poll_interval) and self.poll_interval > 0):
            return False
        window = intervals * self.poll_interval
        return -window <= self.heartbeat_age(now) <= window


@dataclass
class ControllerStatus:
    pid: int = 0
    desired: int = 0
    in_service: int = 0
    pending: int = 0
    heartbeat: float = 0.0
    decision_at: float = 0.0
    frozen: bool = False
    dry_run: bool = False
    action: str = ""
    reason: str = ""
    policy: str = ""
    breaker: bool = False  # launch breaker tripped
    breaker_failures: int = 0  # consecutive failed launches
    billable: int = 0  # instances that may be billed, as the launch gate counts them
    max_instances: int = 0  # the maximum the controller enforces (0: not written by this controller)
    table_problems: int = 0  # bad rows the controller's last snapshot left out


@dataclass(frozen=True)
class RosterEntry:
    """One instance the controller's provider owns: where it is, and how it proves who it is."""

    instance_id: str
    address: str  # "host" (any port) or "host:port"
    secret_digest: bytes = b""  # SHA-256 of the per-instance secret its agent was given; b"": none
    drain_deadline: float = 0.0  # > 0: drain it by then (epoch seconds); 0: keep it in service

    def to_record(self) -> tuple[bytes, bytes, bytes, int, int, float]:
        if len(self.secret_digest) not in (0, 32):
            raise ValueError(f"secret_digest: {len(self.secret_digest)} bytes, expected 0 or 32 (SHA-256)")
        if not (math.isfinite(self.drain_deadline) and self.drain_deadline >= 0):
            raise ValueError(f"drain_deadline: {self.drain_deadline!r}, expected a time >= 0")
        return (
            encode_text("instance_id", self.instance_id, ID_BYTES),
            encode_text("address", self.address, ADDRESS_BYTES),
            self.secret_digest.ljust(32, b"\0"),
            1 if self.secret_digest else 0,
            1,
            self.drain_deadline,
        )

    @property
    def host(self) -> str:
        """The host part: the address itself, or what is before its port."""
        if self.address.startswith("["):
            return self.address[1:].partition("]")[0]
        if self.address.count(":") == 1:
            return self.address.rpartition(":")[0]
        return self.address

    @property
    def port(self) -> int | None:
        if self.address.startswith("["):
            rest = self.address.partition("]")[2]
            return int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        if self.address.count(":") == 1:
            port = self.address.rpartition(":")[2]
            return int(port) if port.isascii() and port.isdigit() else None
        return None


@dataclass(frozen=True)
class Roster:
    published_at: float  # 0.0: the controller never published one
    entries: dict[str, RosterEntry]


@dataclass
class Snapshot:
    """A consistent, private copy of the table. `rows` holds every used slot (free ones too, below
    the high-water mark, itself clamped to the capacity). Nothing in the copy is trusted:
    `live`, `live_slots` and `instances()` hold only occupied rows that pass `check_rows`;
    `problems` describes, one line each, what was left out; `header_problems` what is wrong in the
    header (`monitor` and `controller` read a bad number there as 0, 'never written'). Row checks
    run once, on first use, so taking a snapshot stays a lock and a byte copy."""

    header: np.void
    rows: np.ndarray
    seq: int

    @property
    def occupied(self) -> np.ndarray:
        """Every occupied row, bad ones included: not for decoding."""
        return self.rows[self.rows["state"] != State.FREE]

    @cached_property
    def _check(self) -> RowCheck:
        return check_rows(self.rows)

    @property
    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self._check.good)

    @property
    def live(self) -> np.ndarray:
        return self.rows[self._check.good]

    def instances(self) -> list[InstanceRow]:
        return [InstanceRow.from_record(rec) for rec in self.live]

    @property
    def row_problems(self) -> tuple[RowProblem, ...]:
        return self._check.problems

    @property
    def problems(self) -> tuple[str, ...]:
        """What this snapshot left out, one line each: rows past a high-water mark beyond the
        capacity, then every occupied row that fails a check (see `row_problems`)."""
        return self._clamp_problems + tuple(str(p) for p in self._check.problems)

    @property
    def _clamp_problems(self) -> tuple[str, ...]:
        high_water = int(self.header["high_water"])
        if high_water <= len(self.rows):
            return ()
        return (
            f"header: high_water {high_water}, expected at most the capacity {len(self.rows)}; "
            f"read the first {len(self.rows)} rows",
        )

    @cached_property
    def header_problems(self) -> tuple[str, ...]:
        """Header fields a reader cannot take at face value, one line each."""
        h = self.header
        out = list(self._clamp_problems)
        for name in _HEADER_FLOATS:
            value = float(h[name])
            if not (math.isfinite(value) and value >= 0.0):
                out.append(f"header: {name} {value!r}, expected a finite number >= 0")
        if _sane_time(float(h["monitor_heartbeat"])) > 0 and float(h["poll_interval"]) == 0.0:
            out.append("header: poll_interval 0.0, expected a number > 0 once MonitorS writes heartbeats")
        registered, occupied = int(h["registered"]), int(np.count_nonzero(self.rows["state"]))
        if registered != occupied:
            out.append(f"header: registered {registered}, expected {occupied} (the occupied rows)")
        return tuple(out)

    @property
    def header_ok(self) -> bool:
        return not self.header_problems

    @property
    def monitor(self) -> MonitorStatus:
        h = self.header
        return MonitorStatus(
            int(h["monitor_pid"]),
            int(h["registered"]),
            _sane_time(float(h["monitor_started_at"])),
            _sane_time(float(h["monitor_heartbeat"])),
            _sane_time(float(h["poll_interval"])),
            _sane_time(float(h["cycle_seconds"])),
        )

    @property
    def controller(self) -> ControllerStatus:
        h = self.header
        return ControllerStatus(
            pid=int(h["controller_pid"]),
            desired=int(h["desired"]),
            in_service=int(h["in_service"]),
            pending=int(h["pending"]),
            heartbeat=_sane_time(float(h["controller_heartbeat"])),
            decision_at=_sane_time(float(h["decision_at"])),
            frozen=bool(h["frozen"]),
            dry_run=bool(h["dry_run"]),
            action=decode_text(bytes(h["decision_action"])),
            reason=decode_text(bytes(h["decision_reason"])),
            policy=decode_text(bytes(h["policy"])),
            breaker=bool(h["breaker"]),
            breaker_failures=int(h["breaker_failures"]),
            billable=int(h["billable"]),
            max_instances=int(h["max_instances"]),
            table_problems=int(h["table_problems"]),
        )

    @property
    def capacity(self) -> int:
        return int(self.header["capacity"])


# ---------------------------------------------------------------------------------------------
# The table


def segment_size(capacity: int) -> int:
    return HEADER_SIZE + capacity * (ROW_DTYPE.itemsize + ROSTER_DTYPE.itemsize)


def roster_offset(capacity: int) -> int:
    return HEADER_SIZE + capacity * ROW_DTYPE.itemsize


def segment_path(name: str, directory: str = "") -> str:
    """Where the table's bytes are: the POSIX segment /dev/shm/<name>, or the file <directory>/<name>."""
    return os.path.join(directory or SHM_DIR, name)


def lock_path(name: str, directory: str = "") -> str:
    return os.path.join(directory or SHM_DIR, f"{name}.lock")


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # See the module docstring: the tracker would unlink the segment when this process exits.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]  # noqa: SLF001 (the tracker's own key)


class _Segment(Protocol):
    """What MetricsTable uses of a SharedMemory, and all it uses: _MappedFile offers the same."""

    @property
    def buf(self) -> memoryview | None: ...

    @property
    def size(self) -> int: ...

    def close(self) -> None: ...


class _MappedFile:
    """The table as a file in the private directory, mapped shared: every process that maps it sees
    every write at once, as with a segment. Takes `fd` over once constructed (closes it on close)."""

    def __init__(self, path: str, fd: int):
        self.name = os.path.basename(path)
        self.path = path
        self.size = os.fstat(fd).st_size
        # An empty file (a creator between O_CREAT and ftruncate) cannot be mapped: it reads as no
        # bytes, which _check_layout turns into a one-line LayoutMismatch, as for a short segment.
        self._mmap = mmap.mmap(fd, self.size) if self.size else None
        self._buf: memoryview | None = memoryview(self._mmap if self._mmap is not None else b"")
        self._fd = fd

    @property
    def buf(self) -> memoryview | None:
        return self._buf  # None once closed, as SharedMemory's

    def close(self) -> None:
        if self._buf is None:
            return
        self._buf.release()  # BufferError while a numpy view still uses it, as with SharedMemory
        self._buf = None
        if self._mmap is not None:
            self._mmap.close()
        os.close(self._fd)


def _open_segment(name: str, directory: str, *, private: bool) -> _Segment | None:
    """The existing table's bytes, None if there are none. With `private`, NotPrivate unless they
    are this user's alone."""
    if directory:
        return _open_file_segment(name, directory, private)
    try:
        shm = shared_memory.SharedMemory(name=name, create=False)
    except FileNotFoundError:
        return None
    _untrack(shm)
    try:
        if private:
            check_private(shm._fd, segment_path(name), "metrics table")  # type: ignore[attr-defined]  # noqa: SLF001 - SharedMemory keeps its fd private
    except BaseException:
        shm.close()
        raise
    return shm


def _open_file_segment(name: str, directory: str, private: bool) -> _MappedFile | None:
    path = segment_path(name, directory)
    try:
        fd = _open_in(directory, name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if private:
            check_private(fd, path, "metrics table")
        return _MappedFile(path, fd)
    except BaseException:
        os.close(fd)
        raise


def _create_segment(name: str, directory: str, size: int) -> _Segment:
    """A new table of `size` zero bytes, 0600, created exclusively: never one someone planted first."""
    if not directory:
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        _untrack(shm)
        return shm
    path = segment_path(name, directory)
    fd = _open_in(directory, name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)  # reads as zeros, like a new segment
        return _MappedFile(path, fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)  # no half-made table left for the next start to trip on
        raise


def _unlink_segment(name: str, directory: str) -> bool:
    """Unlink the table's bytes (never the lock); True if they were there."""
    if directory:
        try:
            os.unlink(segment_path(name, directory))
        except FileNotFoundError:
            return False
        return True
    try:
        shm = shared_memory.SharedMemory(name=name, create=False)
    except FileNotFoundError:
        return False
    shm.close()
    shm.unlink()  # balances the tracker registration the open made
    return True


def _half_made(shm: _Segment) -> bool:
    """A table whose creator has not finished it, or never will: no room for a header yet, or no
    magic yet (open_or_create writes the magic last)."""
    if shm.size < HEADER_SIZE:
        return True
    header = np.ndarray((), dtype=HEADER_DTYPE, buffer=shm.buf)
    magic = int(header["magic"])
    del header  # release the exported buffer so the segment can be closed
    return magic == 0


class _Writer:
    """What a writer sees inside `MetricsTable.writing()`: live views into the segment."""

    def __init__(self, header: np.ndarray, rows: np.ndarray):
        self.header = header  # shape-() structured view
        self.rows = rows

    @property
    def high_water(self) -> int:
        return int(self.header["high_water"])

    def used(self) -> np.ndarray:
        return self.rows[: self.high_water]


class MetricsTable:
    """One process's handle on the table. Not for sharing across fork()."""

    def __init__(self, name: str, shm: _Segment, lock_fd: int, capacity: int):
        self.name = name
        self._shm = shm
        self._closed = False
        self._lock_fd = lock_fd
        self._thread_lock = threading.Lock()
        self.capacity = capacity
        self._size = segment_size(capacity)
        self._header = np.ndarray((), dtype=HEADER_DTYPE, buffer=shm.buf, offset=0)
        self._rows = np.ndarray((capacity,), dtype=ROW_DTYPE, buffer=shm.buf, offset=HEADER_SIZE)
        self._roster = np.ndarray((capacity,), dtype=ROSTER_DTYPE, buffer=shm.buf, offset=roster_offset(capacity))

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def attach(cls, name: str, *, private: bool = True, directory: str = "") -> MetricsTable:
        """Attach to an existing table (ControllerASG; readers) in /dev/shm, or in `directory`
        (HELIX_SHM_DIR). Raises TableNotFound, LayoutMismatch, or NotPrivate when the directory is
        not this user's alone, or the segment or its lock is not (`private`, the default; a
        read-only look such as `inspect` may pass False, which still checks the directory)."""
        shm: _Segment | None = _open_segment(name, directory, private=private)
        if shm is None:
            raise TableNotFound(f"no metrics table '{name}' in {directory or SHM_DIR} (is MonitorS running?)")
        lock_fd = -1
        try:
            lock_fd = _open_lock(name, directory, private=private)
            # MonitorS holds the lock exclusive from before it creates the segment until the header
            # is whole (open_or_create), so under the shared lock a table is complete or absent. The
            # first look may have caught it being made (mapped at size 0, or magic not yet written):
            # it only said that a table is there; look again under the lock.
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
            try:
                shm.close()
                shm = _open_segment(name, directory, private=private)
                if shm is None:
                    raise TableNotFound(f"no metrics table '{name}' in {directory or SHM_DIR} (removed meanwhile)")
                if _half_made(shm):
                    raise TableNotFound(
                        f"table '{name}' is half-made (its creator stopped before writing its header); "
                        "MonitorS replaces it when it starts"
                    )
                capacity = cls._check_layout(name, shm)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except BaseException:
            if shm is not None:
                shm.close()
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        return cls(name, shm, lock_fd, capacity)

    @classmethod
    def open_or_create(
        cls, name: str, capacity: int, *, reset: bool = False, pid: int = 0, directory: str = ""
    ) -> MetricsTable:
        """MonitorS: re-attach a table whose layout matches (the registry survives a restart), or
        create one, in /dev/shm or in `directory`. A mismatched layout raises LayoutMismatch unless
        `reset` is set; a directory, segment or lock file that is not this user's alone raises
        NotPrivate (reset does not help: remove it)."""
        lock_fd = _open_lock(name, directory)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                table = cls._open_or_create_locked(name, capacity, reset, lock_fd, directory)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(lock_fd)
            raise
        return table

    @classmethod
    def _open_or_create_locked(
        cls, name: str, capacity: int, reset: bool, lock_fd: int, directory: str
    ) -> MetricsTable:
        shm = _open_segment(name, directory, private=True)
        if shm is not None and _half_made(shm):
            # A creator that died between making the segment and writing its magic (the magic is
            # written last, under this lock): nothing was ever registered in it, so replacing it
            # loses nothing and needs no HELIX_SHM_RESET.
            shm.close()
            _unlink_segment(name, directory)
            shm = None
        if shm is not None:
            try:
                found = cls._check_layout(name, shm, expected_capacity=capacity)
            except LayoutMismatch:
                shm.close()
                if not reset:
                    raise
                _unlink_segment(name, directory)
            else:
                return cls(name, shm, lock_fd, found)
        shm = _create_segment(name, directory, segment_size(capacity))
        table = cls(name, shm, lock_fd, capacity)
        h = table._header
        h["layout_version"] = LAYOUT_VERSION
        h["capacity"] = capacity
        h["row_size"] = ROW_DTYPE.itemsize
        h["magic"] = MAGIC  # last: a reader that sees the magic sees a complete header
        return table

    @staticmethod
    def _check_layout(name: str, shm: _Segment, expected_capacity: int | None = None) -> int:
        if shm.size < HEADER_SIZE:
            raise LayoutMismatch(
                f"table '{name}': segment is {shm.size} bytes, smaller than a header; "
                "set HELIX_SHM_RESET=1 to replace it"
            )
        header = np.ndarray((), dtype=HEADER_DTYPE, buffer=shm.buf)
        magic, version = int(header["magic"]), int(header["layout_version"])
        capacity, row_size = int(header["capacity"]), int(header["row_size"])
        del header  # release the exported buffer so the segment can be closed
        problems = []
        if magic != MAGIC:
            problems.append(f"magic {magic:#x}, expected {MAGIC:#x}")
        elif version != LAYOUT_VERSION:
            problems.append(f"layout version {version}, expected {LAYOUT_VERSION}")
        elif row_size != ROW_DTYPE.itemsize:
            problems.append(f"row size {row_size}, expected {ROW_DTYPE.itemsize}")
        elif expected_capacity is not None and capacity != expected_capacity:
            problems.append(f"capacity {capacity}, expected HELIX_SHM_CAPACITY={expected_capacity}")
        elif shm.size < segment_size(capacity):
            problems.append(f"segment of {shm.size} bytes, expected {segment_size(capacity)}")
        if problems:
            raise LayoutMismatch(
                f"table '{name}' has {problems[0]}; set HELIX_SHM_RESET=1 to replace it (agents register again)"
            )
        return capacity

    def close(self) -> None:
        """Detach. Never unlinks: the table outlives every process but its remover."""
        if self._closed:
            return
        del self._header, self._rows, self._roster
        self._shm.close()
        self._closed = True
        os.close(self._lock_fd)

    @staticmethod
    def remove(name: str, directory: str = "") -> bool:
        """Unlink the table and its lock file (in /dev/shm, or in `directory`); True if a table was
        there. A cleanup: a directory already gone is no error, and it is not checked."""
        found = _unlink_segment(name, directory)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(name, directory))
        return found

    def __enter__(self) -> MetricsTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, mode)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def writing(self) -> Iterator[_Writer]:
        """Exclusive access to the live segment; the sequence number is bumped on the way out.
        Keep the body short: readers wait for it."""
        with self._locked(fcntl.LOCK_EX):
            try:
                yield _Writer(self._header, self._rows)
            finally:
                self._header["seq"] += 1

    # -- reading ---------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A consistent private copy: header plus every row below the high-water mark. Never raises
        because of what the table holds: a mark beyond the capacity is read as the capacity (and
        reported in `Snapshot.problems`), and rows are checked by the snapshot, not here."""
        buf = self._shm.buf
        assert buf is not None, f"table '{self.name}' is closed"  # SharedMemory drops its buffer only on close()
        with self._locked(fcntl.LOCK_SH):
            high_water = min(int(self._header["high_water"]), self.capacity)
            data = bytes(buf[: HEADER_SIZE + high_water * ROW_DTYPE.itemsize])
        header = np.frombuffer(data, dtype=HEADER_DTYPE, count=1)[0]
        rows = np.frombuffer(data, dtype=ROW_DTYPE, count=high_water, offset=HEADER_SIZE)
        return Snapshot(header=header, rows=rows, seq=int(header["seq"]))

    # -- MonitorS's writes -----------------------------------------------------------------------

    def register(self, row: InstanceRow) -> int:
        """Put `row` in the slot that already holds its id, else in the first free slot. Returns the
        slot. Raises TableFull, or ValueError for a field that does not fit (nothing written)."""
        record = row.to_record()  # validate before taking the lock
        key = record[0]
        with self.writing() as w:
            used = w.used()
            same = np.flatnonzero((used["instance_id"] == key) & (used["state"] != State.FREE))
            if same.size:
                slot = int(same[0])
            else:
                free = np.flatnonzero(used["state"] == State.FREE)
                if free.size:
                    slot = int(free[0])
                elif w.high_water < self.capacity:
                    slot = w.high_water
                    w.header["high_water"] = slot + 1
                else:
                    raise TableFull(
                        f"table '{self.name}' is full: all {self.capacity} rows in use (raise HELIX_SHM_CAPACITY)"
                    )
            was_new = w.rows[slot]["state"] == State.FREE
            w.rows[slot] = record
            if was_new:
                w.header["registered"] += 1
        return slot

    def free(self, instance_id: str) -> bool:
        """Free the row of `instance_id`; False if it had none."""
        key = encode_text("instance_id", instance_id, ID_BYTES)
        with self.writing() as w:
            used = w.used()
            hit = np.flatnonzero((used["instance_id"] == key) & (used["state"] != State.FREE))
            if not hit.size:
                return False
            w.rows[int(hit[0])] = np.zeros((), dtype=ROW_DTYPE)
            w.header["registered"] -= 1
        return True

    def repair(self) -> list[str]:
        """MonitorS at start, before it resumes the rows: make the table one it can trust again.
        A high-water mark beyond the capacity is clamped (or raised over occupied rows past it: the
        mark was damaged, not the rows); every occupied row that fails `check_rows`, or repeats an
        earlier row's instance_id (MonitorS keys its registry by id, so the copy would never be
        polled nor freed), is freed; `registered` is recounted. Returns one line per change."""
        notes: list[str] = []
        with self.writing() as w:
            stated = w.high_water
            high_water = min(stated, self.capacity)
            if stated > self.capacity:
                notes.append(f"high_water {stated} is beyond the capacity {self.capacity}: clamped to {high_water}")
            beyond = np.flatnonzero(w.rows["state"][high_water:] != State.FREE)
            if beyond.size:
                raised = high_water + int(beyond[-1]) + 1
                notes.append(
                    f"high_water {high_water} leaves out occupied rows up to slot {raised - 1}: raised to {raised}"
                )
                high_water = raised
            w.header["high_water"] = high_water
            rows = w.rows[:high_water]
            check = check_rows(rows)
            freed = [(p.slot, str(p)) for p in check.problems]
            ids = rows["instance_id"]
            first_slot: dict[bytes, int] = {}
            for slot in map(int, np.flatnonzero(check.good)):  # once per start: a plain loop reads best
                key = bytes(ids[slot])
                if key in first_slot:
                    freed.append(
                        (
                            slot,
                            f"slot {slot} ({decode_text(key)!r}): instance_id repeats slot "
                            f"{first_slot[key]}'s, expected each id once",
                        )
                    )
                else:
                    first_slot[key] = slot
            for slot, why in sorted(freed):
                rows[slot] = np.zeros((), dtype=ROW_DTYPE)
                notes.append(f"freed {why}")
            registered = int(np.count_nonzero(rows["state"]))
            if int(w.header["registered"]) != registered:
                notes.append(f"registered {int(w.header['registered'])} recounted as {registered}")
                w.header["registered"] = registered
        return notes

    def update_registration(
        self, slot: int, instance_id: str, vcpus: int, agent_version: str, zone: str, app_port: int
    ) -> bool:
        """An agent registered again from the same address: refresh what it reports about itself,
        leaving its state, counts and metrics alone. False (nothing written) if the slot no longer
        holds `instance_id`; ValueError for a field that does not fit (nothing written)."""
        version_bytes = encode_text("agent_version", agent_version, VERSION_BYTES)
        zone_bytes = encode_text("zone", zone, ZONE_BYTES)
        for name, value in (("vcpus", vcpus), ("app_port", app_port)):
            limit = np.iinfo(ROW_DTYPE[name]).max
            if not 0 <= value <= limit:
                raise ValueError(f"{name}: {value} expected an integer from 0 to {limit}")
        key = encode_text("instance_id", instance_id, ID_BYTES)
        with self.writing() as w:
            row = w.rows[slot]  # a view: the assignments write the segment
            if row["instance_id"] != key or row["state"] == State.FREE:
                return False
            row["vcpus"] = vcpus
            row["agent_version"] = version_bytes
            row["zone"] = zone_bytes
            row["app_port"] = app_port
        return True

    def write_samples(self, samples: Sequence[PollSample], now: float) -> list[int]:
        """Write answered polls under one lock hold (MonitorS passes a few hundred at a time): the
        metrics, the row's state and app fields, `failures` 0, `last_seen` and `last_metrics` `now`.
        A row that no longer holds its sample's instance is left alone (see `_holds`); returns the
        positions in `samples` of those."""
        n = len(samples)
        if not n:
            return []
        keys = np.array([s.instance_id.encode() for s in samples], dtype=ROW_DTYPE["instance_id"])
        slots = np.fromiter((s.slot for s in samples), dtype=np.int64, count=n)
        # The float columns in one pass over the records (faster than one pass per column), in this order.
        float_names = (
            "cpu",
            "mem",
            "disk",
            "load1",
            "load5",
            "load15",
            "net_rx",
            "net_tx",
            "sample_time",
            "poll_latency",
            "notice_at",
            "rps",
        )
        floats = np.array(
            [
                (
                    s.cpu,
                    s.mem,
                    s.disk,
                    s.load1,
                    s.load5,
                    s.load15,
                    s.net_rx,
                    s.net_tx,
                    s.sample_time,
                    s.poll_latency,
                    s.notice_at,
                    s.rps,
                )
                for s in samples
            ],
            dtype=np.float64,
        )
        # What an agent reports is never trusted into a row the controller would then leave out (and,
        # after its grace, replace): a NaN or infinity becomes 0, fractions are clipped to 0..1, and
        # loads, rates and times to non-negative values.
        np.nan_to_num(floats, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        np.clip(floats[:, 0:3], 0.0, 1.0, out=floats[:, 0:3])
        # Non-negative; the float32 columns (loads, latency, rps) also within float32's range. The
        # float64 ones hold rates and epoch times: capping those at 1e9 too wrote every sample
        # time (and interruption time) as September 2001.
        for k, name in enumerate(float_names[3:], start=3):
            top = 1e9 if ROW_DTYPE[name].itemsize == 4 else 1e300
            np.clip(floats[:, k], 0.0, top, out=floats[:, k])
        ints = {
            "vcpus": np.minimum(np.fromiter((s.vcpus for s in samples), dtype=np.int64, count=n), 65535),
            "state": np.fromiter((s.state for s in samples), dtype=np.int64, count=n),
            "app_down_polls": np.fromiter((s.app_down_polls for s in samples), dtype=np.int64, count=n),
            "app_live": np.fromiter((s.app_live for s in samples), dtype=np.int64, count=n),
            "notice": np.fromiter((s.notice for s in samples), dtype=np.int64, count=n),
        }
        detail = np.array(
            [clip_text(s.app_detail, DETAIL_BYTES).encode("utf-8") for s in samples], dtype=ROW_DTYPE["app_detail"]
        )
        with self.writing() as w:
            rows = w.rows
            mask = self._holds(rows, slots, keys)
            if not mask.all():
                slots, floats, detail = slots[mask], floats[mask], detail[mask]
                ints = {name: values[mask] for name, values in ints.items()}
            for k, name in enumerate(float_names):
                rows[name][slots] = floats[:, k]
            for name, values in ints.items():
                rows[name][slots] = values
            rows["app_detail"][slots] = detail
            rows["last_seen"][slots] = now
            rows["last_metrics"][slots] = now
            rows["failures"][slots] = 0
        return np.flatnonzero(~mask).tolist()

    def mark_failures(self, failures: Sequence[PollFailure]) -> list[int]:
        """Write failed polls under one lock hold: each row's `failures` and state, nothing else (its
        last metrics stay as they were). A row that no longer holds the instance is left alone (see
        `_holds`); returns the positions in `failures` of those."""
        n = len(failures)
        if not n:
            return []
        keys = np.array([f.instance_id.encode() for f in failures], dtype=ROW_DTYPE["instance_id"])
        slots = np.fromiter((f.slot for f in failures), dtype=np.int64, count=n)
        counts = np.fromiter((f.failures for f in failures), dtype=np.int64, count=n)
        states = np.fromiter((int(f.state) for f in failures), dtype=np.int64, count=n)
        with self.writing() as w:
            rows = w.rows
            mask = self._holds(rows, slots, keys)
            rows["failures"][slots[mask]] = counts[mask]
            rows["state"][slots[mask]] = states[mask]
        return np.flatnonzero(~mask).tolist()

    def write_lifecycle(
        self,
        slot: int,
        instance_id: str,
        lifecycle: Lifecycle,
        now: float,
        result: HookResult | None = None,
        detail: str | None = None,
    ) -> bool:
        """MonitorS moves a row to `lifecycle` (since `now`); `result` and `detail` describe the hook
        that just ended (None: left as they are). False (nothing written) if the slot no longer holds
        `instance_id`."""
        key = encode_text("instance_id", instance_id, ID_BYTES)
        detail_bytes = None if detail is None else clip_text(detail, DETAIL_BYTES).encode("utf-8")
        with self.writing() as w:
            row = w.rows[slot]  # a view: the assignments write the segment
            if row["instance_id"] != key or row["state"] == State.FREE:
                return False
            if row["lifecycle"] != lifecycle:
                row["lifecycle_at"] = now
            row["lifecycle"] = lifecycle
            if result is not None:
                row["hook_result"] = result
            if detail_bytes is not None:
                row["hook_detail"] = detail_bytes
        return True

    @staticmethod
    def _holds(rows: np.ndarray, slots: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Which slots still hold the instance MonitorS thinks they hold. MonitorS is the only writer
        of rows, but if anyone else frees one (an operator tool), writing into it would resurrect a
        half-empty row; such writes are left out instead."""
        return (rows["instance_id"][slots] == keys) & (rows["state"][slots] != State.FREE)

    def monitor_heartbeat(
        self, now: float, pid: int, poll_interval: float, cycle_seconds: float = 0.0, started_at: float | None = None
    ) -> None:
        with self.writing() as w:
            h = w.header
            h["monitor_pid"] = pid
            h["monitor_heartbeat"] = now
            h["poll_interval"] = poll_interval
            h["cycle_seconds"] = cycle_seconds
            if started_at is not None:
                h["monitor_started_at"] = started_at

    # -- the roster (ControllerASG writes, MonitorS reads) ------------------------------------------

    def publish_roster(self, entries: Sequence[RosterEntry], now: float) -> None:
        """Replace the roster with `entries` (ControllerASG). Raises TableFull when they do not fit,
        ValueError for a field that does not (nothing written either way)."""
        if len(entries) > self.capacity:
            raise TableFull(
                f"table '{self.name}': a roster of {len(entries)} instances does not fit in "
                f"{self.capacity} (raise HELIX_SHM_CAPACITY)"
            )
        records = np.zeros(len(entries), dtype=ROSTER_DTYPE)
        for i, entry in enumerate(entries):
            records[i] = entry.to_record()
        with self.writing() as w:
            old = int(w.header["roster_count"])
            self._roster[: len(entries)] = records
            if old > len(entries):
                self._roster[len(entries) : min(old, self.capacity)] = np.zeros((), dtype=ROSTER_DTYPE)
            w.header["roster_count"] = len(entries)
            w.header["roster_at"] = now

    def roster_published_at(self) -> float:
        """When the roster was last published (0.0: never): a cheap check before re-reading it."""
        with self._locked(fcntl.LOCK_SH):
            return float(self._header["roster_at"])

    def roster(self) -> Roster:
        """A private copy of the roster. Never raises because of what the table holds: a count
        beyond the capacity is read as the capacity, an entry that does not decode is left out."""
        buf = self._shm.buf
        assert buf is not None, f"table '{self.name}' is closed"
        with self._locked(fcntl.LOCK_SH):
            count = min(int(self._header["roster_count"]), self.capacity)
            published_at = float(self._header["roster_at"])
            start = roster_offset(self.capacity)
            data = bytes(buf[start : start + count * ROSTER_DTYPE.itemsize])
        records = np.frombuffer(data, dtype=ROSTER_DTYPE, count=count)
        entries: dict[str, RosterEntry] = {}
        for rec in records[records["state"] == 1]:
            try:
                digest = bytes(rec["secret_digest"]) if rec["has_secret"] else b""
                deadline = float(rec["drain_deadline"])
                entry = RosterEntry(
                    bytes(rec["instance_id"]).decode("utf-8"),
                    bytes(rec["address"]).decode("utf-8"),
                    digest,
                    deadline if math.isfinite(deadline) and deadline > 0 else 0.0,
                )
            except UnicodeDecodeError:
                continue
            if entry.instance_id:
                entries[entry.instance_id] = entry
        return Roster(published_at if math.isfinite(published_at) else 0.0, entries)

    # -- ControllerASG's writes ------------------------------------------------------------------

    def write_controller(self, status: ControllerStatus) -> None:
        action = encode_text("decision_action", status.action, ACTION_BYTES)
        reason = clip_text(status.reason, REASON_BYTES).encode("utf-8")
        policy = encode_text("policy", status.policy, POLICY_BYTES)
        with self.writing() as w:
            h = w.header
            h["controller_pid"] = status.pid
            h["desired"] = status.desired
            h["in_service"] = status.in_service
            h["pending"] = status.pending
            h["controller_heartbeat"] = status.heartbeat
            h["decision_at"] = status.decision_at
            h["frozen"] = status.frozen
            h["dry_run"] = status.dry_run
            h["decision_action"] = action
            h["decision_reason"] = reason
            h["policy"] = policy
            h["breaker"] = status.breaker
            for name in ("breaker_failures", "billable", "max_instances", "table_problems"):
                h[name] = _saturate(getattr(status, name), HEADER_DTYPE[name])


def _saturate(value: int, dtype: np.dtype) -> int:
    """A count as its header field can hold it: a status report saturates rather than fail the
    controller's step."""
    info = np.iinfo(dtype)
    return min(max(int(value), int(info.min)), int(info.max))
