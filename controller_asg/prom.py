"""The controller's own Prometheus metrics, on HELIX_CONTROLLER_METRICS_LISTEN (served like
MonitorS's, by shared/promhttp.py: HELIX_METRICS_TLS_CERT/KEY and HELIX_METRICS_BASIC_AUTH_FILE
apply).

The controller reports its state once per step (`observe_status`); the status gauges are read at
scrape time from that last report, and left out until there is one (no made-up 0). Counters and
histograms are prometheus_client's, in a registry of the controller's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shared.config import Config
from shared.promhttp import Endpoint, ExporterError, serve_registry

if TYPE_CHECKING:
    from controller_asg.activity import Activity
    from controller_asg.events import WebhookSink
    from controller_asg.providers.base import Provider

# Every label value known in advance is exported from the start (0), so a dashboard's or an
# alert's series never appears out of nowhere.
PROCESSES = ("launch", "terminate", "replace-unhealthy", "scale-in", "scheduled", "refresh")
ACTION_KINDS = ("launch", "terminate", "replace", "launch-failed", "freeze", "resume")
PROVIDER_CALLS = {
    "list_instances": "list",
    "launch": "launch",
    "terminate": "terminate",
    "stop": "stop",
    "start": "start",
}
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class _Status:
    desired: int
    in_service: int
    pending: int
    draining: int
    frozen: bool
    breaker: bool
    min_: int
    max_: int
    suspended: frozenset[str]
    refresh_percent: float | None


class ControllerMetrics:
    """What the controller exports. Thread-safe: the HTTP threads only read."""

    def __init__(self, registry: CollectorRegistry | None = None, *, sink: WebhookSink | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.sink = sink  # the webhook's counters are read from it at scrape time (None: not exported)
        self._status: _Status | None = None
        self._processes: tuple[str, ...] = PROCESSES  # every process label ever shown, kept at 0 when resumed
        self.actions = Counter(
            "helix_controller_actions", "Activities recorded, by kind.", ["kind"], registry=self.registry
        )
        for kind in ACTION_KINDS:
            self.actions.labels(kind)
        self.step_seconds = Histogram(
            "helix_controller_step_seconds",
            "Duration of one controller step.",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.call_seconds = Histogram(
            "helix_controller_provider_call_seconds",
            "Duration of provider calls (failed ones included), by call.",
            ["call"],
            buckets=CALL_BUCKETS,
            registry=self.registry,
        )
        self.call_errors = Counter(
            "helix_controller_provider_errors", "Provider calls that raised, by call.", ["call"], registry=self.registry
        )
        for call in PROVIDER_CALLS.values():
            self.call_seconds.labels(call)
            self.call_errors.labels(call)
        self.registry.register(_StatusCollector(self))

    def observe_status(
        self,
        *,
        desired: int,
        in_service: int,
        pending: int,
        draining: int,
        frozen: bool,
        breaker: bool,
        min_: int,
        max_: int,
        suspended: Collection[str] = (),
        refresh_percent: float | None = None,
    ) -> None:
        """The state after a step (refresh_percent None: no instance refresh running)."""
        names = frozenset(suspended)
        new = tuple(sorted(names - set(self._processes)))
        if new:
            self._processes = self._processes + new
        self._status = _Status(
            desired, in_service, pending, draining, frozen, breaker, min_, max_, names, refresh_percent
        )

    def count_action(self, kind: str) -> None:
        self.actions.labels(kind).inc()

    def on_activity(self, activity: Activity) -> None:
        """For ActivityLog.add_listener: counts the activity by its action (a dry run's too: it is
        what the controller decided)."""
        self.count_action(activity.action)

    def observe_step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    @contextmanager
    def provider_call(self, name: str) -> Iterator[None]:
        """Times the call in the block; an exception counts as an error of `name` and goes on up."""
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.call_errors.labels(name).inc()
            raise
        finally:
            self.call_seconds.labels(name).observe(time.perf_counter() - started)

    def serve(self, cfg: Config, log: logging.Logger) -> Endpoint | None:
        """Serve /metrics on cfg.controller_metrics_listen; None when that is off, or (after one
        error line) when it cannot be served: the controller runs on without its metrics."""
        if not cfg.controller_metrics_listen:
            return None
        try:
            endpoint = serve_registry(
                self.registry,
                cfg,
                log,
                listen=cfg.controller_metrics_listen,
                key="HELIX_CONTROLLER_METRICS_LISTEN",
            )
        except ExporterError as exc:
            log.error("cannot serve the controller's Prometheus metrics, running on without them: %s", exc)
            return None
        log.info("controller metrics on %s", endpoint.description)
        return endpoint


class _StatusCollector:
    def __init__(self, metrics: ControllerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self.metrics._status  # noqa: SLF001 - this collector is part of ControllerMetrics
        if status is not None:
            gauges: tuple[tuple[str, str, float], ...] = (
                ("desired_instances", "Instances the controller wants in service.", status.desired),
                ("in_service_instances", "Instances in service (healthy, not draining).", status.in_service),
                ("pending_instances", "Instances launched and not in service yet.", status.pending),
                ("draining_instances", "Instances draining before they are terminated.", status.draining),
                (
                    "frozen",
                    "1 while the controller is frozen (MonitorS silent: only min/max enforced).",
                    float(status.frozen),
                ),
                ("breaker_tripped", "1 while the controller's launch breaker is tripped.", float(status.breaker)),
                ("min_instances", "The minimum number of instances in force.", status.min_),
                ("max_instances", "The maximum number of instances in force.", status.max_),
            )
            for name, doc, value in gauges:
                yield GaugeMetricFamily(f"helix_controller_{name}", doc, value=value)
            suspended = GaugeMetricFamily(
                "helix_controller_suspended_processes",
                "1 for each process suspended by the operator, 0 otherwise.",
                labels=["process"],
            )
            for process in self.metrics._processes:  # noqa: SLF001 - as above
                suspended.add_metric([process], 1.0 if process in status.suspended else 0.0)
            yield suspended
            if status.refresh_percent is not None:
                yield GaugeMetricFamily(
                    "helix_controller_refresh_percent_complete",
                    "Progress of the instance refresh running, 0 to 100 (absent when none runs).",
                    value=status.refresh_percent,
                )
        sink = self.metrics.sink
        if sink is not None:
            events = CounterMetricFamily(
                "helix_controller_webhook_events",
                "Webhook events delivered (sent) or given up on (dropped).",
                labels=["outcome"],
            )
            events.add_metric(["sent"], sink.sent)
            events.add_metric(["dropped"], sink.dropped)
            yield events
            yield CounterMetricFamily(
                "helix_controller_webhook_failed_attempts",
                "Webhook POSTs that failed (each retry counts).",
                value=sink.failed_attempts,
            )
            yield GaugeMetricFamily(
                "helix_controller_webhook_queued_events", "Webhook events waiting to be delivered.", value=sink.queued
            )


class TimedProvider:
    """A provider whose list_instances/launch/terminate/stop/start are timed into the metrics
    (`helix_controller_provider_call_seconds{call}`, errors in `helix_controller_provider_errors_total`);
    every other attribute is the wrapped provider's."""

    _inner: Provider
    _metrics: ControllerMetrics

    def __init__(self, provider: Provider, metrics: ControllerMetrics):
        self.__dict__["_inner"] = provider
        self.__dict__["_metrics"] = metrics

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def wrapped(self) -> Provider:
        return self._inner

    def _timed(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._metrics.provider_call(PROVIDER_CALLS[method]):
            return getattr(self._inner, method)(*args, **kwargs)

    def list_instances(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("list_instances", *args, **kwargs)

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("launch", *args, **kwargs)

    def terminate(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("terminate", *args, **kwargs)

    def stop(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("stop", *args, **kwargs)

    def start(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("start", *args, **kwargs)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._inner, attr, value)

    def __repr__(self) -> str:
        return f"TimedProvider({self._inner!r})"


def wrap_provider(provider: Provider, metrics: ControllerMetrics) -> Provider:
    """`provider` with its calls timed (see TimedProvider)."""
    return TimedProvider(provider, metrics)  # type: ignore[return-value]
