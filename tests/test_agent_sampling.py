"""CPU sources and the sampler, measured on real processes."""

from __future__ import annotations

import os

from monitor_c.sampling import CgroupCpu, HostCpu, Sampler, TreeCpu
from tests.procs import wait_for


def test_tree_cpu_sees_a_busy_child_and_an_idle_one(procs):
    # A parent that sleeps with a busy child: the tree's CPU is the child's.
    parent = procs.python(
        "tree",
        [
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'while True: pass']); time.sleep(600)",
        ],
    )
    idle = procs.start("idle", ["sleep", "600"])
    wait_for(lambda: len(__import__("psutil").Process(parent.pid).children()) == 1, 30, "the busy child")
    busy_src, idle_src = TreeCpu(parent.pid, 1), TreeCpu(idle.pid, 1)
    busy = wait_for(lambda: (v := busy_src.utilisation()) > 0.2 and v, 30, "the busy tree to use CPU", interval=0.3)
    assert busy <= 1.0
    assert idle_src.utilisation() < 0.1
    assert 0 < busy_src.memory() < 1


def test_tree_cpu_of_a_vanished_process_is_zero():
    src = TreeCpu(2**22 + 12345, 2)
    assert src.utilisation() == 0.0 and src.memory() == 0.0


def test_cgroup_and_host_sources_stay_in_range():
    src = CgroupCpu("/", os.cpu_count() or 1)
    value = src.utilisation()
    assert 0.0 <= value <= 1.0 and 0.0 <= src.memory() <= 1.0
    assert 0.0 <= HostCpu().utilisation() <= 1.0


def test_sampler_fields():
    sampler = Sampler("host", 2)
    s = sampler.sample()
    for name in ("cpu", "mem", "disk"):
        assert 0.0 <= getattr(s, name) <= 1.0, name
    assert s.net_rx_bps >= 0 and s.net_tx_bps >= 0 and s.load1 >= 0 and s.sample_time > 0
