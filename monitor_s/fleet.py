"""MonitorS's in-memory registry and poll cycle, and how results land in the table.

MonitorS is the only writer of rows, so its in-memory `Fleet` is authoritative once loaded from
the table at start (a restart re-attaches the table and resumes polling every row in it). Each
cycle polls every agent concurrently on one asyncio loop, one persistent channel per agent, with
a per-call deadline shorter than the interval; results are written as they arrive, every
FLUSH_EVERY seconds, in batches of at most BATCH_ROWS rows per lock hold, so a hung agent delays
nobody else's row and readers never wait long. What a poll does to a row's state is the pure rule
in `monitor_s/rowstate.py`; the rows are written only through the table's writer methods
(`write_samples`, `mark_failures`, `update_registration`). The launch and terminate hooks each
row's lifecycle goes through are `monitor_s/lifecycle.py`'s: each entry carries its hook task, and
freeing the entry cancels it.

Stream mode (HELIX_POLL_MODE=stream): instead of one GetMetrics per agent per interval, MonitorS
opens one WatchMetrics stream per agent and the agent pushes a sample every interval (cheaper per
sample: no call set-up). Each cycle then takes, for every agent, the sample that arrived since the
last cycle; an agent whose stream broke or stayed silent for STREAM_SILENCE intervals counts as a
failed poll, exactly as a failed GetMetrics would, so the row semantics are the same in both modes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from monitor_s.credentials import KEY_BYTES, CredentialIssuer
from monitor_s.lifecycle import LifecycleDriver
from monitor_s.rowstate import Poll, RowHealth, next_health
from monitor_s.validation import Refusal, check_instance_id
from protos import helix_pb2, helix_pb2_grpc
from shared import pki, rpc_security
from shared.config import Config, Invalid, parse_host_port
from shared.table import HookResult, InstanceRow, Lifecycle, MetricsTable, Notice, PollFailure, PollSample, State

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
    metadata: tuple[tuple[str, str], ...] = ()  # the agent's own credential, on every poll
    # stream mode: the watching task and the newest pushed sample (loop time of arrival)
    watch: asyncio.Task | None = None
    latest: helix_pb2.Metrics | None = None
    latest_at: float = 0.0
    consumed_at: float = 0.0
    stream_error: str = "no sample yet"
    # last values, for the Prometheus collector (`up` also tells the lifecycle driver the agent answers)
    up: bool = False
    cpu: float = 0.0
    mem: float = 0.0
    notice: Notice = Notice.NONE
    # The row's lifecycle as last written (monitor_s/lifecycle.py), kept so that a registration that
    # rewrites the row keeps it, and the hook call following it (at most one per instance).
    lifecycle: Lifecycle = Lifecycle.NONE
    lifecycle_at: float = 0.0
    hook_result: HookResult = HookResult.NONE
    hook_detail: str = ""
    hook: asyncio.Task | None = None
    hook_kind: str = ""  # "launch" or "terminate" while `hook` runs
    hook_started: float = 0.0  # monotonic time of the current call
    hook_failures: int = 0  # failed Prepare calls in a row (back-off)
    hook_retry_at: float = 0.0  # loop time before which a failed Prepare is not called again


# One poll's outcome: the entry, what came back (the metrics, the exception of a failed call, or in
# stream mode why no sample came), and the latency in seconds.
PollResult = tuple[Entry, helix_pb2.Metrics | Exception | str, float]


class Fleet:
    def __init__(
        self,
        cfg: Config,
        table: MetricsTable,
        auth: rpc_security.Auth,
        log: logging.Logger,
        issuer: CredentialIssuer | None = None,
        manager_ca: pki.ManagerCA | None = None,
    ):
        # Per-agent credentials (monitor_s/credentials.py); a throwaway key when none is given (tests).
        self.issuer = issuer or CredentialIssuer(os.urandom(KEY_BYTES))
        # Under the manager CA every poll is mutual TLS, and each agent must prove it is the instance
        # its row names (its certificate was issued for that id at registration).
        self.agent_tls = rpc_security.manager_client_credentials(manager_ca) if manager_ca else None
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
        self.lifecycle = LifecycleDriver(cfg, table, log, self.entries)

    # -- registry --------------------------------------------------------------------------------

    def connect(self, entry: Entry) -> Entry:
        tls = rpc_security.ChannelTLS(self.agent_tls, pki.agent_name(entry.instance_id)) if self.agent_tls else None
        entry.channel = rpc_security.open_channel(entry.address, self.cfg, options=CHANNEL_OPTIONS, tls=tls)
        entry.stub = helix_pb2_grpc.AgentStub(entry.channel)
        entry.request = helix_pb2.GetMetricsRequest(instance_id=entry.instance_id)
        entry.metadata = self.issuer.metadata(entry.instance_id, entry.registered_at)
        if self.cfg.poll_mode == "stream":
            loop = asyncio.get_running_loop()
            entry.latest_at = loop.time()  # grace: a new stream has STREAM_SILENCE intervals to deliver
            entry.consumed_at = entry.latest_at
            entry.watch = loop.create_task(self._watch(entry))
        self.lifecycle.track(entry)
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
                notice=row.notice,
                lifecycle=row.lifecycle,
                lifecycle_at=row.lifecycle_at,
                hook_result=row.hook_result,
                hook_detail=row.hook_detail,
            )
            self.entries[row.instance_id] = self.connect(entry)
        return len(self.entries)

    def register(
        self, instance_id: str, address: str, vcpus: int, agent_version: str, zone: str, app_port: int, now: float
    ) -> tuple[Entry, bool]:
        """Add or refresh an agent. Idempotent: the same id keeps its row and `registered_at`; a new
        address, or a row someone else freed meanwhile, starts a fresh REGISTERING row (keeping
        `registered_at` and the lifecycle: the instance is where it was between launch and
        terminate, and a hook under way is followed again from the new address). Raises TableFull /
        ValueError (nothing changed)."""
        old = self.entries.get(instance_id)
        # A refresh writes only into a row that still holds this agent (see MetricsTable._holds); if
        # someone else freed it meanwhile, the agent takes a row again below.
        if (
            old is not None
            and old.address == address
            and self.table.update_registration(old.slot, instance_id, vcpus, agent_version, zone, app_port)
        ):
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
        entry = Entry(instance_id, address, -1, registered_at, zone=zone)
        if old is not None:  # the instance is where it was between launch and terminate
            entry.lifecycle, entry.lifecycle_at = old.lifecycle, old.lifecycle_at
            entry.hook_result, entry.hook_detail = old.hook_result, old.hook_detail
            row.lifecycle, row.lifecycle_at = old.lifecycle, old.lifecycle_at
            row.hook_result, row.hook_detail = old.hook_result, old.hook_detail
        entry.slot = self.table.register(row)
        if old is not None:
            self._close(old)
        self.connect(entry)
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
        if entry.hook is not None:  # the row is gone or taken over: its hook call with it
            entry.hook.cancel()
            entry.hook = None
        if entry.watch is not None:
            entry.watch.cancel()
            entry.watch = None
        if entry.channel is not None:
            asyncio.get_running_loop().create_task(entry.channel.close())
            entry.channel = None

    async def close(self) -> None:
        await self.lifecycle.close()
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
            answer = await entry.stub.GetMetrics(entry.request, timeout=self.deadline, metadata=entry.metadata)
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
                async for sample in entry.stub.WatchMetrics(request, metadata=entry.metadata):
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
        for entry, m, _ in ok_rows:
            # The hot path: a healthy row answered with its app live, which changes nothing the row
            # state machine decides (next_health would return the same): skip the call.
            if not (m.app_live and entry.state == State.HEALTHY and not entry.failures and not entry.app_down_polls):
                if entry.state == State.UNHEALTHY:
                    self.log.info("%s answers again", entry.instance_id)
                if not m.app_live and entry.app_down_polls == 0:
                    self.log.warning("%s: app not live (%s)", entry.instance_id, m.app_detail)
                self._judge(entry, Poll.APP_LIVE if m.app_live else Poll.APP_DOWN)
            entry.failing_since = 0.0
            entry.up = True
            entry.cpu, entry.mem = m.cpu, m.mem
            notice = _notice(m.notice)
            if notice != entry.notice:
                entry.notice = notice
                self._log_notice(entry, notice, _notice_at(notice, m.notice_at))
        forgotten = []
        for entry in failed:
            if entry.failures == 0:
                entry.failing_since = now
            was = entry.state
            self._judge(entry, Poll.FAILED)
            entry.up = False
            if now - entry.failing_since >= self.forget_after:
                forgotten.append(entry)
            if entry.state == State.UNHEALTHY and was != State.UNHEALTHY:
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
        # One lock hold per BATCH_ROWS rows; the table leaves out rows freed by someone else meanwhile.
        lost: list[Entry] = []
        for start in range(0, len(ok_rows), BATCH_ROWS):
            answered = ok_rows[start : start + BATCH_ROWS]
            missed = self.table.write_samples([_sample(e, m, latency) for e, m, latency in answered], now)
            lost += [answered[i][0] for i in missed]
        for start in range(0, len(failed), BATCH_ROWS):
            chunk = failed[start : start + BATCH_ROWS]
            missed = self.table.mark_failures([PollFailure(e.slot, e.instance_id, e.state, e.failures) for e in chunk])
            lost += [chunk[i] for i in missed]
        for entry in lost:
            self.forget(entry, "its row was freed by someone else")

    def _log_notice(self, entry: Entry, notice: Notice, at: float) -> None:
        if notice == Notice.NONE:
            self.log.info("%s: EC2 notice withdrawn", entry.instance_id)
        elif notice == Notice.INTERRUPTION and at > 0:
            self.log.warning(
                "%s: EC2 notice: interruption in %.0fs (at %s)",
                entry.instance_id,
                at - time.time(),
                time.strftime("%H:%M:%S", time.localtime(at)),
            )
        else:
            self.log.warning("%s: EC2 notice: %s", entry.instance_id, notice.label)

    def _judge(self, entry: Entry, poll: Poll) -> None:
        """Move the entry's row health on by one poll (monitor_s/rowstate.py holds the rules)."""
        health = next_health(
            RowHealth(entry.state, entry.failures, entry.app_down_polls), poll, self.cfg.unhealthy_after
        )
        entry.state, entry.failures, entry.app_down_polls = health.state, health.failures, health.app_down_polls


