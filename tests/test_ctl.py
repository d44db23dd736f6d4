"""The control socket (controller_asg/ctlserver.py) and helix-ctl (controller_asg/ctl.py): real Unix
sockets, the CLI as a real subprocess, a small in-test handler standing in for the controller."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from controller_asg.ctl import format_history, format_status, parse_duration, relative
from controller_asg.ctlserver import PROCESSES, Caller, CtlError, CtlServer, CtlServerError, CtlUnreachable, call
from tests.procs import ROOT, base_env

NOW = time.time()
STATUS = {
    "desired": 4,
    "in_service": 3,
    "pending": 1,
    "draining": 0,
    "capacity": 4,
    "frozen": False,
    "dry_run": False,
    "policy": "threshold",
    "breaker": {"tripped": False, "failures": 1},
    "suspended": ["scale-in"],
    "bounds": {"min": 2, "max": 8, "desired": None, "source": "override"},
    "override": {
        "min": 2,
        "max": 8,
        "desired": None,
        "until": NOW + 1500,
        "who": "root",
        "reason": "incident 42",
        "set_at": NOW - 60,
    },
    "refresh": {
        "id": "r-1",
        "state": "in-progress",
        "percent": 40.0,
        "replaced": 2,
        "to_replace": 5,
        "min_healthy": 90.0,
        "max_healthy": 110.0,
        "started_at": NOW - 300,
        "checkpoint": "",
        "detail": "warming up batch 3",
    },
    "next_scheduled": {"name": "night", "at": NOW + 3 * 3600, "min": 1, "max": 4, "desired": None},
    "lifetime": 7 * 86400.0,
}
ENTRIES = [
    {
        "time": NOW - 100,
        "action": "launch",
        "count": 2,
        "reason": "cpu 0.91 above 0.75",
        "instance_ids": ["i-1", "i-2"],
    },
    {"time": NOW - 50, "action": "override", "count": 0, "reason": "incident 42", "instance_ids": [], "who": "root"},
]


class Handler:
    """What the controller's handler would do, minus the controller: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, Caller, str]] = []
        self.lock = threading.Lock()

    def __call__(self, op: str, args: dict, caller: Caller, reason: str) -> dict:
        with self.lock:
            self.calls.append((op, args, caller, reason))
        if op == "status":
            return STATUS
        if op == "set-capacity":
            if args["desired"] is not None and args["desired"] > 100:
                raise CtlError(f"desired {args['desired']} is above the configured max 100 (give --max to raise it)")
            return {
                "bounds": {"min": args["min"], "max": args["max"], "desired": args["desired"], "source": "override"}
            }
        if op in ("suspend", "resume"):
            return {"suspended": args["processes"] if op == "suspend" else []}
        if op == "refresh":
            if args["action"] == "rollback":
                raise RuntimeError("the previous configuration is gone\nsecond line")
            return {"refresh": STATUS["refresh"]}
        if op == "history":
            return {"entries": [e for e in ENTRIES if args["action"] in (None, e["action"])][: args["limit"]]}
        raise AssertionError(op)


