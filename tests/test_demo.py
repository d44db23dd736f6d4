"""`make demo` end to end: a shortened demo as a real process, Ctrl-C mid-run, and the watchdog
that cleans up after a demo killed outright. Nothing may be left behind: no process, no segment,
no state.

The full run (scale out, back in, summary, plot) is the session's `demo_under_load`
(tests/conftest.py), shared with test_drain_e2e.py: the demo under a demand curve of its own
(`--trace`). The built-in curve (nasa, the default) runs here up to its load in the Ctrl-C and
crash tests."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Sequence

import psutil
import pytest

from deploy.local import cleanup
from shared.table import MetricsTable, lock_path
from tests.procs import base_env, free_port, wait_for

pytestmark = pytest.mark.slow


def assert_nothing_left(run_id: str, shm_name: str, run_dir: str, procs: Sequence[dict] = ()) -> None:
    leftovers = cleanup.marked_processes(run_id)
    assert not leftovers, f"processes left behind: {[(p.pid, p.cmdline()) for p in leftovers]}"
    for p in procs:
        assert cleanup.same_process(p["pid"], p["started"]) is None, f"{p['name']} (pid {p['pid']}) left behind"
    assert not os.path.exists(f"/dev/shm/{shm_name}"), "segment left behind"
    assert not os.path.exists(lock_path(shm_name)), "lock file left behind"
    assert not os.path.exists(run_dir), "run dir (state, logs, token) left behind"


def run_id_of(output: str) -> tuple[str, str, str]:
    m = re.search(r"run (\w+): segment /dev/shm/(\S+), state (\S+)", output)
    assert m, output
    return m.group(1), m.group(2), m.group(3)


def demo_argv(tmp_path, duration: int) -> list[str]:
    return [
        "-m",
        "deploy.local.demo",
        "--duration",
        str(duration),
        "--plain",
        "--out",
        str(tmp_path / "out"),
        "--summary-json",
        str(tmp_path / "summary.json"),
    ]


def test_demo_scales_out_under_load_and_back_in_and_leaves_nothing(demo_under_load):
    # The session's one run of the demo under load (tests/conftest.py: `python -m deploy.local.demo`
    # over bench/bench_drain.py's one-cycle demand curve, with an app killed at the peak), which
    # test_drain_e2e.py reads too. It exited 0 (`run_demo` fails otherwise).
    out = demo_under_load.output
    s = demo_under_load.summary
    detail = f"{out[-4000:]}\nsummary: { {k: v for k, v in s.items() if k != 'samples'} }"
    assert s["error"] == "" and s["stop_reason"] == "the demand curve has been replayed", detail
    # Scaled out under load: from one instance to at least three, by launches.
    first = next(x["healthy"] for x in s["samples"] if x["healthy"])
    assert first == 1, detail
    assert s["peak_instances"] >= 3 and s["scale_outs"] >= 2, detail
    # ... and back in after the peak.
    assert s["scale_ins"] >= 1 and s["final_instances"] < s["peak_instances"], detail
    # The load was served: at most 2 % failed.
    assert s["served"] > 500, detail
    assert s["failed_fraction"] <= 0.02, detail
    assert s["mean_cpu"] is not None and s["mean_cpu"] > 0, detail
    with open(s["plot"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(s["plot"]) > 10_000
    assert "peak instances:" in out and "requests:" in out and s["plot"] in out
    assert "settings tuned for a short demo: HELIX_POLL_INTERVAL=" in out
    assert_nothing_left(s["run_id"], s["shm_name"], s["run_dir"], s["procs"])
    assert any(p["name"] == "instance" for p in s["procs"])  # it did see instances, and they are gone


def test_ctrl_c_mid_run_stops_everything(procs, tmp_path):
    demo = procs.python("demo", demo_argv(tmp_path, 120), base_env())
    wait_for(lambda: "load: " in demo.output(), 90, "the demo to start its load", interval=0.2)
    run_id, shm_name, run_dir = run_id_of(demo.output())
    assert cleanup.marked_processes(run_id), "the demo's processes should be running"
    demo.signal(signal.SIGINT)
    assert demo.wait(timeout=60) == 0, demo.output()[-4000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stop_reason"] == "SIGINT received", demo.output()[-3000:]
    assert "demo ended: SIGINT received" in demo.output()
    assert_nothing_left(run_id, shm_name, run_dir, s["procs"])


def test_bad_arguments_exit_2_and_start_nothing(procs, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1\nmany\n")
    # A temporary directory of their own: another demo (another pytest worker's) may start a run meanwhile.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    runs = tmp / os.path.basename(cleanup.RUNS_ROOT)
    for args, message in (
        (["--duration", "5"], "duration=5: expected 20 to 86400 seconds"),
        (["--trace", str(bad)], "bad.txt:2: 'many': expected one non-negative number"),
    ):
        demo = procs.python("demo", ["-m", "deploy.local.demo", *args], base_env(TMPDIR=str(tmp)))
        assert demo.wait(timeout=60) == 2
        assert message in demo.output()
    demo = procs.python(
        "demo",
        ["-m", "deploy.local.demo", "--plain", "--out", str(tmp_path)],
        base_env(DEMO_DURATION="abc", TMPDIR=str(tmp)),
    )
    assert demo.wait(timeout=60) == 2 and "DEMO_DURATION=abc: expected a whole number" in demo.output()
    demo = procs.python(
        "demo",
        ["-m", "deploy.local.demo", "--plain", "--out", str(tmp_path)],
        base_env(HELIX_CPU_TARGET="2", HELIX_SHM_NAME="ignored-the-demo-uses-its-own", TMPDIR=str(tmp)),
    )
    assert demo.wait(timeout=60) == 2
    assert demo.output().strip() == "demo: bad configuration: HELIX_CPU_TARGET=2: expected a number greater than 0 to 1"
    assert not runs.exists() or not os.listdir(runs)


# -- the watchdog, with a stand-in demo --------------------------------------------------------


def start_fake_run(procs, table_name: str, tmp_path) -> tuple:
    """A 'demo' (a sleeping process), a run record, a segment and two marked 'instances'."""
    run_id = os.urandom(6).hex()
    fake_demo = procs.python("fake-demo", ["-c", "import time; time.sleep(300)"])
    root = tmp_path / "runs"
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    MetricsTable.open_or_create(table_name, 4).close()
    started = cleanup.process_started(fake_demo.pid)
    assert started is not None
    record = cleanup.RunRecord(
        run_dir=str(run_dir),
        run_id=run_id,
        shm_name=table_name,
        demo_pid=fake_demo.pid,
        demo_started=started,
    )
    record.save()
    marked = base_env(**{cleanup.MARKER_KEY: run_id})
    apps = [
        procs.python(f"app-{i}", ["-m", "deploy.local.sample_app", "--port", str(free_port())], marked)
        for i in range(2)
    ]
    for app in apps:
        record.add("instance", app.pid)
    wait_for(lambda: len(cleanup.marked_processes(run_id)) == 2, 30, "the marked instances")
    return run_id, fake_demo, record, apps


def test_watchdog_cleans_up_after_a_killed_demo(procs, table_name, tmp_path):
    run_id, fake_demo, record, apps = start_fake_run(procs, table_name, tmp_path)
    watchdog = procs.python("watchdog", ["-m", "deploy.local.cleanup", "--watch", str(fake_demo.pid), record.run_dir])
    # While the demo lives, the watchdog touches nothing.
    wait_for(
        lambda: psutil.Process(watchdog.pid).status() in (psutil.STATUS_SLEEPING, psutil.STATUS_RUNNING),
        10,
        "the watchdog",
    )
    assert len(cleanup.marked_processes(run_id)) == 2 and os.path.exists(f"/dev/shm/{table_name}")
    os.kill(fake_demo.pid, signal.SIGKILL)
    assert watchdog.wait(timeout=60) == 0, watchdog.output()
    assert "died without cleaning up" in watchdog.output()
    for app in apps:
        app.wait(timeout=10)
    assert_nothing_left(run_id, table_name, record.run_dir)


def test_watchdog_leaves_when_the_demo_cleaned_up(procs, table_name, tmp_path):
    run_id, fake_demo, record, apps = start_fake_run(procs, table_name, tmp_path)
    watchdog = procs.python("watchdog", ["-m", "deploy.local.cleanup", "--watch", str(fake_demo.pid), record.run_dir])
    cleanup.clean_run(record, grace=2)
    assert watchdog.wait(timeout=30) == 0
    assert "died without" not in watchdog.output()
    assert fake_demo.alive()  # never the demo itself
    assert_nothing_left(run_id, table_name, record.run_dir)


def test_next_run_cleans_a_run_whose_demo_and_watchdog_died(procs, table_name, tmp_path):
    run_id, fake_demo, record, apps = start_fake_run(procs, table_name, tmp_path)
    root = os.path.dirname(record.run_dir)
    assert cleanup.clean_stale_runs(root) == []  # its demo is alive: not stale
    assert len(cleanup.marked_processes(run_id)) == 2
    fake_demo.kill_group()
    assert cleanup.clean_stale_runs(root) == [record.run_dir]
    assert_nothing_left(run_id, table_name, record.run_dir)


@pytest.mark.parametrize("part, module", [("monitor", "monitor_s"), ("controller", "controller_asg")])
def test_a_crashed_part_ends_the_demo_and_leaves_nothing(procs, tmp_path, part, module):
    demo = procs.python("demo", demo_argv(tmp_path, 120), base_env())
    wait_for(lambda: "load: " in demo.output(), 90, "the demo to start its load", interval=0.2)
    run_id, shm_name, run_dir = run_id_of(demo.output())
    victim = next(c for c in psutil.Process(demo.pid).children() if c.cmdline()[1:3] == ["-m", module])
    victim.kill()
    assert demo.wait(timeout=60) == 1, demo.output()[-4000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["error"].startswith(f"{part} exited with status -9"), s["error"]
    assert f"demo stopped: {part} exited" in demo.output()
    assert_nothing_left(run_id, shm_name, run_dir, s["procs"])
