"""The lifecycle driver: given the registry's entries, their rows' lifecycle and the controller's
roster, start and follow the agents' hook calls (Agent.Prepare, Agent.Drain), and write each row's
lifecycle as they go.

One task per instance at most (`Entry.hook`), on the entry's own channel with its own credential.
The rules, each also written where it acts:

- Launch hook. A row whose lifecycle is NONE gets Prepare(timeout=HELIX_LAUNCH_HOOK_TIMEOUT,
  reason "launch") once its agent has answered a poll (it left REGISTERING), and is PREPARING from
  the call on. CONTINUE -> IN_SERVICE; ABANDON or TIMEOUT -> ABANDONED with that result; an agent
  without hooks (UNIMPLEMENTED) -> IN_SERVICE, CONTINUE, "agent has no hooks". Any other failure
  (unreachable, a broken or silent stream) leaves the row PREPARING and calls again on a later
  cycle, with back-off, once the agent answers polls again. Giving up on an instance that never
  finishes is the controller's health grace, not this module's.
- Terminate hook. A registered instance whose roster entry has drain_deadline > 0 and whose
  lifecycle is not DRAINING or DRAINED becomes DRAINING and gets Drain(timeout=max(1, deadline -
  now), reason "terminate"); its final result -> DRAINED with that result. Any failure -> DRAINED,
  FAILED, the error as the detail: an instance that cannot be asked leaves nothing to wait for, and
  the controller proceeds. A drain request wins over a running Prepare, which is cancelled.
- Restart. A row found PREPARING or DRAINING with no task of this MonitorS's own is called again:
  the agent's hooks are idempotent, so the call follows the run already under way.
- A stream carries the hook timeout plus HOOK_DEADLINE_MARGIN as its deadline, and one silent for
  HOOK_SILENCE (three missed RUNNING heartbeats) counts as broken.
- Freed, deregistered or forgotten rows cancel their task (`Fleet._close` does).

Cheap on the poll path: `step` looks only at the entries waiting for a call (`waiting`: new ones,
rows a restart found mid-hook, launch hooks due for a retry) and rescans drain requests only when
the controller published a new roster. Every transition is one INFO line naming the instance, the
hook, its result and the time it took.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from protos import helix_pb2
from shared.config import Config
from shared.table import HookResult, Lifecycle, MetricsTable, Roster

if TYPE_CHECKING:
    from monitor_s.fleet import Entry

HOOK_HEARTBEAT = 2.0  # seconds between the agent's RUNNING messages (its contract) ...
HOOK_SILENCE = 3 * HOOK_HEARTBEAT  # ... three of them missed: the stream is broken
HOOK_DEADLINE_MARGIN = 30.0  # a stream's deadline beyond the hook's own timeout (the agent reports TIMEOUT first)
MAX_HOOK_TIMEOUT = 7200.0  # HookRequest.timeout_seconds: 1 .. 7200
RETRY_FIRST = 1.0  # back-off of a failed Prepare call: 1 s, doubling ...
RETRY_MAX = 30.0  # ... up to this
LAUNCH, TERMINATE = "launch", "terminate"

_FINAL = {
    helix_pb2.HookProgress.CONTINUE: HookResult.CONTINUE,
    helix_pb2.HookProgress.ABANDON: HookResult.ABANDON,
    helix_pb2.HookProgress.TIMEOUT: HookResult.TIMEOUT,
}
# Rows that need a call from this MonitorS when it first sees them: NONE (launch hook not started
# yet), and PREPARING or DRAINING with no task of its own (it restarted, or the agent moved address).
_NEEDS_CALL = (Lifecycle.NONE, Lifecycle.PREPARING, Lifecycle.DRAINING)


class HookBroken(Exception):
    """The hook stream ended without a result, or fell silent."""


def oneline(text: str, limit: int = 200) -> str:
    """An agent's or gRPC's words as one log line: control characters become spaces."""
    return "".join(c if c.isprintable() else " " for c in text[:limit])


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return oneline(f"{exc.code().name} {exc.details() or ''}".strip())
    return oneline(str(exc) or type(exc).__name__)


class LifecycleDriver:
    def __init__(self, cfg: Config, table: MetricsTable, log: logging.Logger, entries: Mapping[str, Entry]):
        self.cfg = cfg
        self.table = table
        self.log = log
        self.entries = entries  # the fleet's registry: an entry not in it any more is gone
        self.waiting: dict[str, Entry] = {}  # entries that may need a call (see `step`)
        self.drains: dict[str, float] = {}  # instance -> drain deadline, from the last roster read
        self._roster_at = -1.0  # published_at of the roster `drains` came from

    # -- the poll loop's side ----------------------------------------------------------------------

    def track(self, entry: Entry) -> None:
        """A new entry (registered, or resumed from the table): look at it on the next step."""
        if entry.lifecycle in _NEEDS_CALL:
            self.waiting[entry.instance_id] = entry

    def step(self, roster: Roster | None) -> None:
        """Once per poll cycle: start the calls that are due. `roster` is the controller's (None or
        never published: no drain requests, as with HELIX_ROSTER=off)."""
        if roster is not None and roster.published_at != self._roster_at:
            # Drain requests come only with a new roster: rescan them then, never on every cycle.
            self._roster_at = roster.published_at
            self.drains = {iid: e.drain_deadline for iid, e in roster.entries.items() if e.drain_deadline > 0}
            for iid, deadline in self.drains.items():
                entry = self.entries.get(iid)
                if entry is not None:
                    self._drain_if_due(entry, deadline)
        if not self.waiting:
            return
        loop_now = asyncio.get_running_loop().time()
        for iid, entry in list(self.waiting.items()):
            if self.entries.get(iid) is not entry:  # freed, deregistered or replaced meanwhile
                del self.waiting[iid]
                continue
            deadline = self.drains.get(iid, 0.0)
            if deadline > 0 or entry.lifecycle == Lifecycle.DRAINING:
                del self.waiting[iid]
                self._drain_if_due(entry, deadline)
            elif entry.lifecycle in (Lifecycle.NONE, Lifecycle.PREPARING):
                # Launch hook: only once the agent has answered a poll (its first, or, for a retry, its
                # last): an agent that does not answer polls would not answer Prepare either.
                if entry.hook is None and entry.up and loop_now >= entry.hook_retry_at:
                    del self.waiting[iid]
                    self._start(entry, LAUNCH, self._prepare(entry), f"timeout {self.cfg.launch_hook_timeout:g}s")
            else:  # IN_SERVICE, ABANDONED, DRAINED: nothing to do until the roster asks for a drain
                del self.waiting[iid]

    async def close(self) -> None:
        tasks = [e.hook for e in self.entries.values() if e.hook is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- starting calls ----------------------------------------------------------------------------

    def _drain_if_due(self, entry: Entry, deadline: float) -> None:
        """Terminate hook: a drain request for an instance not yet DRAINING or DRAINED (or DRAINING
        with no call of ours, after a restart) starts Drain. It wins over a running Prepare."""
        if entry.lifecycle == Lifecycle.DRAINED:
            return
        if entry.lifecycle == Lifecycle.DRAINING and entry.hook is not None and entry.hook_kind == TERMINATE:
            return
        cancelled = ""
        if entry.hook is not None:  # a running launch hook: the drain request wins
            entry.hook.cancel()
            entry.hook = None
            cancelled = ", launch hook cancelled"
        if deadline <= 0:
            # DRAINING found in the table with no drain request on the roster (none read yet, or the
            # controller runs without one): finish the drain the row says is under way.
            deadline = time.time() + self.cfg.drain_timeout
        timeout = min(max(1.0, deadline - time.time()), MAX_HOOK_TIMEOUT)
        self._start(entry, TERMINATE, self._drain(entry, timeout), f"timeout {timeout:.0f}s{cancelled}")

    def _start(self, entry: Entry, kind: str, work: Coroutine[Any, Any, None], why: str) -> None:
        phase = Lifecycle.PREPARING if kind == LAUNCH else Lifecycle.DRAINING
        resumed = entry.lifecycle == phase
        if not resumed and not self._write(entry, phase, None, None):
            work.close()  # the row was freed meanwhile: no call (the poll loop forgets the entry)
            return
        entry.hook = asyncio.get_running_loop().create_task(work, name=f"{kind} hook {entry.instance_id}")
        entry.hook_kind = kind
        entry.hook_started = time.monotonic()
        if not resumed:
            self.log.info("%s: %s hook started (%s): %s", entry.instance_id, kind, why, phase.label)
        elif entry.hook_failures == 0:  # (a retry was announced by the failure's own line)
            self.log.info(
                "%s: %s hook already %s: following the agent's run (MonitorS restarted, or the agent moved)",
                entry.instance_id,
                kind,
                phase.label,
            )

    # -- the calls -----------------------------------------------------------------------------------

    async def _prepare(self, entry: Entry) -> None:
        assert entry.stub is not None  # connect() set it before the entry was tracked
        timeout = self.cfg.launch_hook_timeout
        request = helix_pb2.HookRequest(instance_id=entry.instance_id, timeout_seconds=timeout, reason=LAUNCH)
        try:
            final = await self._follow(entry.stub.Prepare, entry, request, timeout)
        except asyncio.CancelledError:
            raise  # a drain request, or the row went: nothing to write
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # An agent from before hooks: it has no launch hook to run, as one with none configured.
                self._end(entry, LAUNCH, Lifecycle.IN_SERVICE, HookResult.CONTINUE, "agent has no hooks", 0.0)
            else:
                self._retry_later(entry, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a broken stream or a closed channel: call again later
            self._retry_later(entry, exc)
            return
        finally:
            self._done(entry)
        result = _FINAL[final.result]
        # CONTINUE: the instance may serve. ABANDON or TIMEOUT: a failed launch, the controller replaces it.
        phase = Lifecycle.IN_SERVICE if result == HookResult.CONTINUE else Lifecycle.ABANDONED
        self._end(entry, LAUNCH, phase, result, final.detail, final.elapsed_seconds)

    async def _drain(self, entry: Entry, timeout: float) -> None:
        assert entry.stub is not None
        request = helix_pb2.HookRequest(instance_id=entry.instance_id, timeout_seconds=timeout, reason=TERMINATE)
        try:
            final = await self._follow(entry.stub.Drain, entry, request, timeout)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # An agent from before hooks has nothing to drain: as one with no hook configured.
                self._end(entry, TERMINATE, Lifecycle.DRAINED, HookResult.CONTINUE, "agent has no hooks", 0.0)
            else:  # it cannot be asked: nothing more to wait for, the controller proceeds
                self._end(entry, TERMINATE, Lifecycle.DRAINED, HookResult.FAILED, describe(exc), 0.0)
            return
        except Exception as exc:  # noqa: BLE001 - a broken stream or a closed channel: the drain failed
            self._end(entry, TERMINATE, Lifecycle.DRAINED, HookResult.FAILED, describe(exc), 0.0)
            return
        finally:
            self._done(entry)
        self._end(entry, TERMINATE, Lifecycle.DRAINED, _FINAL[final.result], final.detail, final.elapsed_seconds)

    async def _follow(
        self, method: Callable[..., Any], entry: Entry, request: helix_pb2.HookRequest, timeout: float
    ) -> helix_pb2.HookProgress:
        """Read the hook's stream to its final message. Raises AioRpcError for a failed call,
        HookBroken for a stream that ends without a result or stays silent for HOOK_SILENCE."""
        call = method(request, timeout=timeout + HOOK_DEADLINE_MARGIN, metadata=entry.metadata)
        try:
            while True:
                try:
                    message = await asyncio.wait_for(call.read(), HOOK_SILENCE)
                except TimeoutError:
                    raise HookBroken(f"no heartbeat for {HOOK_SILENCE:g}s") from None
                if message is grpc.aio.EOF:
                    raise HookBroken("the stream ended without a result")
                if message.result in _FINAL:
                    return message
                if message.result != helix_pb2.HookProgress.RUNNING:
                    raise HookBroken(f"unknown result {message.result}")
        finally:
            call.cancel()  # a no-op once the call ended; stops the stream when we leave early

    # -- results ---------------------------------------------------------------------------------------

    def _retry_later(self, entry: Entry, exc: BaseException) -> None:
        """Launch hook: the call failed before a result. The row stays PREPARING; call again after a
        back-off, once the agent answers polls again (see `step`)."""
        if self.entries.get(entry.instance_id) is not entry:
            return
        entry.hook_failures += 1
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (entry.hook_failures - 1))
        entry.hook_retry_at = asyncio.get_running_loop().time() + delay
        self.waiting[entry.instance_id] = entry
        self.log.warning(
            "%s: launch hook call failed after %.1fs (%s): still preparing, calling again in %gs",
            entry.instance_id,
            time.monotonic() - entry.hook_started,
            describe(exc),
            delay,
        )

    def _end(
        self, entry: Entry, kind: str, phase: Lifecycle, result: HookResult, detail: str, agent_elapsed: float
    ) -> None:
        if self.entries.get(entry.instance_id) is not entry:
            return
        entry.hook_failures = 0
        detail = oneline(detail)
        if not self._write(entry, phase, result, detail):
            return
        # The agent's count runs from the hook's start (it may predate this MonitorS); ours from our call.
        ours = time.monotonic() - entry.hook_started
        elapsed = agent_elapsed if math.isfinite(agent_elapsed) and agent_elapsed > 0 else ours
        self.log.info(
            "%s: %s hook %s after %.1fs (%s): %s",
            entry.instance_id,
            kind,
            result.label,
            elapsed,
            detail or "no detail",
            phase.label,
        )

    def _write(self, entry: Entry, phase: Lifecycle, result: HookResult | None, detail: str | None) -> bool:
        now = time.time()
        if not self.table.write_lifecycle(entry.slot, entry.instance_id, phase, now, result, detail):
            return False  # the row was freed meanwhile: the poll loop forgets the entry
        if entry.lifecycle != phase:
            entry.lifecycle_at = now
        entry.lifecycle = phase
        if result is not None:
            entry.hook_result = result
        if detail is not None:
            entry.hook_detail = detail
        return True

    @staticmethod
    def _done(entry: Entry) -> None:
        if entry.hook is asyncio.current_task():
            entry.hook = None
            entry.hook_kind = ""
