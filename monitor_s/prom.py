"""Prometheus exposition for MonitorS (HELIX_METRICS_PORT, 0 turns it off).

Per-instance values are read from the in-memory fleet at scrape time by a custom collector, so
a poll cycle pays nothing for them and a deregistered instance's series simply disappear.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from monitor_s.fleet import Fleet
from shared.table import State

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FleetCollector:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def collect(self):
        entries = list(self.fleet.entries.values())
        labels = ["instance_id", "zone"]
        cpu = GaugeMetricFamily("helix_instance_cpu_ratio", "CPU utilisation 0..1 over the agent's last interval.", labels=labels)
        mem = GaugeMetricFamily("helix_instance_memory_ratio", "Memory used 0..1.", labels=labels)
        up = GaugeMetricFamily("helix_instance_up", "1 if the last poll of the agent succeeded.", labels=labels)
        healthy = GaugeMetricFamily("helix_instance_healthy", "1 if the instance is healthy (agent answers, app live).",
                                    labels=labels)
        for e in entries:
            values = [e.instance_id, e.zone]
            cpu.add_metric(values, e.cpu)
            mem.add_metric(values, e.mem)
            up.add_metric(values, 1.0 if e.up else 0.0)
            healthy.add_metric(values, 1.0 if e.state == State.HEALTHY else 0.0)
        yield cpu
        yield mem
        yield up
        yield healthy
        yield GaugeMetricFamily("helix_registered_instances", "Agents registered with MonitorS.", value=len(entries))
        yield GaugeMetricFamily("helix_poll_cycle_seconds", "Duration of the last poll cycle.", value=self.fleet.last_cycle)
        polls = CounterMetricFamily("helix_polls", "Polls of agents by result.", labels=["result"])
        polls.add_metric(["ok"], self.fleet.polls_ok)
        polls.add_metric(["error"], self.fleet.polls_failed)
        yield polls


def start_exporter(fleet: Fleet, port: int, host: str = "0.0.0.0") -> CollectorRegistry:
    """Serve /metrics on `port` in a background thread; raises OSError if the port is taken."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet))
    latency = Histogram("helix_poll_latency_seconds", "Latency of successful agent polls.", buckets=LATENCY_BUCKETS,
                        registry=registry)

    def observe(values: list[float]) -> None:
        for value in values:
            latency.observe(value)

    fleet.latency_observer = observe
    start_http_server(port, addr=host, registry=registry)
    return registry
