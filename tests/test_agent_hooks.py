"""Lifecycle hooks (Agent.Prepare runs HELIX_LAUNCH_HOOK, Agent.Drain HELIX_TERMINATE_HOOK): real
agent processes running real hook commands, called over real gRPC on loopback."""

from __future__ import annotations

import math
import os
import shlex
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest

from controller_asg.providers.local import LocalProvider
from protos import helix_pb2, helix_pb2_grpc
from tests.procs import free_port, kill_local_instances, wait_for
from tests.test_monitor_e2e import AUTH, agent_env
from tests.test_provider_local import APP_CMD, fake_agent, make_cfg
from tests.test_provider_local import agent_env as recorded_env

pytestmark = pytest.mark.slow

IID = "i-hook"
R = helix_pb2.HookProgress


@pytest.fixture
def hook_dir(tmp_path):
    """Where test hooks write what they did. A hook runs in a session of its own, outside the
    agent's group that the `procs` fixture kills: every pid a hook wrote to a `*.pids` file here
    has its group killed afterwards, pass or fail (only processes started during this test)."""
    since = time.time()
    yield tmp_path
    for path in tmp_path.glob("*.pids"):
        for pid in pids(path):
            try:
                if psutil.Process(pid).create_time() >= since - 1:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (OSError, psutil.Error):
                pass