def _notice(value: int) -> Notice:
    """The proto's Notice as the table's (same numbers); one from a newer agent that this MonitorS
    does not know reads as NONE rather than a value no reader could decode."""
    if not value:  # nearly every poll: no enum lookup
        return Notice.NONE
    try:
        return Notice(value)
    except ValueError:
        return Notice.NONE


def _notice_at(notice: Notice, at: float) -> float:
    """When the instance goes, as the table keeps it: only an interruption has a time, and a time
    that is not one (NaN, infinite, negative) reads as 0, 'not said'."""
    return at if notice == Notice.INTERRUPTION and math.isfinite(at) and at > 0 else 0.0


def _sample(entry: Entry, m: helix_pb2.Metrics, latency: float) -> PollSample:
    notice = _notice(m.notice)
    return PollSample(
        slot=entry.slot,
        instance_id=entry.instance_id,
        state=entry.state,
        app_down_polls=entry.app_down_polls,
        poll_latency=latency,
        cpu=m.cpu,
        mem=m.mem,
        disk=m.disk,
        load1=m.load1,
        load5=m.load5,
        load15=m.load15,
        net_rx=m.net_rx_bps,
        net_tx=m.net_tx_bps,
        sample_time=m.sample_time,
        vcpus=m.vcpus,
        app_live=m.app_live,
        app_detail=m.app_detail,
        notice=notice,
        notice_at=_notice_at(notice, m.notice_at),
        rps=_rate(m.rps),
    )


def _rate(value: float) -> float:
    """A rate an agent reported, as the table keeps it: one that is not a rate (NaN, infinite,
    negative) reads as 0, 'none measured', never as a number a policy would act on."""
    return value if math.isfinite(value) and value > 0 else 0.0


def _describe(answer: object) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, grpc.aio.AioRpcError):
        return f"{answer.code().name} {answer.details()}"[:200]
    return repr(answer)[:200]
