"""The table in a private directory (HELIX_SHM_DIR): a memory-mapped file and its lock in a directory
only the service user may enter (mode 0700). Same table API as the /dev/shm segment; a directory,
table or lock someone else owns, or left open to others, is refused with one line naming it, and
MonitorS, ControllerASG and inspect exit 2 on it."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from shared.config import EXIT_BAD_CONFIG, ConfigError, load_config
from shared.table import (
    SHM_DIR,
    ControllerStatus,
    InstanceRow,
    LayoutMismatch,
    MetricsTable,
    NotPrivate,
    State,
    TableNotFound,
    lock_path,
    segment_path,
)
from tests.procs import ROOT, base_env, free_port, wait_for
from tests.test_deploy import MANAGER_UNITS, one, unit, words
from tests.test_monitor_e2e import monitor_env

NOBODY = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else None
needs_root = pytest.mark.skipif(NOBODY is None, reason="needs root to chown a file or directory to nobody")


@pytest.fixture
def private_dir(table_name) -> Iterator[str]:
    """A fresh directory for this test, mode 0700 as mkdtemp makes it; removed with all it holds."""
    directory = tempfile.mkdtemp(prefix="helix-test-shmdir-")
    try:
        yield directory
    finally:
        MetricsTable.remove(table_name, directory)
        shutil.rmtree(directory, ignore_errors=True)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text_ = str(exc.value)
    assert "\n" not in text_, text_
    return text_


def run_inspect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.inspect", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------------------------------------
# The table works there, as it does in /dev/shm.


def test_a_table_in_a_private_directory_works_end_to_end(table_name, private_dir):
    with MetricsTable.open_or_create(table_name, 8, directory=private_dir) as table:
        table.register(InstanceRow("i-1", "10.0.0.1:50051", State.HEALTHY, cpu=0.5))
        table.write_controller(ControllerStatus(pid=42, desired=3, action="launch", reason="why not"))
        path = segment_path(table_name, private_dir)
        assert sorted(os.listdir(private_dir)) == sorted([table_name, f"{table_name}.lock"])
        assert mode_of(path) == 0o600 and mode_of(lock_path(table_name, private_dir)) == 0o600
        assert not os.path.exists(os.path.join(SHM_DIR, table_name)), "nothing in /dev/shm"

        # A second handle shares the bytes both ways, as a second process's would.
        with MetricsTable.attach(table_name, directory=private_dir) as other:
            snap = other.snapshot()
            assert [r.instance_id for r in snap.instances()] == ["i-1"] and snap.controller.desired == 3
            other.register(InstanceRow("i-2", "10.0.0.2:50051", State.REGISTERING))
        assert {r.instance_id for r in table.snapshot().instances()} == {"i-1", "i-2"}

    # Another process: inspect, told the directory by HELIX_SHM_DIR or by --dir.
    env = base_env(HELIX_SHM_NAME=table_name, HELIX_SHM_DIR=private_dir)
    for result in (
        run_inspect(env, "--json"),
        run_inspect(base_env(), "--name", table_name, "--dir", private_dir, "--json"),
    ):
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert sorted(i["instance_id"] for i in data["instances"]) == ["i-1", "i-2"]
        assert data["controller"]["desired"] == 3

    # Closed is not gone: MonitorS re-attaches to the same rows after a restart.
    with MetricsTable.open_or_create(table_name, 8, directory=private_dir) as again:
        assert len(again.snapshot().instances()) == 2
    assert MetricsTable.remove(table_name, private_dir)
    assert os.listdir(private_dir) == []
    with pytest.raises(TableNotFound, match=f"no metrics table '{table_name}' in {private_dir}"):
        MetricsTable.attach(table_name, directory=private_dir)


def test_the_table_is_created_0600_whatever_the_umask(table_name, private_dir):
    old = os.umask(0)
    try:
        MetricsTable.open_or_create(table_name, 4, directory=private_dir).close()
    finally:
        os.umask(old)
    assert mode_of(segment_path(table_name, private_dir)) == 0o600
    assert mode_of(lock_path(table_name, private_dir)) == 0o600


def test_a_mismatched_or_empty_table_is_refused_until_reset(table_name, private_dir):
    MetricsTable.open_or_create(table_name, 4, directory=private_dir).close()
    with pytest.raises(LayoutMismatch, match="capacity 4, expected HELIX_SHM_CAPACITY=8"):
        MetricsTable.open_or_create(table_name, 8, directory=private_dir)
    with MetricsTable.open_or_create(table_name, 8, reset=True, directory=private_dir) as table:
        assert table.capacity == 8

    # An empty file (a creator that died between creating and sizing it) cannot even be mapped: a
    # reader waits on it as on no table, and MonitorS replaces it without HELIX_SHM_RESET.
    path = segment_path(table_name, private_dir)
    os.truncate(path, 0)
    with pytest.raises(TableNotFound, match="is half-made") as exc:
        MetricsTable.attach(table_name, directory=private_dir)
    one_line(exc)
    with MetricsTable.open_or_create(table_name, 8, directory=private_dir) as table:
        assert table.snapshot().capacity == 8


def test_remove_is_a_quiet_cleanup_when_nothing_is_there(table_name):
    missing = os.path.join(tempfile.gettempdir(), f"{table_name}-no-such-dir")
    assert MetricsTable.remove(table_name, missing) is False


# ---------------------------------------------------------------------------------------------
# The directory must be ours alone.


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_directory_open_to_others_is_refused_in_one_line(table_name, private_dir, mode):
    os.chmod(private_dir, mode)
    for open_it in (
        lambda: MetricsTable.open_or_create(table_name, 4, directory=private_dir),
        lambda: MetricsTable.attach(table_name, directory=private_dir),
        lambda: MetricsTable.attach(table_name, private=False, directory=private_dir),  # inspect's look
    ):
        with pytest.raises(NotPrivate) as exc:
            open_it()
        line = one_line(exc)
        assert f"HELIX_SHM_DIR={private_dir}: directory owned by uid {os.geteuid()} with mode {mode:04o}" in line
        assert "expected one owned by uid" in line and "with mode 0700" in line
    assert os.listdir(private_dir) == [], "nothing was created in it"


def test_a_shared_system_directory_is_refused(table_name):
    # /tmp is root's and 1777: open to everyone, whoever runs this.
    with pytest.raises(NotPrivate) as exc:
        MetricsTable.open_or_create(table_name, 4, directory="/tmp")
    line = one_line(exc)
    assert line.startswith("HELIX_SHM_DIR=/tmp: directory owned by uid 0 with mode 1777, expected")
    assert not os.path.exists(segment_path(table_name, "/tmp")) and not os.path.exists(lock_path(table_name, "/tmp"))


@needs_root
def test_a_directory_owned_by_someone_else_is_refused(table_name, private_dir):
    os.chown(private_dir, NOBODY, -1)
    with pytest.raises(NotPrivate) as exc:
        MetricsTable.open_or_create(table_name, 4, directory=private_dir)
    assert f"directory owned by uid {NOBODY} with mode 0700, expected one owned by uid 0" in one_line(exc)
    assert os.listdir(private_dir) == []


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_a_directory_that_is_not_one_is_refused(table_name, private_dir, kind):
    path = os.path.join(private_dir, "sub")
    if kind == "a file":
        open(path, "w").close()
    with pytest.raises(NotPrivate) as exc:
        MetricsTable.open_or_create(table_name, 4, directory=path)
    reason = "No such file or directory" if kind == "missing" else "Not a directory"
    assert one_line(exc).startswith(f"HELIX_SHM_DIR={path}: cannot open it ({reason}), expected an existing directory")


# ---------------------------------------------------------------------------------------------
# A table or lock planted in it is refused too.


def plant(name: str, directory: str, what: str, mode: int, owner: int | None = None) -> str:
    """Both files as MonitorS makes them, then one of them tampered with."""
    MetricsTable.open_or_create(name, 4, directory=directory).close()
    path = segment_path(name, directory) if what == "table" else lock_path(name, directory)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, -1)
    return path


@pytest.mark.parametrize("what", ["table", "lock"])
def test_a_table_or_lock_open_to_others_is_refused(table_name, private_dir, what):
    path = plant(table_name, private_dir, what, 0o666)
    for open_it in (
        lambda: MetricsTable.open_or_create(table_name, 4, directory=private_dir),
        lambda: MetricsTable.attach(table_name, directory=private_dir),
    ):
        with pytest.raises(NotPrivate, match=f"{path} has mode 0666, expected 0600") as exc:
            open_it()
        one_line(exc)
    assert mode_of(path) == 0o666, "nothing was changed"


@needs_root
@pytest.mark.parametrize("what", ["table", "lock"])
def test_a_table_or_lock_owned_by_someone_else_is_refused(table_name, private_dir, what):
    path = plant(table_name, private_dir, what, 0o600, owner=NOBODY)
    with pytest.raises(NotPrivate, match=f"{path} is owned by uid {NOBODY}, expected uid 0") as exc:
        MetricsTable.open_or_create(table_name, 4, directory=private_dir)
    one_line(exc)


def test_a_planted_file_is_never_adopted_and_a_symlink_never_followed(table_name, private_dir, tmp_path):
    planted = segment_path(table_name, private_dir)
    with open(planted, "wb") as fh:
        fh.write(b"\xff" * 4096)
    os.chmod(planted, 0o666)
    with pytest.raises(NotPrivate, match="has mode 0666"):
        MetricsTable.open_or_create(table_name, 4, reset=True, directory=private_dir)  # reset does not help
    os.unlink(planted)

    target = tmp_path / "elsewhere"
    target.write_bytes(b"x")
    os.symlink(target, planted)
    with pytest.raises(OSError):
        MetricsTable.open_or_create(table_name, 4, directory=private_dir)
    assert target.read_bytes() == b"x"


# ---------------------------------------------------------------------------------------------
# The configuration and the processes.


@pytest.mark.parametrize("value", ["run/helix", "./helix", " /run/helix"])
def test_the_loader_wants_an_absolute_path_or_nothing(value):
    with pytest.raises(ConfigError) as exc:
        load_config({"HELIX_ENV_FILE": "", "HELIX_SHM_DIR": value})
    assert len(exc.value.errors) == 1
    assert exc.value.errors[0].startswith(f"HELIX_SHM_DIR={value}: expected empty (a POSIX segment in /dev/shm)")
    assert load_config({"HELIX_ENV_FILE": ""}).shm_dir == ""
    assert load_config({"HELIX_ENV_FILE": "", "HELIX_SHM_DIR": "/run/helix"}).shm_dir == "/run/helix"


def exit_line(proc, needle: str) -> str:
    """The one line of a finished process's output that names `needle`."""
    lines = [line for line in proc.output().splitlines() if needle in line]
    assert len(lines) == 1, proc.output()
    return lines[0]


