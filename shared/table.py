"""The metrics table: a fixed-layout numpy structured array in one POSIX shared-memory segment.

MonitorS owns it and writes the monitor part of the header and the rows; ControllerASG writes only
the controller part of the header; anyone may read. Layout: a HEADER_SIZE-byte header, then
`capacity` rows of ROW_DTYPE.

Locking. One `fcntl.flock` on `/dev/shm/<name>.lock`: writers take it exclusive, readers shared.
The kernel drops a flock when its holder dies, even by SIGKILL, so a crashed holder can never
wedge the table. flock belongs to the open file description, so threads of one process also
serialise on a `threading.Lock`. Readers copy the bytes under the lock and decode the copy, so a
reader never sees a torn row or a row half old and half new; writers hold the lock only for the
few assignments of one update (MonitorS batches a poll cycle into chunks), so readers wait
microseconds.

Lifecycle. Python 3.11's resource tracker unlinks every segment a process opened when that
process exits (and the creator's when the creator is SIGKILLed), which would wipe the registry on
every MonitorS crash and break every reader on exit. Helix unregisters each segment from the
tracker the moment it is opened, so nothing is unlinked behind anyone's back. The segment lives
until someone calls `MetricsTable.remove` (the demo and the tests do, at the end), an operator
resets it (`HELIX_SHM_RESET=1` when the layout changed), or the machine reboots (/dev/shm is a
tmpfs; agents then register again).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from enum import IntEnum
from multiprocessing import resource_tracker, shared_memory

import numpy as np

MAGIC = 0x31425458494C4548  # b"HELIXTB1" little-endian
LAYOUT_VERSION = 1
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
]
_header_core = np.dtype(_HEADER_FIELDS)
HEADER_DTYPE = np.dtype(_HEADER_FIELDS + [("_reserved", f"V{HEADER_SIZE - _header_core.itemsize}")])

ROW_DTYPE = np.dtype([
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
])


class TableError(Exception):
    """Base class: every table error carries a one-line message."""


class TableNotFound(TableError):
    pass


class LayoutMismatch(TableError):
    pass


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
_TEXT_FIELDS = {name: ROW_DTYPE[name].itemsize for name in ROW_DTYPE.names if ROW_DTYPE[name].kind == "S"}
_INT_FIELDS = {name for name in ROW_DTYPE.names if ROW_DTYPE[name].kind in "ui"}


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

    def to_record(self) -> tuple:
        """The row as a tuple in ROW_DTYPE order; raises ValueError naming a field that does not fit."""
        values = []
        for name in ROW_DTYPE.names:
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
    def from_record(cls, rec: np.void) -> "InstanceRow":
        kwargs = {}
        for f in fields(cls):
            value = rec[f.name]
            if f.name in _TEXT_FIELDS:
                kwargs[f.name] = decode_text(bytes(value))
            elif f.name == "state":
                kwargs[f.name] = State(int(value))
            elif f.name == "app_live":
                kwargs[f.name] = bool(value)
            elif f.name in _INT_FIELDS:
                kwargs[f.name] = int(value)
            else:
                kwargs[f.name] = float(value)
        return cls(**kwargs)


@dataclass
class MonitorStatus:
    pid: int
    registered: int
    started_at: float
    heartbeat: float
    poll_interval: float
    cycle_seconds: float

    def heartbeat_age(self, now: float) -> float:
        return now - self.heartbeat if self.heartbeat else float("inf")

    def alive(self, now: float, intervals: float = 3.0) -> bool:
        """MonitorS counts as alive while its heartbeat is younger than `intervals` poll intervals."""
        return self.heartbeat_age(now) <= intervals * max(self.poll_interval, 1e-3)


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


@dataclass
class Snapshot:
    """A consistent, private copy of the table. `rows` holds every used slot (free ones too,
    below the high-water mark); `live` filters to occupied rows."""

    header: np.void
    rows: np.ndarray
    seq: int

    @property
    def live(self) -> np.ndarray:
        return self.rows[self.rows["state"] != State.FREE]

    def instances(self) -> list[InstanceRow]:
        return [InstanceRow.from_record(rec) for rec in self.live]

    @property
    def monitor(self) -> MonitorStatus:
        h = self.header
        return MonitorStatus(int(h["monitor_pid"]), int(h["registered"]), float(h["monitor_started_at"]),
                             float(h["monitor_heartbeat"]), float(h["poll_interval"]), float(h["cycle_seconds"]))

    @property
    def controller(self) -> ControllerStatus:
        h = self.header
        return ControllerStatus(
            pid=int(h["controller_pid"]), desired=int(h["desired"]), in_service=int(h["in_service"]),
            pending=int(h["pending"]), heartbeat=float(h["controller_heartbeat"]),
            decision_at=float(h["decision_at"]), frozen=bool(h["frozen"]), dry_run=bool(h["dry_run"]),
            action=decode_text(bytes(h["decision_action"])), reason=decode_text(bytes(h["decision_reason"])),
            policy=decode_text(bytes(h["policy"])),
        )

    @property
    def capacity(self) -> int:
        return int(self.header["capacity"])


# ---------------------------------------------------------------------------------------------
# The table


def segment_size(capacity: int) -> int:
    return HEADER_SIZE + capacity * ROW_DTYPE.itemsize


def lock_path(name: str) -> str:
    return os.path.join(SHM_DIR, f"{name}.lock")


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # See the module docstring: the tracker would unlink the segment when this process exits.
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 (the tracker's own key)


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

    def __init__(self, name: str, shm: shared_memory.SharedMemory, lock_fd: int, capacity: int):
        self.name = name
        self._shm = shm
        self._lock_fd = lock_fd
        self._thread_lock = threading.Lock()
        self.capacity = capacity
        self._size = segment_size(capacity)
        self._header = np.ndarray((), dtype=HEADER_DTYPE, buffer=shm.buf, offset=0)
        self._rows = np.ndarray((capacity,), dtype=ROW_DTYPE, buffer=shm.buf, offset=HEADER_SIZE)

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def attach(cls, name: str) -> "MetricsTable":
        """Attach to an existing table (readers, ControllerASG). Raises TableNotFound or LayoutMismatch."""
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except FileNotFoundError:
            raise TableNotFound(f"no metrics table '{name}' in {SHM_DIR} (is MonitorS running?)") from None
        _untrack(shm)
        try:
            capacity = cls._check_layout(name, shm)
            lock_fd = os.open(lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
        except BaseException:
            shm.close()
            raise
        return cls(name, shm, lock_fd, capacity)

    @classmethod
    def open_or_create(cls, name: str, capacity: int, *, reset: bool = False, pid: int = 0) -> "MetricsTable":
        """MonitorS: re-attach a table whose layout matches (the registry survives a restart), or
        create one. A mismatched layout raises LayoutMismatch unless `reset` is set."""
        lock_fd = os.open(lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                table = cls._open_or_create_locked(name, capacity, reset, lock_fd)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(lock_fd)
            raise
        return table

    @classmethod
    def _open_or_create_locked(cls, name: str, capacity: int, reset: bool, lock_fd: int) -> "MetricsTable":
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except FileNotFoundError:
            shm = None
        if shm is not None:
            try:
                found = cls._check_layout(name, shm, expected_capacity=capacity)
            except LayoutMismatch:
                shm.close()
                if not reset:
                    _untrack(shm)
                    raise
                shm.unlink()  # also unregisters it from the tracker
            else:
                _untrack(shm)
                return cls(name, shm, lock_fd, found)
        shm = shared_memory.SharedMemory(name=name, create=True, size=segment_size(capacity))
        _untrack(shm)
        table = cls(name, shm, lock_fd, capacity)
        h = table._header
        h["layout_version"] = LAYOUT_VERSION
        h["capacity"] = capacity
        h["row_size"] = ROW_DTYPE.itemsize
        h["magic"] = MAGIC  # last: a reader that sees the magic sees a complete header
        return table

    @staticmethod
    def _check_layout(name: str, shm: shared_memory.SharedMemory, expected_capacity: int | None = None) -> int:
        if shm.size < HEADER_SIZE:
            raise LayoutMismatch(f"table '{name}': segment is {shm.size} bytes, smaller than a header; "
                                 "set HELIX_SHM_RESET=1 to replace it")
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
            raise LayoutMismatch(f"table '{name}' has {problems[0]}; set HELIX_SHM_RESET=1 to replace it "
                                 "(agents register again)")
        return capacity

    def close(self) -> None:
        """Detach. Never unlinks: the table outlives every process but its remover."""
        if self._shm is None:
            return
        del self._header, self._rows
        self._shm.close()
        self._shm = None
        os.close(self._lock_fd)

    @staticmethod
    def remove(name: str) -> bool:
        """Unlink the segment and its lock file; True if a segment was there."""
        found = False
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
            shm.close()
            shm.unlink()  # balances the tracker registration the open made
            found = True
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(name))
        return found

    def __enter__(self) -> "MetricsTable":
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
        """A consistent private copy: header plus every row below the high-water mark."""
        buf = self._shm.buf
        with self._locked(fcntl.LOCK_SH):
            high_water = int(self._header["high_water"])
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
                    raise TableFull(f"table '{self.name}' is full: all {self.capacity} rows in use "
                                    "(raise HELIX_SHM_CAPACITY)")
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

    def monitor_heartbeat(self, now: float, pid: int, poll_interval: float, cycle_seconds: float = 0.0,
                          started_at: float | None = None) -> None:
        with self.writing() as w:
            h = w.header
            h["monitor_pid"] = pid
            h["monitor_heartbeat"] = now
            h["poll_interval"] = poll_interval
            h["cycle_seconds"] = cycle_seconds
            if started_at is not None:
                h["monitor_started_at"] = started_at

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
