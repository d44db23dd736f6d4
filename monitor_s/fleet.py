"""MonitorS's in-memory registry and poll cycle, and how results land in the table.

MonitorS is the only writer of rows, so its in-memory `Fleet` is authoritative once loaded from
the table at start (a restart re-attaches the table and resumes polling every row in it). Each
cycle polls every agent concurrently on one asyncio loop, one persistent channel per agent, with
a per-call deadline shorter than the interval; results are written as they arrive, every
FLUSH_EVERY seconds, in batches of at most BATCH_ROWS rows per lock hold, so a hung agent delays
nobody else's row and readers never wait long.

Stream mode (HELIX_POLL_MODE=stream): instead of one GetMetrics per agent per interval, MonitorS
opens one WatchMetrics stream per agent and the agent pushes a sample every interval (cheaper per
sample: no call set-up). Each cycle then takes, for every agent, the sample that arrived since the
last cycle; an agent whose stream broke or stayed silent for STREAM_SILENCE intervals counts as a
failed poll, exactly as a failed GetMetrics would, so the row semantics are the same in both modes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
import numpy as np

from monitor_s.validation import Refusal, check_instance_id
from protos import helix_pb2, helix_pb2_grpc
from shared import rpc_security
from shared.config import Config, Invalid, parse_host_port
from shared.table import (
    DETAIL_BYTES,
    ROW_DTYPE,
    VERSION_BYTES,
    ZONE_BYTES,
    InstanceRow,
    MetricsTable,
    State,
    clip_text,
    encode_text,
)

FLUSH_EVERY = 0.05
BATCH_ROWS = 512
DEADLINE_SHARE = 0.8  # per-call deadline as a share of the poll interval ...
MAX_DEADLINE = 10.0  # ... but never longer: an agent that needs more is not healthy
STREAM_SILENCE = 1.5  # intervals without a pushed sample before a cycle counts a failure
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]


@dataclass(eq=False)
class Entry:
    instance_id: str
    address: str
    slot: int
    registered_at: float
    zone: str = ""
    failing_since: float = 0.0  # wall time of the first failure of the current streak
    state: State = State.REGISTERING
    failures: int = 0
    app_down_polls: int = 0
    channel: grpc.aio.Channel | None = None
    stub: helix_pb2_grpc.AgentStub | None = None
    request: helix_pb2.GetMetricsRequest = field(default_factory=helix_pb2.GetMetricsRequest)
    # stream mode: the watching task and the newest pushed sample (loop time of arrival)
    watch: asyncio.Task | None = None
    latest: helix_pb2.Metrics | None = None
    latest_at: float = 0.0
    consumed_at: float = 0.0
    stream_error: str = "no sample yet"
    # last values, for the Prometheus collector
    up: bool = False
    cpu: float = 0.0
    mem: float = 0.0


# One poll's outcome: the entry, what came back (the metrics, the exception of a failed call, or in
# stream mode why no sample came), and the latency in seconds.
PollResult = tuple[Entry, helix_pb2.Metrics | Exception | str, float]


class Fleet:
    def __init__(self, cfg: Config, table: MetricsTable, auth: rpc_security.Auth, log: logging.Logger):
        self.cfg = cfg
        self.table = table
        self.auth = auth
        self.log = log
        self.entries: dict[str, Entry] = {}
        self.metadata = auth.metadata
        self.deadline = min(cfg.poll_interval * DEADLINE_SHARE, MAX_DEADLINE)
        self.polls_ok = 0
        self.polls_failed = 0
        self.last_cycle = 0.0
        self.latency_observer: Callable[[list[float]], None] | None = None  # set by the Prometheus exporter
        # A row whose agent has not answered for HELIX_FORGET_AFTER is freed: the controller
        # replaced that instance long ago (it acts on UNHEALTHY within seconds), and an agent that
        # is in fact alive registers again by itself once it notices it is not polled. Without
        # this, rows of instances killed without a goodbye would be polled forever and fill the table.
        self.forget_after = cfg.forget_after

    # -- registry --------------------------------------------------------------------------------

    def connect(self, entry: Entry) -> Entry:
        entry.channel = rpc_security.open_channel(entry.address, self.cfg, options=CHANNEL_OPTIONS)
        entry.stub = helix_pb2_grpc.AgentStub(entry.channel)
        entry.request = helix_pb2.GetMetricsRequest(instance_id=entry.instance_id)
        if self.cfg.poll_mode == "stream":
            loop = asyncio.get_running_loop()
            entry.latest_at = loop.time()  # grace: a new stream has STREAM_SILENCE intervals to deliver
            entry.consumed_at = entry.latest_at
            entry.watch = loop.create_task(self._watch(entry))
        return entry

    def load(self) -> int:
        """Resume every row the table already holds (MonitorS restarted). The table is repaired
        first, never refused: whatever bytes a crash or a stray write left, MonitorS starts, keeps
        the good rows and frees the rest, one log line each (their agents register again)."""
        for note in self.table.repair():
            self.log.warning("table repair: %s", note)
        snap = self.table.snapshot()
        for slot in map(int, snap.live_slots):
            row = InstanceRow.from_record(snap.rows[slot])
            try:
                # What Register would refuse cannot be polled or deregistered: MonitorS never wrote it.
                check_instance_id(row.instance_id)
                parse_host_port(row.address)
            except (Refusal, Invalid) as exc:
                self.table.free(row.instance_id)
                why = exc.message if isinstance(exc, Refusal) else f"address: {row.address[:80]!r}, expected {exc}"
                self.log.warning("table repair: freed slot %d: %s", slot, why)
                continue
            entry = Entry(
                row.instance_id,
                row.address,
                slot=slot,
                registered_at=row.registered_at,
                zone=row.zone,
                state=row.state,
                failures=row.failures,
                app_down_polls=row.app_down_polls,
                failing_since=time.time() if row.failures else 0.0,
            )
            self.entries[row.instance_id] = self.connect(entry)
        return len(self.entries)

    def register(
        self, instance_id: str, address: str, vcpus: int, agent_version: str, zone: str, app_port: int, now: float
    ) -> tuple[Entry, bool]:
        """Add or refresh an agent. Idempotent: the same id keeps its row and `registered_at`; a new
        address starts a fresh REGISTERING row. Raises TableFull / ValueError (nothing changed)."""
        old = self.entries.get(instance_id)
        if old is not None and old.address == address:
            version_bytes = encode_text("agent_version", agent_version, VERSION_BYTES)
            zone_bytes = encode_text("zone", zone, ZONE_BYTES)
            with self.table.writing() as w:
                row = w.rows[old.slot]  # a view: the assignments write the segment
                row["vcpus"] = vcpus
                row["agent_version"] = version_bytes
                row["zone"] = zone_bytes
                row["app_port"] = app_port
            old.zone = zone
            return old, False
        registered_at = old.registered_at if old is not None else now
        row = InstanceRow(
            instance_id=instance_id,
            address=address,
            state=State.REGISTERING,
            zone=zone,
            agent_version=agent_version,
            registered_at=registered_at,
            vcpus=vcpus,
            app_port=app_port,
        )
        slot = self.table.register(row)
        if old is not None:
            self._close(old)
        entry = self.connect(Entry(instance_id, address, slot, registered_at, zone=zone))
        self.entries[instance_id] = entry
        return entry, old is None

    def forget(self, entry: Entry, why: str) -> None:
        """Drop an agent MonitorS no longer polls (the row is freed if it still holds this agent)."""
        if self.entries.get(entry.instance_id) is entry:
            del self.entries[entry.instance_id]
            self.table.free(entry.instance_id)
        self._close(entry)
        self.log.warning("forgot %s at %s: %s", entry.instance_id, entry.address, why)

    def deregister(self, instance_id: str) -> Entry | None:
        entry = self.entries.pop(instance_id, None)
        self.table.free(instance_id)
        if entry is not None:
            self._close(entry)
        return entry

    def _close(self, entry: Entry) -> None:
        if entry.watch is not None:
            entry.watch.cancel()
            entry.watch = None
        if entry.channel is not None:
            asyncio.get_running_loop().create_task(entry.channel.close())
            entry.channel = None

    async def close(self) -> None:
        for entry in self.entries.values():
            if entry.watch is not None:
                entry.watch.cancel()
        await asyncio.gather(*(e.channel.close() for e in self.entries.values() if e.channel), return_exceptions=True)

    # -- polling ---------------------------------------------------------------------------------

    async def _poll(self, entry: Entry, results: list[PollResult]) -> None:
        assert entry.stub is not None  # set by connect(), which every entry in the registry went through
        started = time.perf_counter()
        answer: helix_pb2.Metrics | Exception
        try:
            answer = await entry.stub.GetMetrics(entry.request, timeout=self.deadline, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            answer = exc
        except Exception as exc:  # noqa: BLE001 - a closed channel mid-cycle: a failed poll, not a crash
            answer = exc
        results.append((entry, answer, time.perf_counter() - started))

    async def _watch(self, entry: Entry) -> None:
        """Stream mode: keep one WatchMetrics stream open to the agent, reopening it after a break."""
        request = helix_pb2.WatchMetricsRequest(instance_id=entry.instance_id, interval_seconds=self.cfg.poll_interval)
        assert entry.stub is not None  # connect() sets the stub before it starts this task
        loop = asyncio.get_running_loop()
        while True:
            try:
                async for sample in entry.stub.WatchMetrics(request, metadata=self.metadata):
                    entry.latest, entry.latest_at = sample, loop.time()
                entry.stream_error = "stream ended"
            except grpc.aio.AioRpcError as exc:
                entry.stream_error = _describe(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a closed channel: retry, counted as failures meanwhile
                entry.stream_error = repr(exc)[:200]
            await asyncio.sleep(self.cfg.poll_interval)

    def _stream_cycle(self) -> None:
        loop_now = asyncio.get_running_loop().time()
        stale_before = loop_now - STREAM_SILENCE * self.cfg.poll_interval
        wall = time.time()
        results: list[PollResult] = []
        for entry in self.entries.values():
            if entry.latest_at > entry.consumed_at:
                entry.consumed_at = entry.latest_at
                sample = entry.latest
                assert sample is not None  # latest_at only moves past consumed_at when a sample arrives
                results.append((entry, sample, max(wall - sample.sample_time, 0.0)))
            elif entry.latest_at < stale_before:
                results.append((entry, entry.stream_error, 0.0))
            # else: a sample arrived within the grace window and was used last cycle; nothing new yet
        self.write(results)

    async def cycle(self) -> float:
        """Poll every agent once; returns the cycle's duration in seconds."""
        started = time.perf_counter()
        if self.cfg.poll_mode == "stream":
            self._stream_cycle()
            self.last_cycle = time.perf_counter() - started
            return self.last_cycle
        entries = list(self.entries.values())
        results: list[PollResult] = []
        if entries:
            gathered = asyncio.gather(*(self._poll(e, results) for e in entries))
            while not gathered.done():
                await asyncio.wait([gathered], timeout=FLUSH_EVERY)
                if results:
                    batch, results[:] = results[:], []
                    self.write(batch)
            if results:
                self.write(results)
        self.last_cycle = time.perf_counter() - started
        return self.last_cycle

    def write(self, results: list[PollResult]) -> None:
        """Apply a batch of poll results to the in-memory entries and the table."""
        now = time.time()
        ok_rows: list[tuple[Entry, helix_pb2.Metrics, float]] = []
        failed: list[Entry] = []
        latencies: list[float] = []
        for entry, answer, latency in results:
            if self.entries.get(entry.instance_id) is not entry:
                continue  # deregistered or replaced while the call was in flight
            if isinstance(answer, helix_pb2.Metrics):
                ok_rows.append((entry, answer, latency))
                latencies.append(latency)
            else:
                failed.append(entry)
                if entry.failures == 0 or (entry.failures + 1) == self.cfg.unhealthy_after:
                    self.log.warning("poll of %s at %s failed: %s", entry.instance_id, entry.address, _describe(answer))
        unhealthy_after = self.cfg.unhealthy_after
        for entry, m, _ in ok_rows:
            if entry.state == State.UNHEALTHY:
                self.log.info("%s answers again", entry.instance_id)
            entry.failures, entry.failing_since = 0, 0.0
            entry.up = True
            entry.cpu, entry.mem = m.cpu, m.mem
            if m.app_live:
                entry.state, entry.app_down_polls = State.HEALTHY, 0
            else:
                if entry.app_down_polls == 0:
                    self.log.warning("%s: app not live (%s)", entry.instance_id, m.app_detail)
                entry.state, entry.app_down_polls = State.APP_DOWN, entry.app_down_polls + 1
        forgotten = []
        for entry in failed:
            if entry.failures == 0:
                entry.failing_since = now
            entry.failures += 1
            entry.up = False
            if now - entry.failing_since >= self.forget_after:
                forgotten.append(entry)
            if entry.failures >= unhealthy_after and entry.state != State.UNHEALTHY:
                entry.state = State.UNHEALTHY
                self.log.warning("%s marked unhealthy after %d failed polls", entry.instance_id, entry.failures)
        self.polls_ok += len(ok_rows)
        self.polls_failed += len(failed)
        if self.latency_observer is not None and latencies:
            self.latency_observer(latencies)
        for entry in forgotten:
            self.forget(entry, f"no answer for {now - entry.failing_since:.0f}s")
        if forgotten:
            gone = set(map(id, forgotten))
            failed = [e for e in failed if id(e) not in gone]
        lost: list[Entry] = []
        for start in range(0, len(ok_rows), BATCH_ROWS):
            lost += self._write_ok(ok_rows[start : start + BATCH_ROWS], now)
        for start in range(0, len(failed), BATCH_ROWS):
            chunk = failed[start : start + BATCH_ROWS]
            slots = np.fromiter((e.slot for e in chunk), dtype=np.int64, count=len(chunk))
            keys = np.array([e.instance_id.encode() for e in chunk], dtype=ROW_DTYPE["instance_id"])
            with self.table.writing() as w:
                rows = w.rows
                mask = _owned(rows, slots, keys)
                rows["failures"][slots[mask]] = np.array([e.failures for e in chunk])[mask]
                rows["state"][slots[mask]] = np.array([int(e.state) for e in chunk])[mask]
            lost += [e for e, ok in zip(chunk, mask, strict=True) if not ok]
        for entry in lost:
            self.forget(entry, "its row was freed by someone else")

    def _write_ok(self, chunk: list[tuple[Entry, helix_pb2.Metrics, float]], now: float) -> list[Entry]:
        """Write successful polls; returns the entries whose row no longer holds them."""
        n = len(chunk)
        keys = np.array([e.instance_id.encode() for e, _, _ in chunk], dtype=ROW_DTYPE["instance_id"])
        slots = np.fromiter((e.slot for e, _, _ in chunk), dtype=np.int64, count=n)
        cols = {
            name: np.fromiter((getattr(m, attr) for _, m, _ in chunk), dtype=np.float64, count=n)
            for name, attr in (
                ("cpu", "cpu"),
                ("mem", "mem"),
                ("disk", "disk"),
                ("load1", "load1"),
                ("load5", "load5"),
                ("load15", "load15"),
                ("net_rx", "net_rx_bps"),
                ("net_tx", "net_tx_bps"),
                ("sample_time", "sample_time"),
            )
        }
        np.clip(cols["cpu"], 0.0, 1.0, out=cols["cpu"])
        latency = np.fromiter((lat for _, _, lat in chunk), dtype=np.float64, count=n)
        vcpus = np.fromiter((min(m.vcpus, 65535) for _, m, _ in chunk), dtype=np.int64, count=n)
        state = np.fromiter((int(e.state) for e, _, _ in chunk), dtype=np.int64, count=n)
        down = np.fromiter((e.app_down_polls for e, _, _ in chunk), dtype=np.int64, count=n)
        live = np.fromiter((m.app_live for _, m, _ in chunk), dtype=np.int64, count=n)
        detail = np.array(
            [clip_text(m.app_detail, DETAIL_BYTES).encode("utf-8") for _, m, _ in chunk], dtype=ROW_DTYPE["app_detail"]
        )
        with self.table.writing() as w:
            rows = w.rows
            mask = _owned(rows, slots, keys)
            if not mask.all():
                slots, latency, vcpus, state, down, live, detail = (
                    a[mask] for a in (slots, latency, vcpus, state, down, live, detail)
                )
                cols = {name: values[mask] for name, values in cols.items()}
            for name, values in cols.items():
                rows[name][slots] = values
            rows["last_seen"][slots] = now
            rows["last_metrics"][slots] = now
            rows["poll_latency"][slots] = latency
            rows["failures"][slots] = 0
            rows["vcpus"][slots] = vcpus
            rows["state"][slots] = state
            rows["app_down_polls"][slots] = down
            rows["app_live"][slots] = live
            rows["app_detail"][slots] = detail
        return [e for (e, _, _), ok in zip(chunk, mask, strict=True) if not ok]


def _owned(rows: np.ndarray, slots: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which slots still hold the agent MonitorS thinks they hold. MonitorS is the only writer of
    rows, but if anyone else frees one (an operator tool), writing into it would resurrect a
    half-empty row; such entries are dropped instead."""
    return (rows["instance_id"][slots] == keys) & (rows["state"][slots] != State.FREE)


def _describe(answer: object) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, grpc.aio.AioRpcError):
        return f"{answer.code().name} {answer.details()}"[:200]
    return repr(answer)[:200]
