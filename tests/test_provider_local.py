"""The local provider: real process groups, re-adopted across controller restarts."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import sys
import textwrap
import time

import psutil
import pytest

from controller_asg.providers import make_provider
from controller_asg.providers.local import LocalProvider
from shared.config import load_config
from tests.procs import ROOT, base_env, wait_for

# A stand-in agent: records its environment, then idles (SIGTERM ends it unless told to ignore it).
FAKE_AGENT = textwrap.dedent("""
    import json, os, signal, sys, time
    if len(sys.argv) > 2 and sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path = os.path.join(sys.argv[1], os.environ["HELIX_INSTANCE_ID"] + ".env.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(dict(os.environ, PID=str(os.getpid()), PGID=str(os.getpgid(0))), fh)
    os.replace(path + ".tmp", path)
    time.sleep(300)  # outlives any test; ends by itself should a test run die without cleanup
""")
# A stand-in app: listens on its port so a tcp:// liveness probe finds it.
APP_CMD = (
    f'{sys.executable} -c "import socket,sys,time; s=socket.socket(); '
    f"s.bind(('127.0.0.1',int(sys.argv[1]))); s.listen(); time.sleep(300)\" {{port}}"
)


def _kill_recorded(state_dir: str) -> None:
    """Teardown: SIGKILL every group the state dir records (they outlive the provider on purpose)."""
    for path in glob.glob(os.path.join(state_dir, "instances", "*.json")):
        with open(path) as fh:
            rec = json.load(fh)
        for member in rec.get("members", []):
            try:
                if abs(psutil.Process(member["pid"]).create_time() - member["started"]) < 1.0:
                    os.killpg(os.getpgid(member["pid"]), signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def state_dir(tmp_path):
    path = str(tmp_path / "state")
    yield path
    _kill_recorded(path)


@pytest.fixture
def env_dir(tmp_path):
    path = tmp_path / "envs"
    path.mkdir()
    return str(path)


def make_cfg(state_dir: str, **extra: str):
    environ = {
        "HELIX_ENV_FILE": "",
        "HELIX_STATE_DIR": state_dir,
        "HELIX_TOKEN": "s3cret-token-0123",
        "HELIX_MONITOR_ADDR": "127.0.0.1:5999",
        "HELIX_GROUP": "tg",
        **extra,
    }
    return load_config(environ)


def fake_agent(env_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", FAKE_AGENT, env_dir, *extra]


def agent_env(env_dir: str, instance_id: str) -> dict:
    def read():
        with open(os.path.join(env_dir, instance_id + ".env.json")) as fh:
            return json.load(fh)

    return wait_for(read, 30, f"agent of {instance_id} to start")


def test_agents_are_told_every_managers_monitor(state_dir, env_dir):
    cfg = make_cfg(state_dir, HELIX_MONITOR_ADDR="127.0.0.1:5999, 127.0.0.1:6999")
    prov = LocalProvider(cfg, agent_argv=fake_agent(env_dir))
    try:
        [inst] = prov.launch(1, "tok-1")
        assert agent_env(env_dir, inst.instance_id)["HELIX_MONITOR_ADDR"] == "127.0.0.1:5999,127.0.0.1:6999"
    finally:
        prov.close()


def test_launch_spreads_over_zones_with_the_agent_env(state_dir, env_dir):
    cfg = make_cfg(state_dir, HELIX_LOCAL_APP_CMD=APP_CMD, HELIX_LOCAL_ZONES="za,zb", HELIX_LOCAL_VCPUS="2")
    prov = LocalProvider(cfg, agent_argv=fake_agent(env_dir))
    try:
        launched = prov.launch(3, "tok-1")
        assert len(launched) == 3
        assert sorted(i.zone for i in launched) == ["za", "za", "zb"]
        listed = {i.instance_id: i for i in prov.list_instances()}
        assert set(listed) == {i.instance_id for i in launched}
        assert all(i.state == "running" and not i.protected for i in listed.values())
        for inst in launched:
            env = agent_env(env_dir, inst.instance_id)
            rec = json.load(open(os.path.join(state_dir, "instances", inst.instance_id + ".json")))
            app = next(m for m in rec["members"] if m["role"] == "app")
            assert env["HELIX_AGENT_LISTEN"] == env["HELIX_ADVERTISE_ADDR"] == inst.address
            assert env["HELIX_MONITOR_ADDR"] == "127.0.0.1:5999"
            # No fleet secret on an instance: its own secret instead, of which the record keeps the digest.
            assert "HELIX_TOKEN" not in env and "HELIX_INSECURE" not in env
            assert hashlib.sha256(env["HELIX_INSTANCE_SECRET"].encode()).hexdigest() == inst.secret_digest
            assert env["HELIX_CPU_SOURCE"] == f"tree:{app['pid']}"
            assert env["HELIX_VCPUS"] == "2" and env["HELIX_ENV_FILE"] == ""
            assert env["HELIX_LABELS"] == f"zone={inst.zone},app_port={rec['app_port']}"
            assert env["HELIX_APP_CHECK"] == f"tcp://127.0.0.1:{rec['app_port']}"
            # agent and app share one process group, led by the agent, in a session of its own
            assert int(env["PGID"]) == int(env["PID"]) == rec["pgid"] != os.getpgid(0)
            assert os.getpgid(app["pid"]) == rec["pgid"] == os.getsid(app["pid"])
            # the app never sees the agent's settings (the token among them), but gets its port
            app_env = psutil.Process(app["pid"]).environ()
            assert app_env["PORT"] == str(rec["app_port"]) and not any(k.startswith("HELIX_") for k in app_env)
            assert psutil.Process(app["pid"]).cmdline()[-1] == str(rec["app_port"])
        assert prov.launch(3, "tok-1") and len(prov.list_instances()) == 3  # same token: nothing new
    finally:
        prov.close()


def test_agent_only_instance_and_insecure_mode(state_dir, env_dir):
    cfg = make_cfg(state_dir, HELIX_TOKEN="", HELIX_INSECURE="1")
    prov = make_provider(cfg)
    assert isinstance(prov, LocalProvider)
    prov.agent_argv = fake_agent(env_dir)
    [inst] = prov.launch(1, "my group/../tok a")  # any token (it names no file)
    assert [i.instance_id for i in prov.launch(1, "my group/../tok a")] == [inst.instance_id]
    env = agent_env(env_dir, inst.instance_id)
    assert env["HELIX_INSECURE"] == "1" and "HELIX_TOKEN" not in env
    assert env["HELIX_CPU_SOURCE"] == "host" and "HELIX_APP_CHECK" not in env
    assert env["HELIX_LABELS"] == f"zone={inst.zone}"


def test_restarted_controller_adopts_survivors_and_forgets_the_dead(state_dir, env_dir, procs):
    # A real controller-like process launches two instances, then exits.
    script = textwrap.dedent(f"""
        import sys
        from controller_asg.providers.local import LocalProvider
        from shared.config import load_config
        cfg = load_config({{"HELIX_ENV_FILE": "", "HELIX_STATE_DIR": {state_dir!r}, "HELIX_TOKEN": "x-token-0123",
                            "HELIX_GROUP": "tg", "HELIX_LOCAL_APP_CMD": {APP_CMD!r}}})
        p = LocalProvider(cfg, agent_argv={fake_agent(env_dir)!r})
        print(",".join(i.instance_id for i in p.launch(2, "boot")))
    """)
    ctl = procs.python("controller", ["-c", script], env=base_env())
    assert ctl.wait(60) == 0, ctl.output()
    ids = set(ctl.output().strip().splitlines()[-1].split(","))
    for instance_id in ids:
        agent_env(env_dir, instance_id)

    prov = LocalProvider(make_cfg(state_dir), agent_argv=fake_agent(env_dir))
    assert {i.instance_id for i in prov.list_instances()} == ids
    assert prov.launch(2, "boot") and len(prov.list_instances()) == 2  # a retried launch after restart

    victim = sorted(ids)[0]
    os.killpg(int(agent_env(env_dir, victim)["PGID"]), signal.SIGKILL)
    wait_for(lambda: {i.instance_id for i in prov.list_instances()} == ids - {victim}, 30, "the dead one forgotten")
    assert not os.path.exists(os.path.join(state_dir, "instances", victim + ".json"))


def test_terminate_only_what_was_asked_and_escalates_to_sigkill(state_dir, env_dir):
    prov = LocalProvider(
        make_cfg(state_dir, HELIX_LOCAL_APP_CMD=APP_CMD), agent_argv=fake_agent(env_dir, "ignore-term"), grace=3.0
    )
    try:
        a, b, c = prov.launch(3, "t")
        pids = {i.instance_id: int(agent_env(env_dir, i.instance_id)["PID"]) for i in (a, b, c)}
        prov.terminate([a.instance_id, "local-tg-nope", "../instances/x", "local-other-1"])
        # terminate returned without waiting out the grace period: the SIGTERM-proof agent still runs
        assert psutil.Process(pids[a.instance_id]).status() != psutil.STATUS_ZOMBIE
        states = {i.instance_id: i.state for i in prov.list_instances()}
        assert states.get(a.instance_id) in ("terminating", None)
        # The agent ignores SIGTERM: only SIGKILL after the grace period ends it.
        wait_for(
            lambda: (
                not psutil.pid_exists(pids[a.instance_id])
                or psutil.Process(pids[a.instance_id]).status() == psutil.STATUS_ZOMBIE
            ),
            30,
            "SIGKILL after grace",
        )
        wait_for(
            lambda: {i.instance_id for i in prov.list_instances()} == {b.instance_id, c.instance_id},
            30,
            "the terminated one forgotten",
        )
        assert psutil.pid_exists(pids[b.instance_id]) and psutil.pid_exists(pids[c.instance_id])
    finally:
        prov.close()


def test_overdue_sigkill_is_sent_by_a_restarted_controller(state_dir, env_dir):
    prov = LocalProvider(make_cfg(state_dir), agent_argv=fake_agent(env_dir, "ignore-term"), grace=600)
    [inst] = prov.launch(1, "t")
    pid = int(agent_env(env_dir, inst.instance_id)["PID"])
    prov.terminate([inst.instance_id])
    prov.close()
    assert psutil.pid_exists(pid)  # SIGTERM ignored, the reaper stopped long before its grace ran out
    later = LocalProvider(
        make_cfg(state_dir), agent_argv=fake_agent(env_dir), grace=600, clock=lambda: time.time() + 601
    )
    assert [i.state for i in later.list_instances()] == ["terminating"]
    wait_for(lambda: later.list_instances() == [], 30, "the overdue instance killed and forgotten")


def test_reused_pid_is_never_adopted_or_signalled(state_dir, env_dir):
    prov = LocalProvider(make_cfg(state_dir), agent_argv=fake_agent(env_dir))
    # A record whose pid now belongs to another process (this test runner) with another start time.
    rec = {
        "instance_id": "local-tg-stale",
        "group": "tg",
        "zone": "local-a",
        "token": "old",
        "launched_at": 1.0,
        "host": "127.0.0.1",
        "agent_port": 1,
        "app_port": 0,
        "pgid": os.getpid(),
        "terminate_at": 0.0,
        "members": [{"role": "agent", "pid": os.getpid(), "started": 12345.0}],
    }
    with open(os.path.join(state_dir, "instances", "local-tg-stale.json"), "w") as fh:
        json.dump(rec, fh)
    prov.terminate(["local-tg-stale"])  # must not signal this very process
    assert prov.list_instances() == []
    assert not os.path.exists(os.path.join(state_dir, "instances", "local-tg-stale.json"))


def test_protection_marker_and_other_groups(state_dir, env_dir):
    prov = LocalProvider(make_cfg(state_dir), agent_argv=fake_agent(env_dir))
    other = LocalProvider(make_cfg(state_dir, HELIX_GROUP="other"), agent_argv=fake_agent(env_dir))
    try:
        [mine] = prov.launch(1, "m")
        [theirs] = other.launch(1, "o")
        open(os.path.join(state_dir, "protected", mine.instance_id), "w").close()
        assert [(i.instance_id, i.protected) for i in prov.list_instances()] == [(mine.instance_id, True)]
        prov.terminate([theirs.instance_id])  # not this group's: refused
        assert [i.instance_id for i in other.list_instances()] == [theirs.instance_id]
        assert agent_env(env_dir, theirs.instance_id)
    finally:
        prov.close()
        other.close()


def test_bad_app_command_fails_cleanly(state_dir, env_dir):
    from controller_asg.providers.base import LaunchError

    prov = LocalProvider(
        make_cfg(state_dir, HELIX_LOCAL_APP_CMD="/nonexistent/helix-app {port}"), agent_argv=fake_agent(env_dir)
    )
    with pytest.raises(LaunchError, match="nonexistent"):
        prov.launch(1, "bad")
    assert prov.list_instances() == []
    assert os.listdir(os.path.join(state_dir, "instances")) == []


@pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, "monitor_c", "__main__.py")),
    reason="the real agent (python -m monitor_c) is not written yet",
)
def test_real_agent_starts_and_serves(state_dir):
    import socket

    prov = LocalProvider(make_cfg(state_dir, HELIX_LOCAL_APP_CMD=APP_CMD))
    try:
        [inst] = prov.launch(1, "real")
        host, port = inst.address.rsplit(":", 1)
        log_path = os.path.join(state_dir, "logs", inst.instance_id + ".log")

        def serving():
            assert prov.list_instances(), "the agent exited: " + open(log_path).read()[-2000:]
            socket.create_connection((host, int(port)), timeout=1).close()
            return True

        try:
            wait_for(serving, 60, "the real agent's gRPC port to accept connections")
        except AssertionError:
            print(open(log_path).read()[-4000:])
            raise
        prov.terminate([inst.instance_id])
        wait_for(lambda: prov.list_instances() == [], 60, "the real agent to stop")
    finally:
        prov.close()


# -- crash consistency: a controller SIGKILLed at every point of a spawn --------------------------

# The controller-like process launches one instance and SIGKILLs itself at `point`:
#   before-group: the launcher runs but its group id is not recorded yet;
#   before-go:    the group id is recorded, the launcher has not been told to start;
#   before-app:   the launcher started the app and the agent, the app's pid is not recorded.
CRASH_SCRIPT = """
import os, signal, sys
from controller_asg.providers import local
from shared.config import load_config
point, state_dir, agent = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_STATE_DIR": state_dir, "HELIX_TOKEN": "x-token-0123",
                   "HELIX_GROUP": "tg", "HELIX_LOCAL_APP_CMD": %r})
