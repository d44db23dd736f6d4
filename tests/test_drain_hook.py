"""The demo's terminate hook (deploy/local/drain_hook.py): its rules on a fake clock, then as a real
process against a real sample app."""

from __future__ import annotations

import threading

import pytest

from deploy.local import drain_hook
from deploy.local.drain_hook import AppGone, NotSampleApp, Traffic, drain
from tests.procs import base_env, free_port
from tests.test_sample_app import get, inflight, start_app, wait_inflight


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(looks, quiet=1.0, budget=10.0, clock=None):
    """drain() over a script: looks[i] is what the i-th look sees (a Traffic or an exception); the
    last one repeats."""
    clock = clock or Clock()
    seen = []

    def look():
        item = looks[min(len(seen), len(looks) - 1)]
        seen.append(clock())
        if isinstance(item, Exception):
            raise item
        return item(clock()) if callable(item) else item

    status, line = drain(look, quiet, budget, 0.1, clock=clock, sleep=clock.sleep)
    return status, line, seen


def test_waits_for_the_requests_in_flight_then_for_quiet():
    busy, idle = Traffic(2, 999.0), Traffic(0, 1000.35)
    status, line, seen = run([busy] * 5 + [idle])
    assert status == 0 and line.startswith("drained in ")
    # Not before the last request (arrived at 1000.35) has been quiet for a second.
    assert seen[-1] == pytest.approx(1001.35, abs=0.11) and seen[-1] >= 1001.35 - 1e-9


def test_quiet_counts_from_its_own_start_even_for_an_app_idle_before():
    """The load balancer may send a request up to a second after the drain is published, so an app
    idle for long still waits `quiet` from when the hook began."""
    status, _, seen = run([Traffic(0, 10.0)], quiet=1.5)
    assert status == 0 and seen[-1] - seen[0] == pytest.approx(1.5, abs=0.11)


def test_app_gone_is_drained_at_once_and_a_foreign_app_is_refused():
    status, line, seen = run([AppGone("refused")])
    assert (status, len(seen)) == (0, 1) and "app gone" in line
    status, line, _ = run([NotSampleApp("GET /inflight answered 404")])
    assert status == 2 and "404" in line


def test_gives_up_at_its_budget_saying_why():
    status, line, seen = run([Traffic(3, 999.0)], budget=5.0)
    assert status == 1 and line.endswith(": 3 in flight") and line.startswith("gave up after 5s")
    assert seen[-1] - seen[0] == pytest.approx(5.0, abs=0.11)
    status, line, _ = run([TimeoutError("timed out")], budget=2.0)
    assert status == 1 and "app not answering (timed out)" in line
    # A slow answer is asked again, not taken for a drained app.
    status, _, seen = run([TimeoutError("slow")] * 3 + [Traffic(0, 0.0)], quiet=0.0)
    assert status == 0 and len(seen) == 4


def test_hook_timeout_comes_from_the_agent_and_leaves_room_to_say_why():
    assert drain_hook.hook_timeout({"HELIX_HOOK_TIMEOUT": "20"}, 300) == 20
    for bad in ("", "soon", "-1", "0", "inf", "nan"):
        assert drain_hook.hook_timeout({"HELIX_HOOK_TIMEOUT": bad}, 300) == 300, bad
    assert drain_hook.hook_timeout({}, 7) == 7
    assert drain_hook.give_up_after(20) == 19 and drain_hook.give_up_after(2) == pytest.approx(1.8)


# -- the real thing ----------------------------------------------------------------------------


def hook(procs, port: int, *args: str, **env: str):
    return procs.python("drain-hook", ["-m", "deploy.local.drain_hook", "--port", str(port), *args], base_env(**env))


def test_exits_only_once_the_request_in_flight_has_ended(procs):
    """A real request of a second of CPU is in flight when the hook starts: when the hook exits 0,
    the app has nothing in flight any more and the request got its answer."""
    _, port = start_app(procs)
    result = {}
    t = threading.Thread(target=lambda: result.update(answer=get(port, "/work?ms=1000")))
    t.start()
    try:
        wait_inflight(port, 1)
        proc = hook(procs, port, "--quiet", "0.2")
        assert proc.wait(timeout=60) == 0, proc.output()
        assert inflight(port)["inflight"] == 0
    finally:
        t.join(timeout=30)
    assert result.get("answer") == (200, b"done\n")
    assert proc.output().strip().startswith("drained in ")
    assert len(proc.output().strip().splitlines()) == 1


def test_app_gone_exits_zero_and_the_timeout_exits_one(procs):
    proc = hook(procs, free_port())
    assert proc.wait(timeout=60) == 0 and "app gone" in proc.output()
    _, port = start_app(procs)
    # Quiet longer than the agent's timeout: it can only give up, at about 0.9 s.
    proc = hook(procs, port, "--quiet", "30", HELIX_HOOK_TIMEOUT="1")
    assert proc.wait(timeout=60) == 1
    assert proc.output().strip().startswith("gave up after 1s: 0 in flight"), proc.output()


@pytest.mark.parametrize(
    "args, field",
    [(["--port", "0"], "--port=0"), (["--port", "80", "--quiet", "-1"], "--quiet=-1")],
)
def test_bad_arguments_exit_2_naming_the_field(procs, args, field):
    proc = procs.python("drain-hook", ["-m", "deploy.local.drain_hook", *args], base_env())
    assert proc.wait(timeout=30) == 2
    assert field in proc.output()
