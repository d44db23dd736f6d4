"""Prometheus exposition for MonitorS: HELIX_METRICS_LISTEN (loopback by default; empty turns it
off), optionally HTTPS (HELIX_METRICS_TLS_CERT/KEY) and HTTP basic auth
(HELIX_METRICS_BASIC_AUTH_FILE). Served by a small threaded WSGI server of our own rather than
prometheus_client's start_http_server, which has no basic auth and does its TLS handshake in the
accept loop (where one silent client stalls every scrape).

Per-instance values are read from the in-memory fleet at scrape time by a custom collector, so
a poll cycle pays nothing for them and a deregistered instance's series simply disappear. The
same collector reads the table at scrape time for its bad rows and the controller's section
(breaker, billable and maximum instances), which ControllerASG writes and MonitorS only relays.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from monitor_s.fleet import Entry, Fleet
from shared.config import Config, Invalid, parse_host_port
from shared.table import Lifecycle, Notice, State

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONNECTION_TIMEOUT = 10.0  # seconds a metrics client may take for its TLS handshake, its request, each read


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


class ExporterError(Exception):
    """The metrics endpoint cannot be served; the message is one line naming the setting."""


def basic_auth(app: WSGIApplication, user: str, password: str) -> WSGIApplication:
    """`app` behind HTTP basic auth: a request without exactly these credentials gets 401.

    Both sides are hashed before the constant-time comparison, so neither the length nor the
    content of the expected credentials leaks through timing."""
    expected = hashlib.sha256(f"{user}:{password}".encode()).digest()

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        # Always compare, whatever the scheme, so a wrong scheme takes as long as a wrong password.
        matches = hmac.compare_digest(hashlib.sha256(given).digest(), expected)
        if scheme.lower() == "basic" and matches:
            return app(environ, start_response)
        body = b"401 Unauthorized: HTTP basic auth required\n"
        start_response(
            "401 Unauthorized",
            [
                ("WWW-Authenticate", 'Basic realm="helix metrics", charset="UTF-8"'),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    return guarded


class _Handler(WSGIRequestHandler):
    """One request per connection, no access log (a scrape every few seconds is not an event)."""

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in this connection's thread: see _Server.get_request
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # never wait on a scrape in flight at exit
    ssl_context: ssl.SSLContext | None = None
    log: logging.Logger = logging.getLogger(__name__)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(CONNECTION_TIMEOUT)  # a client that connects and says nothing lets go
        if self.ssl_context is not None:
            # No handshake in the accept loop: one silent client would stall every other scrape.
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A failed handshake (plain HTTP to the HTTPS port), a timeout, a reset: one debug line,
        # never a traceback on stderr.
        self.log.debug("metrics: connection from %s failed: %r", client_address[0], sys.exc_info()[1])


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
    host, port = parse_host_port(listen)
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet))
    latency = Histogram(
        "helix_poll_latency_seconds", "Latency of successful agent polls.", buckets=LATENCY_BUCKETS, registry=registry
    )

    app = make_wsgi_app(registry)
    how = ["no auth"]
    try:
        credentials = cfg.metrics_basic_auth()
    except (OSError, UnicodeDecodeError, Invalid) as exc:  # changed since the config check
        raise ExporterError(
            f"HELIX_METRICS_BASIC_AUTH_FILE={cfg.metrics_basic_auth_file}: expected a readable user:password file "
            f"({type(exc).__name__})"
        ) from None
    if credentials is not None:
        app = basic_auth(app, *credentials)
        how = [f"basic auth as {credentials[0]!r}"]

    context = None
    if cfg.metrics_tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cfg.metrics_tls_cert, cfg.metrics_tls_key, password=lambda: b"")
        except OSError as exc:  # ssl.SSLError is one
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            raise ExporterError(
                f"HELIX_METRICS_TLS_CERT={cfg.metrics_tls_cert}: expected a certificate and key that load ({reason})"
            ) from None

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class MetricsServer(_Server):  # the address family is read when the socket is made
            address_family = family

        MetricsServer.ssl_context = context
        MetricsServer.log = log
        httpd: WSGIServer = make_server(host, port, app, server_class=MetricsServer, handler_class=_Handler)
    except OSError as exc:
        raise ExporterError(f"{key}={listen}: cannot listen there ({exc.strerror or exc})") from None

    def observe(values: list[float]) -> None:
        for value in values:
            latency.observe(value)

    fleet.latency_observer = observe
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    scheme = "https" if context is not None else "http"
    shown_host = f"[{host}]" if ":" in host else host
    if credentials is not None and context is None and not _is_loopback(host):
        log.warning(
            "metrics: basic auth without TLS on %s: the password crosses the network in clear text "
            "(set HELIX_METRICS_TLS_CERT and HELIX_METRICS_TLS_KEY)",
            listen,
        )
    return f"{scheme}://{shown_host}:{port}/metrics ({', '.join(how)})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
