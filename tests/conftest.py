from __future__ import annotations

import os
import shutil
import uuid

import pytest

from shared.table import MetricsTable
from tests.moto_server import fault_proxy, moto_endpoint  # noqa: F401 - fixtures, for test_provider_ec2.py
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