def bad_dir_commands(table_name: str, directory: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    env = monitor_env(table_name, free_port(), HELIX_SHM_DIR=directory)
    return {
        "monitor_s": (["-m", "monitor_s"], env),
        "controller_asg": (["-m", "controller_asg", "--dry-run"], {**env, "HELIX_INSECURE": "1"}),
        "inspect": (["-m", "shared.inspect"], env),
    }


@pytest.mark.parametrize("prog", ["monitor_s", "controller_asg", "inspect"])
def test_each_process_exits_2_on_a_directory_open_to_others(procs, table_name, private_dir, prog):
    os.chmod(private_dir, 0o755)
    argv, env = bad_dir_commands(table_name, private_dir)[prog]
    proc = procs.python(prog, argv, env)
    assert proc.wait(timeout=120) == EXIT_BAD_CONFIG, proc.output()
    line = exit_line(proc, "HELIX_SHM_DIR")
    assert f"HELIX_SHM_DIR={private_dir}: directory owned by uid {os.geteuid()} with mode 0755" in line
    assert "Traceback" not in proc.output()
    assert os.listdir(private_dir) == []


def test_monitor_s_exits_2_on_a_relative_directory(procs, table_name):
    proc = procs.python("monitor_s", ["-m", "monitor_s"], monitor_env(table_name, free_port(), HELIX_SHM_DIR="helix"))
    assert proc.wait(timeout=60) == EXIT_BAD_CONFIG, proc.output()
    assert exit_line(proc, "HELIX_SHM_DIR").startswith("monitor_s: bad configuration: HELIX_SHM_DIR=helix: expected")


@pytest.mark.slow
def test_monitor_s_keeps_its_table_in_the_directory_across_a_restart(procs, table_name, private_dir):
    def heartbeat_pid() -> int:
        with MetricsTable.attach(table_name, directory=private_dir) as table:
            return table.snapshot().monitor.pid

    env = monitor_env(table_name, free_port(), HELIX_SHM_DIR=private_dir)
    first = procs.python("monitor_s", ["-m", "monitor_s"], env)
    wait_for(lambda: heartbeat_pid() == first.pid, 60, "MonitorS to write its heartbeat in the directory's table")
    assert not os.path.exists(os.path.join(SHM_DIR, table_name))
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, first.output()
    assert os.path.exists(segment_path(table_name, private_dir)), "the table outlives MonitorS"

    second = procs.python("monitor_s", ["-m", "monitor_s"], env)
    wait_for(lambda: heartbeat_pid() == second.pid, 60, "a new MonitorS to re-attach to the same table")


def test_the_manager_units_put_the_table_in_their_private_runtime_directory():
    for name in MANAGER_UNITS:
        svc = unit(name)["Service"]
        runtime = one(svc, "RuntimeDirectory")
        assert one(svc, "RuntimeDirectoryMode") == "0700", name
        # Without Preserve=, stopping either unit would delete the table under the other.
        assert one(svc, "RuntimeDirectoryPreserve") == "yes", name
        assert f"HELIX_SHM_DIR=/run/{runtime}" in words(svc, "Environment"), name