def pids(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def script(hook_dir: Path, name: str, body: str) -> str:
    """A hook command: `/bin/sh <file>` running `body`."""
    path = hook_dir / f"{name}.sh"
    path.write_text(body)
    return shlex.join(["/bin/sh", str(path)])


def start_agent(procs, **settings):
    # Nothing listens on the monitor's port: the agent keeps trying to register, which does not
    # matter here; it accepts the fleet token (AUTH) until it has a credential of its own.
    env = agent_env(IID, free_port(), **settings)
    agent = procs.python("agent", ["-m", "monitor_c"], env)
    addr = env["HELIX_AGENT_LISTEN"]

    def serving():
        with grpc.insecure_channel(addr) as ch:
            return helix_pb2_grpc.AgentStub(ch).Heartbeat(helix_pb2.HeartbeatRequest(), metadata=AUTH, timeout=2)

    wait_for(serving, 30, "the agent to serve")
    return agent, addr


def hook(addr: str, rpc: str, timeout_seconds: float = 30, reason: str = "test", instance_id: str = IID, metadata=AUTH):
    """Every HookProgress one Prepare or Drain call streams."""
    request = helix_pb2.HookRequest(instance_id=instance_id, timeout_seconds=timeout_seconds, reason=reason)
    deadline = (timeout_seconds if math.isfinite(timeout_seconds) else 0) + 30
    with grpc.insecure_channel(addr) as ch:
        return list(getattr(helix_pb2_grpc.AgentStub(ch), rpc)(request, metadata=metadata, timeout=deadline))


def refused(addr: str, rpc: str, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        hook(addr, rpc, **kwargs)
    return info.value


def final(messages) -> tuple[str, str]:
    """The last message's (result, detail); every one before it must be a RUNNING heartbeat."""
    assert messages and all(m.result == R.RUNNING for m in messages[:-1]), messages
    return R.Result.Name(messages[-1].result), messages[-1].detail


def test_no_hook_continues_and_bad_calls_are_refused(procs):
    agent, addr = start_agent(procs)
    assert "hooks none" in agent.output()
    for rpc in ("Prepare", "Drain"):
        assert final(hook(addr, rpc)) == ("CONTINUE", "no hook")
        assert final(hook(addr, rpc)) == ("CONTINUE", "no hook")  # and again
        err = refused(addr, rpc, instance_id="i-other")
        assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("instance_id: "), err
        for bad in (0, 0.5, 7201, -1, math.nan):
            err = refused(addr, rpc, timeout_seconds=bad)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert err.details() == f"timeout_seconds: {bad:g}, expected 1 to 7200 seconds"
        err = refused(addr, rpc, reason="é" * 101)  # 202 bytes
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == "reason: 202 bytes, expected at most 200"
        err = refused(addr, rpc, reason="two\nlines")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("reason: 'two\\nlines'")
        # The same bearer check as every other call.
        assert refused(addr, rpc, metadata=()).code() == grpc.StatusCode.UNAUTHENTICATED
    assert agent.output().count("hook: none configured: CONTINUE") == 2  # once per kind


def test_exit_codes_become_results_and_the_hook_sees_its_environment(procs, hook_dir):
    long_line = "closing 1234 connections to the load balancer, slowly"
    launch = script(
        hook_dir, "launch", f'echo run >> {hook_dir}/launch.runs\nenv > {hook_dir}/launch.env\necho "warm"\n'
    )
    terminate = script(hook_dir, "terminate", f'echo first\necho "{long_line}"\nexit 3\n')
    agent, addr = start_agent(procs, HELIX_LAUNCH_HOOK=launch, HELIX_TERMINATE_HOOK=terminate)
    assert "hooks launch+terminate" in agent.output()

    # Refused calls never start the hook.
    refused(addr, "Prepare", instance_id="i-other")
    refused(addr, "Prepare", timeout_seconds=0)
    assert not (hook_dir / "launch.runs").exists()

    first = hook(addr, "Prepare", timeout_seconds=42, reason="scale out: 2 -> 3")
    assert final(first) == ("CONTINUE", "exit 0")
    env = dict(line.split("=", 1) for line in (hook_dir / "launch.env").read_text().splitlines() if "=" in line)
    assert env["HELIX_HOOK"] == "launch" and env["HELIX_INSTANCE_ID"] == IID
    assert env["HELIX_HOOK_TIMEOUT"] == "42" and env["HELIX_HOOK_REASON"] == "scale out: 2 -> 3"
    assert "HELIX_TOKEN" not in env  # the agent's secrets stay the agent's
    # After it ended: the same result, the same run, not a second one.
    again = hook(addr, "Prepare", timeout_seconds=5, reason="again")
    assert final(again) == ("CONTINUE", "exit 0") and again[-1].elapsed_seconds == first[-1].elapsed_seconds
    assert (hook_dir / "launch.runs").read_text() == "run\n"

    assert final(hook(addr, "Drain", reason="scale in")) == ("ABANDON", f"exit 3: {long_line[:40]}")
    log = agent.output()
    # Its output in the agent's log, one line per line, and one line as it starts and as it ends.
    assert "terminate hook: first" in log and f"terminate hook: {long_line}" in log
    assert log.count("terminate hook started") == 1 and log.count("terminate hook ended: ABANDON") == 1
    assert "launch hook: warm" in log and log.count("launch hook ended: CONTINUE") == 1
    assert "Prepare called again (reason: 'again'): the launch hook already ended: CONTINUE" in log


def test_a_hook_past_its_timeout_is_killed_with_everything_it_started(procs, hook_dir):
    body = (
        f"echo $$ >> {hook_dir}/drain.pids\n"
        f"sleep 120 & echo $! >> {hook_dir}/drain.pids\n"
        f"sh -c 'sleep 120; echo never' & echo $! >> {hook_dir}/drain.pids\n"
        'echo "waiting for connections to close"\n'
        "wait\n"
    )
    agent, addr = start_agent(procs, HELIX_TERMINATE_HOOK=script(hook_dir, "drain", body))
    messages = hook(addr, "Drain", timeout_seconds=2)
    assert final(messages) == ("TIMEOUT", "timed out after 2s: waiting for connections to close")
    assert 2 <= messages[-1].elapsed_seconds < 10
    started = pids(hook_dir / "drain.pids")
    assert len(started) == 3
    wait_for(lambda: all(gone(pid) for pid in started), 15, "the hook's whole process group to be gone")
    assert "terminate hook: still running after 2s: stopping its process group" in agent.output()
    assert agent.alive()


def test_heartbeats_while_it_runs_and_a_second_call_follows_the_same_run(procs, hook_dir):
    runs = hook_dir / "runs"
    body = f"echo $$ >> {hook_dir}/slow.pids\necho run >> {runs}\nsleep 5\necho ready\n"
    agent, addr = start_agent(procs, HELIX_LAUNCH_HOOK=script(hook_dir, "slow", body))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(hook, addr, "Prepare", 30, "first")
        wait_for(lambda: runs.exists(), 15, "the hook to start")
        second = pool.submit(hook, addr, "Prepare", 60, "second")
        a, b = first.result(timeout=60), second.result(timeout=60)
    for messages in (a, b):
        assert final(messages) == ("CONTINUE", "exit 0")
        heartbeats = [m.elapsed_seconds for m in messages[:-1]]
        assert heartbeats and heartbeats == sorted(heartbeats) and heartbeats[-1] < messages[-1].elapsed_seconds
    assert len(a) >= 3  # a 5 s hook, a heartbeat every 2 s
    assert a[-1].elapsed_seconds == b[-1].elapsed_seconds >= 5  # one run, followed twice
    assert runs.read_text() == "run\n"
    log = agent.output()
    assert "launch hook started (pid" in log and "timeout 30s, reason: 'first'" in log  # the first call's
    assert "Prepare called again (reason: 'second'): following the launch hook, running for" in log


def test_sigterm_of_the_agent_kills_the_running_hooks_group(procs, hook_dir):
    body = f"echo $$ >> {hook_dir}/long.pids\nsleep 300 & echo $! >> {hook_dir}/long.pids\nwait\n"
    agent, addr = start_agent(procs, HELIX_TERMINATE_HOOK=script(hook_dir, "long", body))
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(hook, addr, "Drain", 600, "scale in")
        wait_for(lambda: len(pids(hook_dir / "long.pids")) == 2, 15, "the hook and its child to start")
        started = pids(hook_dir / "long.pids")
        agent.signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0
        wait_for(lambda: all(gone(pid) for pid in started), 15, "the hook's process group to be gone")
        # Its caller heard how it ended before the agent stopped serving.
        assert final(call.result(timeout=20)) == ("ABANDON", "stopped: agent stopping")
    assert "terminate hook: agent stopping: stopping its process group" in agent.output()


def test_a_drain_stops_a_launch_hook_still_running(procs, hook_dir):
    body = f"echo $$ >> {hook_dir}/prep.pids\nsleep 300 & echo $! >> {hook_dir}/prep.pids\nwait\n"
    agent, addr = start_agent(
        procs, HELIX_LAUNCH_HOOK=script(hook_dir, "prep", body), HELIX_TERMINATE_HOOK=script(hook_dir, "bye", "exit 0")
    )
    with ThreadPoolExecutor(1) as pool:
        preparing = pool.submit(hook, addr, "Prepare", 600, "launch")
        wait_for(lambda: len(pids(hook_dir / "prep.pids")) == 2, 15, "the launch hook and its child to start")
        started = pids(hook_dir / "prep.pids")
        assert final(hook(addr, "Drain", 30, "scale in")) == ("CONTINUE", "exit 0")
        assert final(preparing.result(timeout=30))[0] == "ABANDON"
    wait_for(lambda: all(gone(pid) for pid in started), 15, "the launch hook's process group to be gone")
    assert "Drain while the launch hook runs: stopping the launch hook first" in agent.output()


def test_a_hook_that_is_not_shell_words_is_bad_configuration(procs):
    env = agent_env(IID, free_port(), HELIX_LAUNCH_HOOK="sh -c 'unterminated")
    agent = procs.python("agent", ["-m", "monitor_c"], env)
    assert agent.wait(timeout=30) == 2
    assert "HELIX_LAUNCH_HOOK=sh -c 'unterminated: expected shell words (No closing quotation)" in agent.output()


def test_local_instances_get_the_managers_hooks_with_their_app_port(tmp_path):
    state_dir, env_dir = str(tmp_path / "state"), tmp_path / "envs"
    env_dir.mkdir()
    cfg = make_cfg(
        state_dir,
        HELIX_LOCAL_APP_CMD=APP_CMD,
        HELIX_TERMINATE_HOOK="curl -s http://127.0.0.1:{port}/drain",
    )
    prov = LocalProvider(cfg, agent_argv=fake_agent(str(env_dir)))
    try:
        [inst] = prov.launch(1, "tok-hooks")
        env = recorded_env(str(env_dir), inst.instance_id)
        port = env["HELIX_LABELS"].split("app_port=")[1]
        assert env["HELIX_TERMINATE_HOOK"] == f"curl -s http://127.0.0.1:{port}/drain"
        assert "HELIX_LAUNCH_HOOK" not in env  # not set on the manager: not passed
    finally:
        prov.close()
        kill_local_instances(state_dir)
