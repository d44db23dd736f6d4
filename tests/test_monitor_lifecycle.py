"""Lifecycle hooks end to end: a real MonitorS process runs the launch hook (Prepare) and the
terminate hook (Drain) against scripted agents, and writes each row's lifecycle in a real table.

The agents are fakes served from this test process over real gRPC on loopback (`FakeAgent`), so a
test decides what each hook says and when, can kill an agent mid-hook and bring it back on the same
port, and counts the calls and the runs (a call made while a run is under way follows it, as the
agent's contract says).
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest

from protos import helix_pb2, helix_pb2_grpc
from shared.table import HookResult, Lifecycle, MetricsTable, Notice, RosterEntry, State
from tests.procs import ROOT, free_port, wait_for
from tests.test_monitor_e2e import (
    AUTH,
    POLL,
    assert_promtool_valid,
    http_get,
    inspect_json,
    rows,
    start_monitor,
    wait_state,
)
from tests.test_table import run_inspect

pytestmark = pytest.mark.slow

RUNNING, CONTINUE, ABANDON, TIMEOUT = (
    helix_pb2.HookProgress.RUNNING,
    helix_pb2.HookProgress.CONTINUE,
    helix_pb2.HookProgress.ABANDON,
    helix_pb2.HookProgress.TIMEOUT,
)
HOOKS = ("Prepare", "Drain")
LAUNCH_TIMEOUT = 30


class FakeAgent(helix_pb2_grpc.AgentServicer):
    """An agent as MonitorS sees one, with scripted hooks. Each hook has one run: the first call
    starts it, every later call follows it (heartbeats while it is held, then its result), as
    MonitorC's idempotent hooks do. A held hook sends RUNNING every 0.2 s until `release`."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id
        self.port = free_port()
        self.lock = threading.Lock()
        self.calls: dict[str, list[helix_pb2.HookRequest]] = {h: [] for h in HOOKS}
        self.bearers: dict[str, list[str]] = {h: [] for h in HOOKS}
        self.runs = dict.fromkeys(HOOKS, 0)
        self.started: dict[str, float] = {}
        self.outcome: dict[str, tuple[int, str]] = {"Prepare": (CONTINUE, "exit 0"), "Drain": (CONTINUE, "drained")}
        self.released = {h: threading.Event() for h in HOOKS}
        for event in self.released.values():
            event.set()  # not held: a hook ends at once
        self.silent_calls = 0  # the next N hook calls send one heartbeat, then nothing until released
        self.hooks = True  # False: an agent from before hooks (UNIMPLEMENTED)
        self.notice: tuple[int, float] = (helix_pb2.NOTICE_NONE, 0.0)
        self.credential = ""  # from the Register answer
        self.server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeAgent:
        # Without SO_REUSEPORT (gRPC sets it by default): another server that picked the same free
        # port, in any process of this user, can then not share this agent's port and answer for it.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
        helix_pb2_grpc.add_AgentServicer_to_server(self, server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError:
            bound = 0
        assert bound == self.port, f"port {self.port} is taken: cannot serve {self.instance_id} there"
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        """The agent dies: every call in flight is cut, and nothing answers on its port."""
        if self.server is not None:
            self.server.stop(grace=None).wait(10)
            self.server = None

    def hold(self, hook: str) -> None:
        self.released[hook].clear()

    def release(self, hook: str, result: int, detail: str) -> None:
        self.outcome[hook] = (result, detail)
        self.released[hook].set()

    def n_calls(self, hook: str) -> int:
        with self.lock:
            return len(self.calls[hook])

    # -- the Agent service -------------------------------------------------------------------------

    def Heartbeat(self, request, context):
        return helix_pb2.HeartbeatResponse(agent_time=time.time(), app_live=True, instance_id=self.instance_id)

    def GetMetrics(self, request, context):
        return helix_pb2.Metrics(
            cpu=0.1,
            vcpus=1,
            mem=0.2,
            app_live=True,
            app_detail="ok",
            sample_time=time.time(),
            instance_id=self.instance_id,
            notice=self.notice[0],
            notice_at=self.notice[1],
        )

    def Prepare(self, request, context):
        return self._hook("Prepare", request, context)

    def Drain(self, request, context):
        return self._hook("Drain", request, context)

    def _hook(self, hook, request, context):
        with self.lock:
            self.calls[hook].append(request)
            self.bearers[hook].append(dict(context.invocation_metadata()).get("authorization", ""))
            if hook not in self.started:
                self.started[hook] = time.monotonic()
                self.runs[hook] += 1
            silent = self.silent_calls > 0
            self.silent_calls -= silent
        if not self.hooks:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return self._progress(hook, context, silent)

    def _progress(self, hook, context, silent):
        released = self.released[hook]
        if not released.is_set():
            yield helix_pb2.HookProgress(result=RUNNING, elapsed_seconds=time.monotonic() - self.started[hook])
            while not released.wait(0.2):
                if not context.is_active():
                    return  # the caller went away; the run carries on for the next call
                if not silent:  # silent: connected, but no more heartbeats (a hung agent)
                    elapsed = time.monotonic() - self.started[hook]
                    yield helix_pb2.HookProgress(result=RUNNING, elapsed_seconds=elapsed)
        result, detail = self.outcome[hook]
        yield helix_pb2.HookProgress(
            result=result, elapsed_seconds=time.monotonic() - self.started[hook], detail=detail
        )


@pytest.fixture
def fakes():
    """Start fake agents through this; each is stopped when the test ends, pass or fail."""
    made: list[FakeAgent] = []

    def make(instance_id: str, serve: bool = True) -> FakeAgent:
        fake = FakeAgent(instance_id)
        made.append(fake)
        return fake.start() if serve else fake

    yield make
    for fake in made:
        fake.stop()


def register(port: int, fake: FakeAgent, secret: str = "", address: str = "") -> None:
    """Register `fake` with MonitorS as its agent would (the fleet token, or its own secret),
    retrying while MonitorS is not listening yet (it writes its heartbeat before it serves)."""
    request = helix_pb2.RegisterRequest(
        instance_id=fake.instance_id, address=address or fake.address, vcpus=1, instance_secret=secret
    )

    def attempt():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                return helix_pb2_grpc.RegistryStub(channel).Register(
                    request, metadata=() if secret else AUTH, timeout=10
                )
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise AssertionError(f"Register of {fake.instance_id}: {exc.code().name} {exc.details()}") from None
                return None

    fake.credential = wait_for(attempt, 30, f"MonitorS to register {fake.instance_id}").credential


def wait_lifecycle(table_name: str, instance_id: str, lifecycle: Lifecycle, timeout: float = 30):
    def check():
        row = rows(table_name).get(instance_id)
        return row if row is not None and row.lifecycle == lifecycle else None

    return wait_for(check, timeout, f"{instance_id} to be {lifecycle.label}")


def called(fake: FakeAgent, hook: str, n: int = 1) -> None:
    """Wait for the n-th call of `hook`: MonitorS writes PREPARING or DRAINING before its call
    reaches the agent, so the row can say so a moment before the agent has seen anything."""
    wait_for(lambda: fake.n_calls(hook) >= n, 30, f"{fake.instance_id}'s {hook} call #{n}")
    assert fake.n_calls(hook) == n, f"{fake.instance_id}: {fake.n_calls(hook)} {hook} calls, expected {n}"


def polled_twice_more(table_name: str, instance_id: str) -> None:
    """Two more poll cycles have run (no fixed sleep: the row's last_seen says so)."""
    seen = rows(table_name)[instance_id].last_seen
    wait_for(lambda: rows(table_name)[instance_id].last_seen >= seen + 2 * POLL, 30, f"two more polls of {instance_id}")


def log_lines(proc, *parts: str) -> list[str]:
    return [line for line in proc.output().splitlines() if all(p in line for p in parts)]


def roster_of(*fakes_: FakeAgent, drain: dict[str, float] | None = None) -> list[RosterEntry]:
    drain = drain or {}
    return [
        RosterEntry(
            f.instance_id, f.address, hashlib.sha256(secret_of(f).encode()).digest(), drain.get(f.instance_id, 0)
        )
        for f in fakes_
    ]


def secret_of(fake: FakeAgent) -> str:
    return f"secret-of-{fake.instance_id}"


def publish(table_name: str, entries: list[RosterEntry]) -> None:
    with MetricsTable.attach(table_name) as table:
        table.publish_roster(entries, time.time())


# ---------------------------------------------------------------------------------------------
# The launch hook (HELIX_ROSTER=off: no controller, Prepare still runs)


def test_launch_hook_outcomes(procs, table_name, fakes):
    """CONTINUE -> in service, ABANDON and TIMEOUT -> abandoned, an agent without hooks -> in
    service; one Prepare per instance, with its own credential, and nothing more once it ended."""
    port = free_port()
    monitor = start_monitor(procs, table_name, port, HELIX_LAUNCH_HOOK_TIMEOUT=LAUNCH_TIMEOUT)
    ok, abandon, timeout, old = (fakes(i) for i in ("i-ok", "i-abandon", "i-timeout", "i-old"))
    ok.hold("Prepare")
    abandon.outcome["Prepare"] = (ABANDON, "exit 3: no database\nsecond line")
    timeout.outcome["Prepare"] = (TIMEOUT, "stopped after 30s")
    old.hooks = False
    for fake in (ok, abandon, timeout, old):
        register(port, fake)

    row = wait_lifecycle(table_name, "i-ok", Lifecycle.PREPARING)
    assert row.state == State.HEALTHY and row.hook_result == HookResult.NONE and row.lifecycle_at > 0
    called(ok, "Prepare")
    request = ok.calls["Prepare"][0]
    assert (request.instance_id, request.timeout_seconds, request.reason) == ("i-ok", LAUNCH_TIMEOUT, "launch")
    assert ok.bearers["Prepare"] == [f"Bearer {ok.credential}"], "the agent's own credential, not the fleet token"
    ok.release("Prepare", CONTINUE, "exit 0")
    row = wait_lifecycle(table_name, "i-ok", Lifecycle.IN_SERVICE)
    assert (row.hook_result, row.hook_detail) == (HookResult.CONTINUE, "exit 0")

    row = wait_lifecycle(table_name, "i-abandon", Lifecycle.ABANDONED)
    assert row.hook_result == HookResult.ABANDON and row.hook_detail == "exit 3: no database second line"
    row = wait_lifecycle(table_name, "i-timeout", Lifecycle.ABANDONED)
    assert (row.hook_result, row.hook_detail) == (HookResult.TIMEOUT, "stopped after 30s")
    row = wait_lifecycle(table_name, "i-old", Lifecycle.IN_SERVICE)
    assert (row.hook_result, row.hook_detail) == (HookResult.CONTINUE, "agent has no hooks")

    # Once ended, a hook is not called again: two more cycles, still one call each.
    polled_twice_more(table_name, "i-ok")
    assert [f.n_calls("Prepare") for f in (ok, abandon, timeout, old)] == [1, 1, 1, 1]
    assert all(f.n_calls("Drain") == 0 for f in (ok, abandon, timeout, old)), "no roster: no drain"
    # One INFO line per transition, naming the instance, the hook, the result and the time it took.
    assert len(log_lines(monitor, "i-ok: launch hook started (timeout 30s): preparing")) == 1
    (ended,) = log_lines(monitor, "i-ok: launch hook continue after")
    assert ended.endswith("s (exit 0): in-service") and " INFO " in ended, ended
    assert len(log_lines(monitor, "i-abandon: launch hook abandon after", ": abandoned")) == 1
    assert len(log_lines(monitor, "i-timeout: launch hook timeout after", ": abandoned")) == 1
    assert len(log_lines(monitor, "i-old: launch hook continue after", "(agent has no hooks): in-service")) == 1

    # Registering again keeps the lifecycle: from the same address (the row is refreshed), and from a
    # new one (the row is rewritten; the instance is still in service, so no new Prepare).
    register(port, ok)
    moved = fakes("i-ok")
    register(port, moved)
    wait_for(lambda: rows(table_name)["i-ok"].address == moved.address, 10, "i-ok's new address")
    polled_twice_more(table_name, "i-ok")
    row = rows(table_name)["i-ok"]
    assert (row.lifecycle, row.hook_result, row.hook_detail) == (Lifecycle.IN_SERVICE, HookResult.CONTINUE, "exit 0")
    assert moved.n_calls("Prepare") == 0 and ok.n_calls("Prepare") == 1


def test_launch_hook_waits_for_the_first_answer_and_retries_an_unreachable_agent(procs, table_name, fakes):
    """No Prepare before the agent answered a poll; an agent that dies mid-Prepare leaves the row
    PREPARING (the controller's health grace decides, not MonitorS) and is called again once it
    answers, following the same run."""
    port = free_port()
    monitor = start_monitor(procs, table_name, port)
    fake = fakes("i-flaky", serve=False)  # registered before it serves: its polls fail
    fake.hold("Prepare")
    register(port, fake)
    wait_for(lambda: rows(table_name)["i-flaky"].failures >= 2, 30, "two failed polls of i-flaky")
    assert rows(table_name)["i-flaky"].lifecycle == Lifecycle.NONE and fake.n_calls("Prepare") == 0
    fake.start()
    wait_lifecycle(table_name, "i-flaky", Lifecycle.PREPARING)
    called(fake, "Prepare")

    fake.stop()  # dies mid-hook
    wait_for(lambda: log_lines(monitor, "i-flaky: launch hook call failed"), 30, "the failed call logged")
    wait_for(lambda: rows(table_name)["i-flaky"].failures >= 2, 30, "two failed polls after the agent died")
    row = rows(table_name)["i-flaky"]
    assert row.lifecycle == Lifecycle.PREPARING and row.hook_result == HookResult.NONE
    assert fake.n_calls("Prepare") == 1, "no call while the agent answers no poll"

    fake.start()  # back on the same port: MonitorS calls again and follows the same run
    called(fake, "Prepare", 2)
    assert fake.runs["Prepare"] == 1 and rows(table_name)["i-flaky"].lifecycle == Lifecycle.PREPARING
    fake.release("Prepare", CONTINUE, "exit 0")
    row = wait_lifecycle(table_name, "i-flaky", Lifecycle.IN_SERVICE)
    assert row.hook_result == HookResult.CONTINUE and fake.runs["Prepare"] == 1
    failed = log_lines(monitor, "i-flaky: launch hook call failed")
    assert "still preparing, calling again in 1s" in failed[0] and " WARNING " in failed[0], failed


def test_a_silent_hook_stream_counts_as_broken(procs, table_name, fakes):
    """An agent that stops sending heartbeats (3 x 2 s) mid-Prepare, while its connection stays up:
    the call is given up and made again."""
    port = free_port()
    monitor = start_monitor(procs, table_name, port)
    fake = fakes("i-silent")
    fake.hold("Prepare")
    fake.silent_calls = 1
    register(port, fake)
    wait_lifecycle(table_name, "i-silent", Lifecycle.PREPARING)
    called(fake, "Prepare", 2)  # again, after the silence
    (failed,) = log_lines(monitor, "i-silent: launch hook call failed")
    assert "no heartbeat for 6s" in failed, failed
    fake.release("Prepare", CONTINUE, "exit 0")
    wait_lifecycle(table_name, "i-silent", Lifecycle.IN_SERVICE)
    assert fake.runs["Prepare"] == 1


# ---------------------------------------------------------------------------------------------
# The terminate hook: the controller's roster asks for a drain (HELIX_ROSTER=required)


def start_fleet(procs, table_name, fakes, *ids: str):
    port = free_port()
    monitor = start_monitor(procs, table_name, port, HELIX_ROSTER="required")
    agents = [fakes(i) for i in ids]
    publish(table_name, roster_of(*agents))
    for fake in agents:
        register(port, fake, secret_of(fake))
    return port, monitor, agents


def test_drain_request_drains_and_wins_over_a_running_launch_hook(procs, table_name, fakes):
    port, monitor, (web, slow) = start_fleet(procs, table_name, fakes, "i-web", "i-slow")
    slow.hold("Prepare")
    wait_lifecycle(table_name, "i-web", Lifecycle.IN_SERVICE)
    wait_lifecycle(table_name, "i-slow", Lifecycle.PREPARING)
    polled_twice_more(table_name, "i-web")
    assert web.n_calls("Drain") == 0, "no drain before the roster asks for one"

    web.hold("Drain")
    deadline = time.time() + 40
    publish(table_name, roster_of(web, slow, drain={"i-web": deadline, "i-slow": deadline}))
    row = wait_lifecycle(table_name, "i-web", Lifecycle.DRAINING)
    assert row.hook_result == HookResult.CONTINUE, "the launch hook's result stays until the drain ends"
    called(web, "Drain")
    request = web.calls["Drain"][0]
    assert request.instance_id == "i-web" and request.reason == "terminate"
    assert 25 <= request.timeout_seconds <= 40, request.timeout_seconds
    assert web.bearers["Drain"] == [f"Bearer {web.credential}"]

    # i-slow was still preparing: the drain wins, its Prepare is cancelled and never comes back.
    row = wait_lifecycle(table_name, "i-slow", Lifecycle.DRAINED)
    assert (row.hook_result, row.hook_detail) == (HookResult.CONTINUE, "drained")
    assert len(log_lines(monitor, "i-slow: terminate hook started", "launch hook cancelled): draining")) == 1
    assert slow.n_calls("Prepare") == 1

    web.release("Drain", CONTINUE, "3 requests finished")
    row = wait_lifecycle(table_name, "i-web", Lifecycle.DRAINED)
    assert (row.hook_result, row.hook_detail) == (HookResult.CONTINUE, "3 requests finished")
    assert row.state == State.HEALTHY, "drained, not gone: the controller terminates it"
    assert len(log_lines(monitor, "i-web: terminate hook continue after", "(3 requests finished): drained")) == 1
    # The roster still asks: nothing more is called.
    polled_twice_more(table_name, "i-web")
    assert web.n_calls("Drain") == 1 and web.runs["Drain"] == 1


def test_drain_of_an_agent_that_dies_mid_drain_fails(procs, table_name, fakes):
    """An agent that dies mid-drain: DRAINED, FAILED, the error as the detail (nothing more to wait
    for). An agent from before hooks has nothing to drain: DRAINED, CONTINUE."""
    _, monitor, (fake, old) = start_fleet(procs, table_name, fakes, "i-dies", "i-old")
    old.hooks = False
    wait_lifecycle(table_name, "i-dies", Lifecycle.IN_SERVICE)
    wait_lifecycle(table_name, "i-old", Lifecycle.IN_SERVICE)
    fake.hold("Drain")
    deadline = time.time() + 60
    publish(table_name, roster_of(fake, old, drain={"i-dies": deadline, "i-old": deadline}))
    wait_lifecycle(table_name, "i-dies", Lifecycle.DRAINING)
    called(fake, "Drain")
    fake.stop()
    row = wait_lifecycle(table_name, "i-dies", Lifecycle.DRAINED)
    assert row.hook_result == HookResult.FAILED and row.hook_detail, row
    assert len(log_lines(monitor, "i-dies: terminate hook failed after", ": drained")) == 1
    row = wait_lifecycle(table_name, "i-old", Lifecycle.DRAINED)
    assert (row.hook_result, row.hook_detail) == (HookResult.CONTINUE, "agent has no hooks")


def test_monitor_restarted_mid_drain_follows_the_same_run(procs, table_name, fakes):
    port, monitor, (fake,) = start_fleet(procs, table_name, fakes, "i-long")
    wait_lifecycle(table_name, "i-long", Lifecycle.IN_SERVICE)
    fake.hold("Drain")
    publish(table_name, roster_of(fake, drain={"i-long": time.time() + 120}))
    wait_lifecycle(table_name, "i-long", Lifecycle.DRAINING)
    called(fake, "Drain")

    monitor.signal(signal.SIGKILL)  # no goodbye: the row stays DRAINING, with nobody following it
    monitor.wait(timeout=15)
    restarted = start_monitor(procs, table_name, port, HELIX_ROSTER="required")
    called(fake, "Drain", 2)  # the restarted MonitorS calls again
    assert fake.runs["Drain"] == 1, "the second call follows the first run"
    assert fake.bearers["Drain"][1] == fake.bearers["Drain"][0], "the same credential after the restart"
    assert rows(table_name)["i-long"].lifecycle == Lifecycle.DRAINING
    assert len(log_lines(restarted, "i-long: terminate hook already draining: following the agent's run")) == 1

    fake.release("Drain", CONTINUE, "drained")
    row = wait_lifecycle(table_name, "i-long", Lifecycle.DRAINED)
    assert row.hook_result == HookResult.CONTINUE and fake.n_calls("Prepare") == 1


# ---------------------------------------------------------------------------------------------
# Notices, and what operators see: inspect and Prometheus


def test_notices_inspect_and_prometheus(procs, table_name, fakes):
    from prometheus_client.parser import text_string_to_metric_families

    port, metrics_port = free_port(), free_port()
    start_monitor(procs, table_name, port, HELIX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    spot, held = fakes("i-spot"), fakes("i-held")
    held.hold("Prepare")
    spot.notice = (helix_pb2.NOTICE_REBALANCE, -5.0)
    register(port, spot)
    register(port, held)
    row = wait_for(lambda: (r := rows(table_name)["i-spot"]).notice == Notice.REBALANCE and r, 30, "the rebalance")
    assert row.notice_at == 0.0, "a time that is none reads as 0"
    at = time.time() + 120
    spot.notice = (helix_pb2.NOTICE_INTERRUPTION, at)
    row = wait_for(
        lambda: (r := rows(table_name)["i-spot"]).notice == Notice.INTERRUPTION and r, 30, "the interruption"
    )
    assert row.notice_at > 0  # its exact value: test_an_interruption_time_is_kept_as_sent
    spot.notice = (helix_pb2.NOTICE_INTERRUPTION, math.nan)
    wait_for(lambda: rows(table_name)["i-spot"].notice_at == 0.0, 30, "a NaN notice time written as 0")
    spot.notice = (7, at)  # a notice this MonitorS does not know (a newer agent): none
    wait_for(lambda: rows(table_name)["i-spot"].notice == Notice.NONE, 30, "an unknown notice read as none")
    assert rows(table_name)["i-spot"].notice_at == 0.0
    spot.notice = (helix_pb2.NOTICE_INTERRUPTION, at)
    wait_lifecycle(table_name, "i-spot", Lifecycle.IN_SERVICE)
    wait_for(lambda: rows(table_name)["i-spot"].notice == Notice.INTERRUPTION, 30, "the interruption again")
    wait_lifecycle(table_name, "i-held", Lifecycle.PREPARING)
    wait_state(table_name, "i-held", State.HEALTHY)

    shown = {r["instance_id"]: r for r in inspect_json(table_name)["instances"]}
    assert shown["i-spot"]["lifecycle"] == "in-service" and shown["i-spot"]["hook_result"] == "continue"
    assert shown["i-spot"]["hook_detail"] == "exit 0" and shown["i-spot"]["notice"] == "interruption"
    assert shown["i-spot"]["notice_at"] > 0 and shown["i-spot"]["notice_in_s"] is not None
    assert shown["i-held"]["lifecycle"] == "preparing" and shown["i-held"]["hook_result"] == "none"
    assert shown["i-held"]["notice"] == "none" and shown["i-held"]["notice_at"] is None
    assert shown["i-held"]["lifecycle_age_s"] >= 0

    def scrape() -> str:
        status, body, _ = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200, (status, body)
        return body

    def sample_values(text: str) -> dict:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    text = wait_for(
        lambda: (
            (t := scrape()) and sample_values(t).get(("helix_instance_notices", (("notice", "interruption"),))) and t
        ),
        30,
        "the interruption in the exposition",
    )
    values = sample_values(text)
    by_phase = {
        dict(labels)["lifecycle"]: v for (name, labels), v in values.items() if name == "helix_instances_lifecycle"
    }
    assert by_phase == {
        "none": 0,
        "preparing": 1,
        "in-service": 1,
        "abandoned": 0,
        "draining": 0,
        "drained": 0,
    }
    assert values[("helix_instance_notices", (("notice", "rebalance"),))] == 0
    assert values[("helix_instance_notices", (("notice", "interruption"),))] == 1
    assert_promtool_valid(text)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        section = fh.read().partition("## Prometheus metrics")[2].partition("\n## ")[0]
    for name in ("helix_instances_lifecycle", "helix_instance_notices"):
        assert f"`{name}`" in section, name

    # The text view: lifecycle column, the last hook, the notice.
    out = run_inspect("--name", table_name).stdout
    (spot_line,) = [line for line in out.splitlines() if line.startswith("i-spot ")]
    assert " in-service " in spot_line and "; hook continue (exit 0); NOTICE interruption in " in spot_line
    (held_line,) = [line for line in out.splitlines() if line.startswith("i-held ")]
    assert " preparing " in held_line and "hook" not in held_line and "NOTICE" not in held_line


def test_an_interruption_time_is_kept_as_sent(table_name):
    """What MonitorS writes for an interruption is when the instance goes: an epoch time, kept.
    (Was: write_samples capped every column from load1 on at 1e9, meant for the float32 ones, which
    wrote sample and interruption times as 2001-09-09.)"""
    from shared.table import InstanceRow, PollSample

    now = time.time()
    sample = PollSample(
        0,
        "i-1",
        State.HEALTHY,
        0,
        0.01,
        0.1,
        0.1,
        0.1,
        0,
        0,
        0,
        0,
        0,
        now,
        1,
        True,
        "ok",
        Notice.INTERRUPTION,
        now + 120,
    )
    with MetricsTable.open_or_create(table_name, 4) as table:
        table.register(InstanceRow("i-1", "127.0.0.1:1"))
        table.write_samples([sample], now)
        row = table.snapshot().instances()[0]
    assert row.notice_at == pytest.approx(now + 120)
