"""The one way tests start processes, wait on conditions and clean up.

Every process runs in its own session (process group), with a fresh Python interpreter
(`subprocess`, never fork), and is killed with its whole group when the test ends, pass or fail.
Output goes to a log file per process so a failing test can show it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a condition may fail until it is ready
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def local_instance_records(state_dir: str) -> dict[str, dict]:
    """The local provider's instance records under `state_dir`, by instance id."""
    folder = os.path.join(state_dir, "instances")
    out = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as fh:
                    out[name[:-5]] = json.load(fh)
            except (OSError, ValueError):
                pass
    return out


def kill_local_instances(state_dir: str) -> None:
    """SIGKILL every process group the local provider recorded (after its controller is gone)."""
    for rec in local_instance_records(state_dir).values():
        try:
            os.killpg(rec["pgid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError, KeyError, TypeError):
            pass


def state_dir_for(table_name: str) -> str:
    """A test's HELIX_STATE_DIR, beside its table: removed with it by the `table_name` fixture."""
    return os.path.join(tempfile.gettempdir(), f"{table_name}-state")


_PKI: list[str] = []


def manager_pki() -> str:
    """A manager CA (`python -m shared.pki init`'s files) for this test process, made once and
    removed at exit: ec2 configurations default to HELIX_TLS_MODE=ca and need one."""
    if not _PKI:
        import atexit
        import shutil

        from shared import pki

        root = tempfile.mkdtemp(prefix="helix-test-pki-")
        atexit.register(shutil.rmtree, root, True)
        directory = os.path.join(root, "pki")
        pki.init(directory)
        _PKI.append(directory)
    return _PKI[0]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def base_env(**overrides: Any) -> dict[str, str]:
    """The environment for a Helix process in a test: no stray HELIX_ keys from the caller, no .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    env["HELIX_ENV_FILE"] = ""  # never pick up a developer's ./.env
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in overrides.items():
        env[key] = str(value)
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: str
    _log: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()


class ProcessPool:
    """Starts processes for one test and kills every one of them (and their groups) at the end."""

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="helix-test-logs-")
        self.procs: list[Proc] = []

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None
    ) -> Proc:
        log_path = os.path.join(self.log_dir, f"{name}-{len(self.procs)}.log")
        log = open(log_path, "w", encoding="utf-8")
        popen = subprocess.Popen(
            list(argv),
            env=dict(env or base_env()),
            cwd=cwd or ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path, log)
        self.procs.append(proc)
        return proc

    def python(self, name: str, module_args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        """`python -m ...` (or `python -c ...`) with this interpreter."""
        return self.start(name, [sys.executable, *module_args], env)

    def dump(self) -> str:
        parts = []
        for proc in self.procs:
            parts.append(f"----- {proc.name} (pid {proc.pid}, rc {proc.popen.poll()}) -----\n{proc.output()[-4000:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.kill_group()


def serve_in_thread(server: socketserver.BaseServer, name: str = "test-server") -> threading.Thread:
    """Serve `server` from a daemon thread, started. It polls for shutdown every 50 ms, so the
    test's `server.shutdown()` returns at once, not after the default 0.5 s."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
    thread.start()
    return thread
