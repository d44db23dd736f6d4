"""The warm pool (HELIX_WARM_POOL_SIZE): instances launched, prepared (launch hook CONTINUE), then
stopped; a scale-out starts them first. The real controller in the fault-injection harness, where
every step checks that running instances stay within HELIX_MAX_INSTANCES and every instance,
stopped ones too, within the prepared cap; plus the local provider pausing a real process group."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from controller_asg.gate import Budget
from controller_asg.policy.base import Observation
from controller_asg.policy.predictive import Predictive
from controller_asg.providers.base import ProviderInstance
from tests.faultsim import Fault, Harness, activities, assert_clean
from tests.procs import wait_for

# The controller's loggers quiet in here (thousands of simulated steps); restored after each test.
pytestmark = pytest.mark.usefixtures("quiet_controller_logs")


def stopped(h: Harness) -> list[str]:
    return sorted(i.instance_id for i in h.cloud.owned() if i.state == "stopped")


def test_the_pool_fills_with_prepared_stopped_instances_that_are_not_capacity(harness, tmp_path):
    h = harness(HELIX_WARM_POOL_SIZE=3, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"))
    h.run_until(120)
    assert len(stopped(h)) == 3
    status = h.table.snapshot().controller
    assert status.desired == 2 and len(h.cloud.billable()) == 2, "stopped instances are not capacity"
    assert [a["count"] for a in activities(h) if a["action"] == "launch-warm"] == [3]
    assert_clean(h.report, converge=False)


def test_a_scale_out_starts_warm_instances_first(harness, tmp_path):
    h = harness(HELIX_WARM_POOL_SIZE=2, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"), HELIX_MAX_INSTANCES=8)
    h.run_until(120)
    warm = stopped(h)
    assert len(warm) == 2
    h.inject(Fault(120, "load", value=50))  # five instances' worth at 100%: a scale-out of several
    h.run_until(200)
    acts = activities(h)
    starts = [a for a in acts if a["action"] == "start-warm"]
    assert starts and sorted(starts[0]["instance_ids"]) == warm
    first_cold = [a for a in acts if a["action"] == "launch" and a["time"] >= 120]
    assert not first_cold or first_cold[0]["time"] >= starts[0]["time"], "warm first, then cold"
    assert all(h.monitor.is_healthy(i) for i in warm), "the started ones serve"
    h.inject(Fault(200, "load", value=10))  # at max meanwhile, the pool waits; with room again it refills
    h.run_until(700)
    assert len(stopped(h)) == 2, "and the pool refills"
    h.report.violations += h.cloud.violations
    assert_clean(h.report, converge=False)


def test_at_max_the_pool_waits_and_nothing_exceeds_either_cap(harness, tmp_path):
    h = harness(
        HELIX_WARM_POOL_SIZE=4,
        HELIX_WARM_POOL_MAX_PREPARED=7,
        HELIX_MAX_INSTANCES=5,
        HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"),
    )
    report = h.run([Fault(0, "load", value=80), Fault(300, "load", value=5)], faults_end=700, settle=900)
    assert_clean(report)  # the harness checks both caps after every call and step


def test_a_broken_image_trips_the_breaker_instead_of_cycling_the_pool(harness, tmp_path):
    h = harness(HELIX_WARM_POOL_SIZE=3, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"))
    h.cloud.broken_image = True
    h.run_until(60)  # the fleet's first two launches are broken too
    h.run_until(1500)
    assert h.controller is not None and h.controller.breaker.tripped
    warm = sum(a["count"] for a in activities(h) if a["action"] == "launch-warm")
    assert warm <= 2 * 3, "the pool is refilled at most once before the breaker stops it"
    assert stopped(h) == []
    h.report.violations += h.cloud.violations
    assert not h.report.violations


def test_stop_and_start_failures_are_retried_and_launch_cold_meanwhile(harness, tmp_path):
    h = harness(HELIX_WARM_POOL_SIZE=2, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"), HELIX_MAX_INSTANCES=8)
    report = h.run(
        [
            Fault(0, "stop_start_fails", duration=90),
            Fault(150, "stop_start_fails", duration=60),
            Fault(160, "load", value=50),
            Fault(400, "load", value=10),
        ],
        faults_end=500,
        settle=900,
    )
    assert_clean(report)
    assert len(stopped(h)) == 2


def test_the_budget_counts_stopped_instances_against_the_prepared_cap_only():
    def inst(i: str, state: str) -> ProviderInstance:
        return ProviderInstance(i, "a", 0.0, state)

    listed = [inst("a", "running"), inst("b", "running"), inst("c", "stopped"), inst("d", "stopped")]
    budget = Budget.build(3, listed, {}, [], max_prepared=5)
    assert (budget.billable, budget.stopped, budget.prepared) == (2, 2, 4)
    assert budget.allow(5) == 1  # one more within both caps
    assert budget.allow_start(5) == 1  # starting adds to what is billed for compute
    assert Budget.build(3, listed, {}, [], max_prepared=0).allow(5) == 1  # no prepared cap: max alone


# --- the local provider: a real paused process group ------------------------------------------------


def test_the_local_provider_pauses_and_resumes_an_instances_whole_group(tmp_path):
    from controller_asg.providers.local import LocalProvider
    from shared.config import load_config

    cfg = load_config(
        {
            "HELIX_ENV_FILE": "",
            "HELIX_STATE_DIR": str(tmp_path),
            "HELIX_GROUP": "pool",
            "HELIX_INSECURE": "1",
            "HELIX_MONITOR_ADDR": "127.0.0.1:9",
            "HELIX_LOCAL_APP_CMD": "sleep 600",
        }
    )
    provider = LocalProvider(cfg)
    try:
        [inst] = provider.launch(1, "pool-test-token")

        def procs() -> list[psutil.Process]:
            record = json.loads((tmp_path / "instances" / f"{inst.instance_id}.json").read_text())
            return [p for p in psutil.process_iter() if _pgid(p.pid) == record["pgid"]]

        wait_for(lambda: len(procs()) >= 2, 30, "the agent and the app to run")
        provider.stop([inst.instance_id])
        assert [i.state for i in provider.list_instances()] == ["stopped"]
        wait_for(lambda: all(p.status() == psutil.STATUS_STOPPED for p in procs()), 15, "the group to pause")
        provider.start([inst.instance_id])
        assert [i.state for i in provider.list_instances()] == ["running"]
        wait_for(lambda: all(p.status() != psutil.STATUS_STOPPED for p in procs()), 15, "the group to resume")
        provider.stop([inst.instance_id])
        provider.terminate([inst.instance_id])  # a paused group still dies
        wait_for(lambda: provider.list_instances() == [], 30, "the paused instance to be gone")
    finally:
        from tests.procs import kill_local_instances

        kill_local_instances(str(tmp_path))
        provider.close()


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


@pytest.mark.parametrize("pool", [0, 1])
def test_an_instance_stopped_by_hand_is_adopted_by_the_pool_or_terminated(harness, tmp_path, pool):
    """Was: a stopped instance listed as running, never healthy, replaced after its grace. Now it is
    not capacity; left alone it would bill its disks forever."""
    h = harness(HELIX_WARM_POOL_SIZE=pool, HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"))
    h.run_until(60)
    victim = sorted(i.instance_id for i in h.cloud.billable())[0]
    h.cloud.instances[victim].state = "stopped"
    h.run_until(120)
    inst = h.cloud.instances[victim]
    if pool:
        assert inst.state == "stopped" and h.controller is not None and victim in h.controller._pool  # noqa: SLF001
    else:
        assert inst.state in ("terminating", "gone")
        assert any(a["action"] == "terminate" and victim in a["instance_ids"] for a in activities(h))
    assert len([i for i in h.cloud.billable()]) == 2, "min kept meanwhile"


def test_the_controller_learns_the_boot_time_it_plans_for(harness, tmp_path):
    """HELIX_LAUNCH_LEAD=0 (the default): the policy plans as far ahead as the controller's own
    launches took to come into service (the median of the last 20), not a fixed 90 s."""
    h = harness(HELIX_ACTIVITY_LOG=str(tmp_path / "a.jsonl"), HELIX_LAUNCH_LEAD=0)
    seen: list[float] = []
    assert h.controller is not None
    policy = h.controller.policy.inner
    decide = policy.decide

    def spy(obs):
        seen.append(obs.boot_time)
        return decide(obs)

    policy.decide = spy
    h.run_until(120)
    learned = [b for b in seen if b > 0]
    assert learned and 2.0 <= learned[-1] <= 15.0, learned[-3:]  # the sim's agents register in 2-6 s, plus the hook
    assert isinstance(policy, Predictive)
    assert policy.lead(Observation(0.0, 0, 0, 0, (), boot_time=learned[-1])) == learned[-1]
    assert policy.lead(Observation(0.0, 0, 0, 0, ())) == 90.0, "until one is measured"
