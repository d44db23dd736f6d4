"""The controller process: at most one acts per group on a host (real processes)."""

from __future__ import annotations

from tests.procs import base_env, wait_for


def test_a_second_controller_exits_2_naming_the_holder_and_a_dry_run_may_watch(procs, tmp_path, table_name):
    """Was: a manual run that forgot --dry-run acted too (15 running with max 10)."""
    env = base_env(
        HELIX_STATE_DIR=str(tmp_path / "state"), HELIX_SHM_NAME=table_name, HELIX_INSECURE=1, HELIX_GROUP="lockgroup"
    )
    first = procs.python("first", ["-m", "controller_asg"], env=env)
    # No table yet: it holds the host lock while it waits for one.
    wait_for(lambda: "waiting for the metrics table" in first.output(), 60, "the first controller to start")
    second = procs.python("second", ["-m", "controller_asg"], env=env)
    assert second.wait(60) == 2
    lines = [line for line in second.output().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"pid {first.pid}" in lines[0] and "lockgroup.lock" in lines[0] and "--dry-run" in lines[0]
    assert first.alive()

    watcher = procs.python("dry-run", ["-m", "controller_asg", "--dry-run"], env=env)
    wait_for(lambda: "waiting for the metrics table" in watcher.output(), 60, "a dry run to start beside it")

    other = procs.python("other-group", ["-m", "controller_asg"], env=dict(env, HELIX_GROUP="another"))
    wait_for(lambda: "waiting for the metrics table" in other.output(), 60, "another group's controller to start")

    first.kill_group()  # SIGKILL: the kernel drops its lock
    third = procs.python("third", ["-m", "controller_asg"], env=env)
    wait_for(lambda: "waiting for the metrics table" in third.output(), 60, "a controller after the holder died")