@pytest.fixture
def workdir():
    """A short directory (Unix socket paths are at most 107 bytes), removed after the test."""
    path = tempfile.mkdtemp(prefix="hx-ctl-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def log():
    return logging.getLogger("controller_asg.ctl-test")


@pytest.fixture
def served(workdir, log):
    """(server, handler, socket path): a CtlServer on a fresh directory, closed after the test."""
    handler = Handler()
    path = os.path.join(workdir, "controller", "ctl.sock")
    server = CtlServer(path, handler, log=log)
    server.start()
    yield server, handler, path
    server.close()


def run_ctl(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controller_asg.ctl", *argv],
        cwd=ROOT,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def raw_exchange(path: str, payload: bytes, timeout: float = 10.0) -> dict:
    """Send `payload` as it is and return the decoded answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(payload)
        except OSError:
            pass  # the server may answer and close before it read everything
        return json.loads(read_line(sock))


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


# --- the protocol -------------------------------------------------------------------------------


def test_each_op_round_trips_with_complete_args_and_the_callers_identity(served):
    _server, handler, path = served
    assert call(path, "status") == {"ok": True, "result": STATUS}
    answer = call(path, "set-capacity", {"min": 2, "max": 8, "for": 90}, "incident 42")
    assert answer == {"ok": True, "result": {"bounds": {"min": 2, "max": 8, "desired": None, "source": "override"}}}
    assert call(path, "set-capacity", {"clear": True})["ok"]
    assert call(path, "suspend", {"processes": ["terminate", "launch", "launch"]})["result"] == {
        "suspended": ["launch", "terminate"]
    }
    assert call(path, "resume", {"processes": ["all"]})["ok"]
    started = call(path, "refresh", {"action": "start", "min_healthy": 90, "checkpoints": [50, 100]}, "new AMI")
    assert started["result"]["refresh"]["id"] == "r-1"
    assert call(path, "refresh", {"action": "status"})["ok"]
    assert call(path, "refresh", {"action": "cancel"})["ok"]
    history = call(path, "history", {"action": "launch", "limit": 5})
    assert history["result"]["entries"] == [ENTRIES[0]]

    ops = [(op, args, reason) for op, args, _caller, reason in handler.calls]
    assert ops == [
        ("status", {}, ""),
        ("set-capacity", {"min": 2, "max": 8, "desired": None, "for": 90.0, "clear": False}, "incident 42"),
        ("set-capacity", {"min": None, "max": None, "desired": None, "for": None, "clear": True}, ""),
        ("suspend", {"processes": ["launch", "terminate"]}, ""),
        ("resume", {"processes": list(PROCESSES)}, ""),
        (
            "refresh",
            {
                "action": "start",
                "min_healthy": 90.0,
                "max_healthy": None,
                "warmup": None,
                "checkpoints": [50.0, 100.0],
                "checkpoint_delay": None,
                "skip_matching": True,
                "auto_rollback": True,
                "allow_above_max": False,
            },
            "new AMI",
        ),
        ("refresh", {"action": "status"}, ""),
        ("refresh", {"action": "cancel"}, ""),
        ("history", {"since": None, "action": "launch", "limit": 5}, ""),
    ]
    caller = handler.calls[0][2]
    assert (caller.pid, caller.uid) == (os.getpid(), os.geteuid())
    assert caller.user and isinstance(caller.user, str)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"{not json\n", ["request", "JSON"]),
        (b'["status"]\n', ["request=", "JSON object"]),
        (b'{"op": "reboot"}\n', ['op="reboot"', "one of status"]),
        (b'{"op": "status", "args": {"x": 1}}\n', ["args.x=1", "only these arguments for status: none"]),
        (b'{"op": "status", "who": "me"}\n', ['who="me"', "only op, args and reason"]),
        (b'{"op": "status", "reason": 5}\n', ["reason=5", "a string"]),
        (b'{"op": "set-capacity", "args": {"desired": "3"}}\n', ['args.desired="3"', "an integer from 0"]),
        (b'{"op": "set-capacity", "args": {"min": true}}\n', ["args.min=true", "an integer"]),
        (b'{"op": "set-capacity", "args": {"min": -1}}\n', ["args.min=-1", "an integer from 0"]),
        (b'{"op": "set-capacity", "args": {"for": 60}}\n', ["args=", "at least one of min, max and desired"]),
        (b'{"op": "set-capacity", "args": {"min": 5, "max": 3}}\n', ["args.min=5", "at most args.max (3)"]),
        (b'{"op": "set-capacity", "args": {"min": 1, "clear": true}}\n', ["args.min=1", "null with clear"]),
        (b'{"op": "set-capacity", "args": {"max": 3, "for": NaN}}\n', ["args.for=NaN", "a number greater than 0"]),
        (b'{"op": "suspend", "args": {}}\n', ["args.processes", "non-empty list"]),
        (b'{"op": "suspend", "args": {"processes": "launch"}}\n', ['args.processes="launch"', "a non-empty list"]),
        (b'{"op": "resume", "args": {"processes": ["nap"]}}\n', ['args.processes="nap"', "one of launch"]),
        (b'{"op": "refresh", "args": {}}\n', ["args.action=null", "one of start, status"]),
        (
            b'{"op": "refresh", "args": {"action": "start", "checkpoints": [100, 50]}}\n',
            ["args.checkpoints=[100, 50]", "increasing order"],
        ),
        (b'{"op": "refresh", "args": {"action": "start", "max_healthy": 90}}\n', ["args.max_healthy=90", "from 100"]),
        (
            b'{"op": "refresh", "args": {"action": "cancel", "warmup": 5}}\n',
            ["args.warmup=5", "only with action start"],
        ),
        (b'{"op": "history", "args": {"limit": 0}}\n', ["args.limit=0", "an integer from 1"]),
        (b'{"op": "history", "args": {"since": "yesterday"}}\n', ['args.since="yesterday"', "a number"]),
    ],
)
def test_malformed_requests_are_bad_requests_naming_the_field(served, payload, words):
    _server, handler, path = served
    answer = raw_exchange(path, payload)
    assert answer["ok"] is False and answer["code"] == "bad-request", answer
    assert "\n" not in answer["error"]
    for word in words:
        assert word in answer["error"], answer["error"]
    assert handler.calls == []


def test_handler_errors_become_bad_request_or_internal(served, caplog):
    _server, _handler, path = served
    answer = call(path, "set-capacity", {"desired": 500})
    assert answer == {
        "ok": False,
        "error": "desired 500 is above the configured max 100 (give --max to raise it)",
        "code": "bad-request",
    }
    with caplog.at_level(logging.ERROR, logger="controller_asg.ctl-test"):
        answer = call(path, "refresh", {"action": "rollback"})
    assert answer["ok"] is False and answer["code"] == "internal"
    assert answer["error"] == (
        "refresh failed inside the controller: RuntimeError: the previous configuration is gone second line"
    )
    failed = [r for r in caplog.records if r.exc_info]
    assert failed and "refresh" in failed[0].getMessage()


def test_close_removes_the_socket_and_the_client_says_so(workdir, log):
    path = os.path.join(workdir, "ctl.sock")
    server = CtlServer(path, Handler(), log=log)
    server.start()
    assert call(path, "status")["ok"]
    server.close()
    server.close()  # twice is fine
    assert not os.path.exists(path)
    with pytest.raises(CtlUnreachable, match="no control socket at"):
        call(path, "status")


# --- binding ------------------------------------------------------------------------------------


def test_created_directory_is_0700_and_socket_0600(served):
    _server, _handler, path = served
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_a_stale_socket_file_is_replaced(workdir, log):
    path = os.path.join(workdir, "ctl.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a controller that died without removing its socket
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with pytest.raises(CtlUnreachable, match="nothing is listening"):
        call(path, "status")
    with CtlServer(path, Handler(), log=log):
        assert call(path, "status")["ok"]
    assert not os.path.exists(path)


def test_a_second_server_on_a_live_socket_refuses_to_start(served, log):
    _server, _handler, path = served
    second = CtlServer(path, Handler(), log=log)
    with pytest.raises(CtlServerError, match="another controller is already listening"):
        second.start()
    second.close()  # must not remove the first one's socket
    assert call(path, "status")["ok"]


def test_a_path_that_is_not_a_socket_is_left_alone(workdir, log):
    path = os.path.join(workdir, "ctl.sock")
    with open(path, "w") as fh:
        fh.write("precious")
    with pytest.raises(CtlServerError, match="not a socket"):
        CtlServer(path, Handler(), log=log).start()
    with open(path) as fh:
        assert fh.read() == "precious"


def test_a_path_too_long_for_a_socket_is_a_clear_error(workdir, log):
    path = os.path.join(workdir, "d" * 120, "ctl.sock")
    with pytest.raises(CtlServerError, match="at most 107"):
        CtlServer(path, Handler(), log=log).start()


# --- who may talk -------------------------------------------------------------------------------

NOBODY = 65534


def as_nobody(path: str) -> dict:
    """Fork a child that becomes uid/gid 65534 and sends a status request; its outcome, as a dict."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain system calls only, then _exit
        outcome: dict = {}
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(path)
                try:
                    sock.sendall(b'{"op": "status", "args": {}, "reason": ""}\n')
                except BrokenPipeError:
                    pass  # refused (and closed) before the request was read: read that answer, as helix-ctl does
                outcome = {"answer": json.loads(read_line(sock))}
        except OSError as exc:
            outcome = {"errno": exc.errno}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            outcome = {"exception": repr(exc)}
        os.write(write_fd, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 20)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the uid-65534 child gave no answer in 20s")
        data = b""
        while chunk := os.read(read_fd, 65536):
            data += chunk
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_another_uid_is_refused_by_its_credentials(served, caplog):
    _server, handler, path = served
    # The file modes alone keep it out:
    assert as_nobody(path) == {"errno": 13}  # EACCES
    # With them opened up, the peer-credential check still does.
    for directory in (os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
        os.chmod(directory, 0o755)  # mkdtemp's and the server's are 0700
    os.chmod(path, 0o666)
    with caplog.at_level(logging.WARNING, logger="controller_asg.ctl-test"):
        outcome = as_nobody(path)
    assert "answer" in outcome, outcome
    answer = outcome["answer"]
    assert answer["ok"] is False and answer["code"] == "refused", outcome
    assert answer["error"].startswith(f"uid {NOBODY} may not control this controller (allowed: uid 0 (root)")
    assert handler.calls == []
    assert any(f"uid {NOBODY}" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    assert call(path, "status")["ok"]  # root still is


# --- clients that misbehave ---------------------------------------------------------------------


def test_an_oversize_request_is_refused_without_reading_it_all(served):
    _server, handler, path = served
    answer = raw_exchange(path, b"x" * (70 * 1024))
    assert answer["code"] == "bad-request" and "at most 65536 bytes" in answer["error"]
    # A request just under the cap is read (and judged on its merits).
    padded = json.dumps({"op": "status", "reason": "r" * 10}).encode() + b" " * (60 * 1024) + b"\n"
    assert raw_exchange(path, padded)["ok"] is True
    assert len(handler.calls) == 1


def test_slow_clients_never_block_others_and_are_cut_off(workdir, log):
    path = os.path.join(workdir, "ctl.sock")
    with CtlServer(path, Handler(), log=log, read_timeout=3.0, max_connections=2) as _server:
        slow = []
        for _ in range(2):  # they take every connection slot, and never finish their request
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b'{"op": "sta')
            slow.append(sock)
        started = time.monotonic()
        busy = call(path, "status", timeout=5)
        assert busy["code"] == "refused" and "busy" in busy["error"]
        assert time.monotonic() - started < 2.5  # answered at once, not at the slow ones' 3 s deadline
        for sock in slow:  # each is cut off at its deadline with one line saying why
            answer = json.loads(read_line(sock))
            assert answer["code"] == "bad-request" and "within 3s" in answer["error"]
            sock.close()
        assert call(path, "status")["ok"]  # their slots are back


def test_a_slow_client_does_not_hold_up_the_next(served):
    _server, _handler, path = served  # the default 5 s read deadline
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(b'{"op": ')
        started = time.monotonic()
        assert call(path, "status", timeout=4)["ok"]
        assert time.monotonic() - started < 2


# --- the command-line client --------------------------------------------------------------------


def test_cli_status_json_prints_the_result(served):
    _server, _handler, path = served
    done = run_ctl("status", "--json", "--socket", path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == STATUS
    assert done.stderr == ""


def test_cli_status_human_block(served):
    _server, _handler, path = served
    until = STATUS["override"]["until"]
    night = STATUS["next_scheduled"]["at"]
    t0 = time.time()
    done = run_ctl("--socket", path, "status")
    t1 = time.time()
    before, after = relative(until, t0), relative(until, t1)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "4 desired, 3 in service, 1 pending, 0 draining" in out
    assert "bounds:      min 2, max 8 (from override)" in out
    # The fixture's times were fixed when the module was imported, maybe minutes ago.
    assert "override:" in out and (f"({before})" in out or f"({after})" in out), (before, after, out)
    assert "root" in out and "incident 42" in out
    assert "suspended:   scale-in" in out
    assert "breaker:     closed, 1 failed launch(es) in a row" in out
    assert "r-1 in-progress, 40% (2/5 replaced)" in out
    assert "night at" in out and (f"({relative(night, t0)})" in out or f"({relative(night, t1)})" in out)
    assert "lifetime:    7d" in out


def test_cli_finds_the_socket_from_the_configuration(served, workdir):
    _server, handler, _path = served
    env = base_env(HELIX_STATE_DIR=workdir)  # the fixture's socket is <workdir>/controller/ctl.sock
    done = run_ctl("suspend", "launch", "scale-in", "--reason", "incident 7", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "suspended: launch, scale-in"
    assert handler.calls[-1][0::3] == ("suspend", "incident 7")


def test_cli_sends_what_the_options_say(served):
    _server, handler, path = served
    cases = [
        (
            ["set-capacity", "--min", "2", "--max", "8", "--for", "1h30m", "--reason", "incident 42"],
            ("set-capacity", {"min": 2, "max": 8, "desired": None, "for": 5400.0, "clear": False}, "incident 42"),
        ),
        (
            ["set-capacity", "--clear"],
            ("set-capacity", {"min": None, "max": None, "desired": None, "for": None, "clear": True}, ""),
        ),
        (["resume", "all"], ("resume", {"processes": list(PROCESSES)}, "")),
        (
            [
                "refresh",
                "start",
                "--min-healthy",
                "80%",
                "--max-healthy",
                "150",
                "--warmup",
                "2m",
                "--checkpoints",
                "50,100",
                "--checkpoint-delay",
                "10m",
                "--no-skip-matching",
                "--no-auto-rollback",
                "--allow-above-max",
                "--reason",
                "new AMI",
            ],
            (
                "refresh",
                {
                    "action": "start",
                    "min_healthy": 80.0,
                    "max_healthy": 150.0,
                    "warmup": 120.0,
                    "checkpoints": [50.0, 100.0],
                    "checkpoint_delay": 600.0,
                    "skip_matching": False,
                    "auto_rollback": False,
                    "allow_above_max": True,
                },
                "new AMI",
            ),
        ),
        (["refresh", "cancel", "--reason", "bad build"], ("refresh", {"action": "cancel"}, "bad build")),
        (
            ["history", "--action", "launch", "--limit", "3"],
            ("history", {"since": None, "action": "launch", "limit": 3}, ""),
        ),
    ]
    for argv, expected in cases:
        done = run_ctl(*argv, "--socket", path)
        assert done.returncode == 0, (argv, done.stderr)
        op, args, _caller, reason = handler.calls[-1]
        assert (op, args, reason) == expected, argv


def test_cli_history_since(served):
    _server, handler, path = served
    before = time.time()
    done = run_ctl("history", "--since", "2h", "--socket", path)
    assert done.returncode == 0, done.stderr
    since = handler.calls[-1][1]["since"]
    assert before - 7200 - 1 <= since <= time.time() - 7200 + 1
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "launch" in lines[0] and "i-1,i-2" in lines[0] and "cpu 0.91 above 0.75" in lines[0]
    assert "override" in lines[1] and "[root]" in lines[1]
    done = run_ctl("history", "--since", "2024-05-01T14:00:00+00:00", "--json", "--socket", path)
    assert done.returncode == 0, done.stderr
    assert handler.calls[-1][1]["since"] == 1714572000.0
    assert json.loads(done.stdout) == {"entries": ENTRIES}


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["set-capacity", "--for", "5x", "--max", "3"], "argument --for: invalid duration '5x'"),
        (["set-capacity", "--for", "0", "--max", "3"], "expected more than 0 seconds"),
        (["set-capacity", "--min", "-1"], "argument --min: invalid count '-1'"),
        (["set-capacity", "--min", "3", "--max", "2"], "--min 3 is above --max 2"),
        (["set-capacity"], "expected at least one of --min, --max and --desired, or --clear"),
        (["set-capacity", "--clear", "--max", "3"], "--clear removes the override"),
        (["suspend"], "the following arguments are required: PROCESS"),
        (["suspend", "nap"], "invalid process 'nap'"),
        (["refresh"], "the following arguments are required: ACTION"),
        (["refresh", "start", "--min-healthy", "120"], "argument --min-healthy: invalid percentage '120'"),
        (["refresh", "start", "--max-healthy", "90"], "argument --max-healthy: invalid percentage '90'"),
        (["refresh", "start", "--checkpoints", "100,50"], "argument --checkpoints: invalid checkpoints '100,50'"),
        (["refresh", "start", "--warmup", "soon"], "argument --warmup: invalid duration 'soon'"),
        (["history", "--since", "yesterday"], "argument --since: invalid time 'yesterday'"),
        (["history", "--limit", "0"], "argument --limit: invalid limit '0'"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(served, argv, words):
    _server, handler, path = served
    done = run_ctl(*argv, "--socket", path)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("helix-ctl: ") and words in done.stderr, done.stderr
    assert handler.calls == []


def test_cli_bad_request_from_the_controller_exits_2_with_its_line(served):
    _server, _handler, path = served
    done = run_ctl("set-capacity", "--desired", "500", "--socket", path)
    assert done.returncode == 2
    assert done.stderr == "helix-ctl: desired 500 is above the configured max 100 (give --max to raise it)\n"


def test_cli_internal_error_exits_1_with_one_line(served):
    _server, _handler, path = served
    done = run_ctl("refresh", "rollback", "--socket", path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "helix-ctl: refresh failed inside the controller: RuntimeError: the previous configuration is gone second line"
    ]


def test_cli_without_a_controller_exits_1_with_one_line(workdir):
    missing = os.path.join(workdir, "nowhere.sock")
    done = run_ctl("status", "--socket", missing)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"helix-ctl: no control socket at {missing}; the controller may not be running\n"
    # From the configuration: it says where it looked.
    done = run_ctl("status", env=base_env(HELIX_STATE_DIR=workdir))
    expected = os.path.join(workdir, "controller", "ctl.sock")
    assert done.returncode == 1
    assert done.stderr == f"helix-ctl: no control socket at {expected}; the controller may not be running\n"
    # A socket file with nobody behind it.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(missing)
    dead.close()
    done = run_ctl("status", "--socket", missing)
    assert done.returncode == 1
    assert done.stderr == f"helix-ctl: nothing is listening on {missing}; the controller may not be running\n"


def test_cli_timeout_is_unreachable(workdir):
    path = os.path.join(workdir, "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:  # accepts (the backlog) but never answers
        mute.bind(path)
        mute.listen(1)
        with pytest.raises(CtlUnreachable, match=r"no answer from .* within 0.5s"):
            call(path, "status", timeout=0.5)


def test_cli_bad_configuration_is_one_line_exit_2(workdir):
    done = run_ctl("status", env=base_env(HELIX_STATE_DIR=workdir, HELIX_LOG_LEVEL="loud", HELIX_POLL_INTERVAL="x"))
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("helix-ctl: bad configuration: ")


# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("1.5", 1.5),
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "5x", "-5", "1m1h", "1h1h", "1h 30m", "1.5.2s", "inf", "nan"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="expected 90s, 30m"):
        parse_duration(text)


def test_status_block_without_optional_parts():
    quiet = dict(STATUS, override=None, refresh=None, next_scheduled=None, suspended=[], lifetime=0, frozen=True)
    quiet["breaker"] = {"tripped": True, "failures": 5}
    text = format_status(quiet, now=NOW)
    assert "[FROZEN]" in text
    assert "override:    none" in text and "refresh:     none" in text and "scheduled:   none" in text
    assert "suspended:   none" in text and "breaker:     TRIPPED, 5 failed" in text and "unlimited" in text


def test_history_of_nothing():
    assert format_history([]) == "no activity"


def test_schedule_commands_become_requests_and_bad_ones_are_refused():
    from controller_asg.ctl import build_parser, request_of
    from controller_asg.ctlserver import validate

    parser = build_parser()
    spec = "night cron='0 22 * * *' for=8h max=2"
    assert request_of(parser.parse_args(["schedule", "add", spec, "--reason", "r"])) == (
        "schedule",
        {"action": "add", "spec": spec},
        "r",
    )
    assert request_of(parser.parse_args(["schedule", "remove", "night"]))[1] == {"action": "remove", "name": "night"}
    assert request_of(parser.parse_args(["schedule", "list"]))[1] == {"action": "list"}
    assert validate({"op": "schedule", "args": {"action": "add", "spec": spec}})[1] == {
        "action": "add",
        "spec": spec,
        "name": None,
    }
    for args, field in (
        ({"action": "add"}, "args.spec"),
        ({"action": "remove", "spec": spec}, "args.spec"),
        ({"action": "drop", "name": "x"}, "args.action"),
    ):
        with pytest.raises(CtlError, match=field):
            validate({"op": "schedule", "args": args})
