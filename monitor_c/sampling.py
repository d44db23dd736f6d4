"""Where the agent's numbers come from: CPU (host, a process tree or a cgroup), memory, load,
network and disk, each sampled on demand; CPU and network as the change since the previous sample.

Per poller. Several MonitorS may poll one agent (one per manager, HELIX_MONITOR_ADDR). A rate "since
the previous sample" shared by all of them would be consumed by whichever polled last: with two
pollers one second apart each, one of them could be handed a rate over a few milliseconds. So every
rate keeps one baseline per poller (`poller`: the MonitorS address, "" for a caller the agent cannot
tell apart), and each MonitorS sees the rate over its own interval, exactly as with one poller. A
poller's first sample measures since the source was made (the agent's start), as the first poll did
before. The pollers are the configured managers, at most a handful, so the baselines stay few.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psutil

CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass
class Sample:
    cpu: float
    mem: float
    load1: float
    load5: float
    load15: float
    net_rx_bps: float
    net_tx_bps: float
    disk: float
    sample_time: float


def _busy_share(before: Any, after: Any) -> float:
    """Busy share of all CPUs between two `psutil.cpu_times()` readings (psutil's own cpu_percent
    rule: idle and iowait are not busy; guest time is already counted in user time on Linux)."""

    def totals(t: Any) -> tuple[float, float]:
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total, total - t.idle - getattr(t, "iowait", 0.0)

    (all0, busy0), (all1, busy1) = totals(before), totals(after)
    if all1 <= all0 or busy1 <= busy0:
        return 0.0
    return min((busy1 - busy0) / (all1 - all0), 1.0)


class HostCpu:
    """The whole machine (what an EC2 instance needs): busy share of all CPUs since this poller's
    last call."""

    def __init__(self) -> None:
        self._first = psutil.cpu_times()  # every poller's first baseline
        self._last: dict[str, Any] = {}

    def utilisation(self, poller: str = "") -> float:
        now = psutil.cpu_times()
        before = self._last.get(poller, self._first)
        self._last[poller] = now
        return _busy_share(before, now)

    def memory(self) -> float:
        return psutil.virtual_memory().percent / 100.0


class _CounterCpu:
    """CPU seconds from a monotonic counter, divided by wall time and HELIX_VCPUS."""

    def __init__(self, vcpus: float):
        # A fraction is a CPU allotment (a local instance sized at 0.25 vCPU, a cgroup quota).
        self.vcpus = vcpus if vcpus > 0 else 1.0
        self._first = (time.monotonic(), self._cpu_seconds())  # every poller's first baseline
        self._last: dict[str, tuple[float, float]] = {}

    def _cpu_seconds(self) -> float:
        raise NotImplementedError

    def utilisation(self, poller: str = "") -> float:
        now, used = time.monotonic(), self._cpu_seconds()
        then, before = self._last.get(poller, self._first)
        self._last[poller] = (now, used)
        wall = now - then
        if wall <= 0:
            return 0.0
        # A counter can go backwards when a child exits unreaped; that interval counts as idle.
        return min(max((used - before) / (wall * self.vcpus), 0.0), 1.0)


class TreeCpu(_CounterCpu):
    """One process and all its descendants (several local "instances" share this host).

    Finding descendants means reading every process on the host (psutil builds the parent map
    from /proc), which would cost each agent milliseconds per sample on a host running many
    instances; so the tree is rescanned every RESCAN_SECONDS (or when a member dies) and the
    samples in between only read the known members. A child that starts and ends between two
    scans is still counted once its parent reaps it (children_* times)."""

    RESCAN_SECONDS = 5.0

    def __init__(self, pid: int, vcpus: float):
        self.pid = pid
        self._procs: list[psutil.Process] = []
        self._scanned_at = -1e9
        super().__init__(vcpus)

    def _processes(self) -> list[psutil.Process]:
        if time.monotonic() - self._scanned_at < self.RESCAN_SECONDS and self._procs:
            return self._procs
        self._scanned_at = time.monotonic()
        try:
            root = self._procs[0] if self._procs and self._procs[0].is_running() else psutil.Process(self.pid)
            self._procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            self._procs = []
        return self._procs

    def _rescan_soon(self) -> None:
        self._scanned_at = -1e9

    def _cpu_seconds(self) -> float:
        total = 0.0
        for proc in self._processes():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                self._rescan_soon()
                continue
            # children_* holds reaped children only, so nothing is counted twice.
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def memory(self) -> float:
        rss = 0
        for proc in self._processes():
            try:
                rss += proc.memory_info().rss
            except psutil.Error:
                self._rescan_soon()
                continue
        return min(rss / psutil.virtual_memory().total, 1.0)


class CgroupCpu(_CounterCpu):
    """A cgroup v2 directory: `usage_usec` from cpu.stat, memory.current against memory.max."""

    def __init__(self, path: str, vcpus: float):
        self.path = path if os.path.isdir(path) or path.startswith(CGROUP_ROOT) else CGROUP_ROOT + path
        super().__init__(vcpus)

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.path, name), encoding="ascii") as fh:
                return fh.read()
        except OSError:
            return ""

    def _cpu_seconds(self) -> float:
        for line in self._read("cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return 0.0

    def memory(self) -> float:
        current = self._read("memory.current").strip()
        limit = self._read("memory.max").strip()
        if not current.isdigit():
            return 0.0
        total = int(limit) if limit.isdigit() else psutil.virtual_memory().total
        return min(int(current) / max(total, 1), 1.0)


def cpu_source(spec: str, vcpus: float) -> HostCpu | TreeCpu | CgroupCpu:
    """Build the source HELIX_CPU_SOURCE names (already validated by the config)."""
    if spec.startswith("tree:"):
        return TreeCpu(int(spec[5:]), vcpus)
    if spec.startswith("cgroup:"):
        return CgroupCpu(spec[7:], vcpus)
    return HostCpu()


class Sampler:
    """Takes one Sample per call: CPU and network as rates since the same poller's previous call."""

    def __init__(self, spec: str, vcpus: float, disk_path: str = "/"):
        self.cpu = cpu_source(spec, vcpus)
        self.disk_path = disk_path
        self._net_first = (time.monotonic(), self._net_counters())
        self._net: dict[str, tuple[float, tuple[int, int]]] = {}

    @staticmethod
    def _net_counters() -> tuple[int, int]:
        try:
            c = psutil.net_io_counters()
            return c.bytes_recv, c.bytes_sent
        except (OSError, AttributeError):
            return 0, 0

    def sample(self, poller: str = "") -> Sample:
        now = time.monotonic()
        rx, tx = self._net_counters()
        then, (rx0, tx0) = self._net.get(poller, self._net_first)
        self._net[poller] = (now, (rx, tx))
        wall = max(now - then, 1e-6)
        load1, load5, load15 = os.getloadavg()
        try:
            disk = psutil.disk_usage(self.disk_path).percent / 100.0
        except OSError:
            disk = 0.0
        return Sample(
            cpu=self.cpu.utilisation(poller),
            mem=self.cpu.memory(),
            load1=load1,
            load5=load5,
            load15=load15,
            net_rx_bps=max(rx - rx0, 0) / wall,
            net_tx_bps=max(tx - tx0, 0) / wall,
            disk=disk,
            sample_time=time.time(),
        )
