from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import uuid

import pytest

from shared.table import MetricsTable
from tests.moto_server import fault_proxy, moto_endpoint, moto_server  # noqa: F401 - fixtures, for test_provider_ec2.py
from tests.procs import ProcessPool, state_dir_for


@pytest.fixture
def procs(request):
    """Start processes through this; all of them die with the test, and their logs show on failure."""
    pool = ProcessPool()
    yield pool
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        print(pool.dump())
    pool.stop_all()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def table_name():
    """A segment name unique to this test; the segment and its lock file are removed afterwards."""
    name = f"helix-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    MetricsTable.remove(name)
    shutil.rmtree(state_dir_for(name), ignore_errors=True)


@pytest.fixture(scope="session")
def demo_under_load(tmp_path_factory):
    """One run of `make demo` (`python -m deploy.local.demo`, through bench/bench_drain.py's
    `run_demo`) under load, with drain on, one app SIGKILLed at the peak (tests/test_drain_e2e.py's
    `kill_one_app`) and the table watched every 50 ms: a `DemoRun`. About 70 s of real processes,
    so it runs once per session and both tests that need it read it: test_demo.py (scales out and
    back in, the summary and plot, nothing left behind) and test_drain_e2e.py (every terminate
    drained, no request failed by one). A run that fails fails both, with its output.

    Under `make test`'s workers (pytest-xdist) a session is one per worker, so the first worker to
    need the run makes it under a file lock beside the workers' temporary directories and leaves it
    there (pickled) for the other. (xdist's --dist loadgroup would put both tests on one worker,
    but with pytest 9 it does not group.)"""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _demo_under_load(tmp_path_factory)
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / "demo-under-load.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        made = shared / "demo-under-load.pickle"
        if made.exists():
            outcome, value = pickle.loads(made.read_bytes())
            if outcome == "failed":
                pytest.fail(f"the demo run failed on another worker: {value}")
            return value
        try:
            run = _demo_under_load(tmp_path_factory)
        except Exception as e:
            made.write_bytes(pickle.dumps(("failed", f"{type(e).__name__}: {e}")))
            raise
        made.write_bytes(pickle.dumps(("made", run)))
        return run


def _demo_under_load(tmp_path_factory):
    from bench.bench_drain import cycle_curve, run_demo
    from tests.test_drain_e2e import kill_one_app

    pool = ProcessPool()
    try:
        workdir = str(tmp_path_factory.mktemp("demo-under-load"))
        return run_demo(pool, workdir, cycle_curve(1), drain=True, during=kill_one_app, timeout=200)
    except BaseException:
        print(pool.dump())
        raise
    finally:
        pool.stop_all()


@pytest.fixture
def quiet_controller_logs():
    """The controller's loggers quiet for a test that runs thousands of simulated steps; restored
    after it (other tests read these loggers with caplog)."""
    from tests.faultsim import quiet_logs, restore_logs

    before = quiet_logs()
    yield
    restore_logs(before)


@pytest.fixture
def harness(table_name, tmp_path):
    """Makes fault-injection harnesses (tests/faultsim.py) on this test's table; closes them after."""
    from tests.faultsim import Harness

    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        h = Harness(table_name, str(tmp_path), **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
