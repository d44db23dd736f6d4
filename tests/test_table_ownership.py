"""The manager's files are ours: a segment or lock someone else planted (or left open to others) is
refused with one line naming it, and nothing is attached or written."""

from __future__ import annotations

import os
import pwd

import pytest

from shared.table import SHM_DIR, MetricsTable, NotPrivate, lock_path
from tests.test_monitor_e2e import monitor_env

NOBODY = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else None


def plant(name: str, mode: int, owner: int | None = None, what: str = "segment") -> str:
    path = os.path.join(SHM_DIR, name) if what == "segment" else lock_path(name)
    MetricsTable.open_or_create(name, 4).close()  # both files, as MonitorS makes them; then tampered with
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, -1)
    return path


@pytest.mark.parametrize("what", ["segment", "lock"])
def test_a_segment_or_lock_open_to_others_is_refused(table_name, what):
    """Was: a 0666 segment planted before MonitorS started was attached and trusted."""
    path = plant(table_name, 0o666, what=what)
    with pytest.raises(NotPrivate, match=f"{path} has mode 0666, expected 0600"):
        MetricsTable.open_or_create(table_name, 4)
    with pytest.raises(NotPrivate):
        MetricsTable.attach(table_name)
    if what == "segment":  # a read-only look is still allowed (inspect)
        MetricsTable.attach(table_name, private=False).close()
    assert os.stat(path).st_mode & 0o777 == 0o666, "nothing was changed"


@pytest.mark.skipif(NOBODY is None, reason="needs root to plant a file owned by nobody")
@pytest.mark.parametrize("what", ["segment", "lock"])
def test_a_segment_or_lock_owned_by_someone_else_is_refused(table_name, what):
    path = plant(table_name, 0o600, owner=NOBODY, what=what)
    with pytest.raises(NotPrivate, match=f"{path} is owned by uid {NOBODY}, expected uid 0"):
        MetricsTable.open_or_create(table_name, 4)


def test_monitor_s_refuses_a_planted_segment_in_one_line(procs, table_name):
    plant(table_name, 0o666)
    proc = procs.python("monitor_s", ["-m", "monitor_s"], monitor_env(table_name, 1))
    assert proc.wait(timeout=60) != 0
    lines = [line for line in proc.output().splitlines() if "mode 0666" in line]
    assert len(lines) == 1 and f"/dev/shm/{table_name}" in lines[0], proc.output()


def test_a_symlinked_lock_is_not_followed(table_name, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x")
    os.symlink(target, lock_path(table_name))
    with pytest.raises(OSError):
        MetricsTable.open_or_create(table_name, 4)
    assert target.read_text() == "x"


def test_the_controller_refuses_a_state_file_others_may_write(tmp_path, table_name):
    """Whoever can write state.json can plant a launch intent or clear the breaker."""
    import json

    from controller_asg.controller import Controller
    from controller_asg.policy import build_policy
    from shared.config import load_config
    from tests.test_controller_unit import MemoryProvider

    cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_STATE_DIR": str(tmp_path), "HELIX_SHM_NAME": table_name})
    with MetricsTable.open_or_create(table_name, 4) as table:
        Controller(cfg, table, MemoryProvider(), build_policy("target", cfg)).start()
        state = tmp_path / "controller" / "state.json"
        assert state.stat().st_mode & 0o777 == 0o600, "written owner-only"
        state.write_text(json.dumps({"intents": []}))
        state.chmod(0o666)
        with pytest.raises(NotPrivate, match="state.json has mode 0666"):
            Controller(cfg, table, MemoryProvider(), build_policy("target", cfg)).start()