p = local.LocalProvider(cfg, agent_argv=agent)
real_write = p._write
def write(rec):
    roles = [m.role for m in rec.members]
    if point == "before-group" and rec.pgid:
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(rec)
    if point == "before-go" and rec.pgid and roles == ["agent"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "before-app" and roles == ["agent"]:
        p._write = lambda r: os.kill(os.getpid(), signal.SIGKILL)
p._write = write
p.launch(1, "crash-token")
""".replace("%r", repr(APP_CMD))


def _instance_processes(instance_id: str) -> list[int]:
    """Pids of live processes started for `instance_id`: its launcher/agent carries the id in its
    environment, and the app is in the agent's process group."""
    agents = []
    for proc in psutil.process_iter(["pid", "environ", "status"]):
        try:
            env = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("HELIX_INSTANCE_ID") == instance_id and proc.info["status"] != psutil.STATUS_ZOMBIE:
            agents.append(proc.info["pid"])
    groups = set()
    for pid in agents:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    members = set(agents)
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) in groups and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.add(proc.info["pid"])
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return sorted(members)


@pytest.mark.parametrize("point", ["before-group", "before-go"])
def test_a_controller_killed_mid_spawn_leaves_no_orphan_and_the_launch_is_redone(state_dir, env_dir, procs, point):
    """Was: the record named no group while the instance ran; 30 s later it was forgotten, the orphan
    kept running (and served, and was never scaled in), and the resumed launch said "already done"
    for an id that never existed."""
    ctl = procs.python("controller", ["-c", CRASH_SCRIPT, point, state_dir, *fake_agent(env_dir)], env=base_env())
    assert ctl.wait(60) == -signal.SIGKILL, ctl.output()
    ledger = glob.glob(os.path.join(state_dir, "launches", "*.json"))
    assert len(ledger) == 1
    (dead,) = json.load(open(ledger[0]))["ids"]
    # The launcher read end-of-file when its parent died: nothing of the instance runs, ever.
    wait_for(lambda: _instance_processes(dead) == [], 30, f"nothing of {dead} running")
    assert not os.path.exists(os.path.join(env_dir, dead + ".env.json")), "the agent never started"

    prov = LocalProvider(
        make_cfg(state_dir, HELIX_LOCAL_APP_CMD=APP_CMD), agent_argv=fake_agent(env_dir), clock=lambda: time.time() + 60
    )  # past the pid-less record's age
    assert prov.list_instances() == [], "the dead record is forgotten"
    (again,) = prov.launch(1, "crash-token")  # the restarted controller resumes the launch
    assert again.instance_id != dead, "an id that never started is not reported as launched"
    agent_env(env_dir, again.instance_id)
    assert [i.instance_id for i in prov.list_instances()] == [again.instance_id]
    assert prov.launch(1, "crash-token")[0].instance_id == again.instance_id  # and never twice


