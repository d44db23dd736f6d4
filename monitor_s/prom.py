"""Prometheus exposition for MonitorS: HELIX_METRICS_LISTEN (loopback by default; empty turns it
off), optionally HTTPS (HELIX_METRICS_TLS_CERT/KEY) and HTTP basic auth
(HELIX_METRICS_BASIC_AUTH_FILE), served by shared/promhttp.py (the controller's endpoint is served
the same way).

Per-instance values are read from the in-memory fleet at scrape time by a custom collector, so
a poll cycle pays nothing for them and a deregistered instance's series simply disappear. The
same collector reads the table at scrape time for its bad rows and the controller's section
(breaker, billable and maximum instances), which ControllerASG writes and MonitorS only relays.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from monitor_s.fleet import Entry, Fleet
from shared.config import Config
from shared.promhttp import ExporterError, basic_auth, serve_registry
from shared.table import Lifecycle, Notice, State

__all__ = ["ExporterError", "FleetCollector", "basic_auth", "start_exporter"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FleetCollector:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        entries = list(self.fleet.entries.values())
        labels = ["instance_id", "zone"]
        cpu = GaugeMetricFamily(
            "helix_instance_cpu_ratio", "CPU utilisation 0..1 over the agent's last interval.", labels=labels
        )
        mem = GaugeMetricFamily("helix_instance_memory_ratio", "Memory used 0..1.", labels=labels)
        up = GaugeMetricFamily("helix_instance_up", "1 if the last poll of the agent succeeded.", labels=labels)
        healthy = GaugeMetricFamily(
            "helix_instance_healthy", "1 if the instance is healthy (agent answers, app live).", labels=labels
        )
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
        yield from self.collect_lifecycle(entries)
        yield GaugeMetricFamily(
            "helix_poll_cycle_seconds", "Duration of the last poll cycle.", value=self.fleet.last_cycle
        )
        polls = CounterMetricFamily("helix_polls", "Polls of agents by result.", labels=["result"])
        polls.add_metric(["ok"], self.fleet.polls_ok)
        polls.add_metric(["error"], self.fleet.polls_failed)
        yield polls
        yield from self.collect_table()

    @staticmethod
    def collect_lifecycle(entries: list[Entry]) -> Iterator[GaugeMetricFamily]:
        """Counts by lifecycle phase and by EC2 notice, every label always present (0 when none), so
        a dashboard or an alert on, say, `draining` never sees its series vanish."""
        phases = Counter(e.lifecycle for e in entries)
        lifecycle = GaugeMetricFamily(
            "helix_instances_lifecycle",
            "Registered instances by lifecycle phase (launch and terminate hooks).",
            labels=["lifecycle"],
        )
        for phase in Lifecycle:
            lifecycle.add_metric([phase.label], phases[phase])
        yield lifecycle
        notices = Counter(e.notice for e in entries)
        announced = GaugeMetricFamily(
            "helix_instance_notices",
            "Registered instances whose EC2 metadata announces a Spot rebalance recommendation or interruption.",
            labels=["notice"],
        )
        for notice in (Notice.REBALANCE, Notice.INTERRUPTION):
            announced.add_metric([notice.label], notices[notice])
        yield announced

    def collect_table(self) -> Iterator[GaugeMetricFamily]:
        """What the table says beyond MonitorS's own fleet: its bad rows now, and the controller's
        section. A snapshot per scrape is a lock and a byte copy; it never raises on the contents."""
        snap = self.fleet.table.snapshot()
        yield GaugeMetricFamily(
            "helix_table_bad_rows",
            "Occupied rows of the metrics table that fail validation (every reader leaves them out).",
            value=len(snap.row_problems),
        )
        ctl = snap.controller
        if not ctl.pid:
            return  # no controller has written its section yet: no value rather than a made-up 0
        gauges = (
            (
                "helix_controller_breaker_tripped",
                "1 while the controller's launch breaker is tripped.",
                1.0 if ctl.breaker else 0.0,
            ),
            (
                "helix_controller_breaker_failures",
                "Consecutive failed launches the controller counts.",
                ctl.breaker_failures,
            ),
            (
                "helix_controller_billable_instances",
                "Instances that may be billed, as the controller's launch gate counts them.",
                ctl.billable,
            ),
            (
                "helix_controller_max_instances",
                "The maximum number of instances the controller enforces.",
                ctl.max_instances,
            ),
            (
                "helix_controller_table_bad_rows",
                "Bad rows the controller's last snapshot of the table left out.",
                ctl.table_problems,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


def start_exporter(fleet: Fleet, cfg: Config, log: logging.Logger) -> str:
    """Serve /metrics on cfg.effective_metrics_listen in background threads, with TLS and basic
    auth when configured; return where and how (for the log), or raise ExporterError."""
    key = "HELIX_METRICS_PORT" if cfg.metrics_port is not None else "HELIX_METRICS_LISTEN"
    listen = cfg.effective_metrics_listen
    if cfg.metrics_port is not None:
        log.warning(
            "HELIX_METRICS_PORT is deprecated: it now means HELIX_METRICS_LISTEN=%s (loopback only); "
            "set HELIX_METRICS_LISTEN instead",
            listen,
        )
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet))
    latency = Histogram(
        "helix_poll_latency_seconds", "Latency of successful agent polls.", buckets=LATENCY_BUCKETS, registry=registry
    )

    def observe(values: list[float]) -> None:
        for value in values:
            latency.observe(value)

    endpoint = serve_registry(registry, cfg, log, listen=listen, key=key)
    fleet.latency_observer = observe
    return endpoint.description