def test_a_controller_killed_after_the_start_finds_its_instance_again(state_dir, env_dir, procs):
    ctl = procs.python(
        "controller", ["-c", CRASH_SCRIPT, "before-app", state_dir, *fake_agent(env_dir)], env=base_env()
    )
    assert ctl.wait(60) == -signal.SIGKILL, ctl.output()
    (path,) = glob.glob(os.path.join(state_dir, "instances", "*.json"))
    rec = json.load(open(path))
    running = wait_for(
        lambda: len(_instance_processes(rec["instance_id"])) >= 2 and _instance_processes(rec["instance_id"]),
        30,
        "the agent and the app",
    )
    assert all(os.getpgid(pid) == rec["pgid"] for pid in running), "every process is in the recorded group"

    prov = LocalProvider(make_cfg(state_dir, HELIX_LOCAL_APP_CMD=APP_CMD), agent_argv=fake_agent(env_dir))
    assert [i.instance_id for i in prov.list_instances()] == [rec["instance_id"]]
    assert [i.instance_id for i in prov.launch(1, "crash-token")] == [rec["instance_id"]], "not launched twice"
    prov.terminate([rec["instance_id"]])
    wait_for(lambda: _instance_processes(rec["instance_id"]) == [], 30, "the whole group gone, app included")
