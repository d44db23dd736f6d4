"""The HTTP side of a Prometheus endpoint, shared by MonitorS and ControllerASG: a small threaded
WSGI server of our own rather than prometheus_client's start_http_server, which has no basic auth
and does its TLS handshake in the accept loop (where one silent client stalls every scrape).

HELIX_METRICS_TLS_CERT/KEY turn on HTTPS and HELIX_METRICS_BASIC_AUTH_FILE basic auth, for every
endpoint that serves through here.
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
from collections.abc import Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from shared.config import Config, Invalid, parse_host_port

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

CONNECTION_TIMEOUT = 10.0  # seconds a metrics client may take for its TLS handshake, its request, each read


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


@dataclass
class Endpoint:
    """A metrics endpoint being served: where (`url`, `port`: the bound port, also when the
    address asked for port 0), how (`auth`), and `close()` to stop it."""

    url: str
    port: int
    auth: str  # "no auth" or "basic auth as 'user'"
    httpd: WSGIServer
    thread: threading.Thread

    @property
    def description(self) -> str:
        return f"{self.url} ({self.auth})"

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting scrapes and free the port (a scrape in flight finishes on its own thread)."""
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout)


def split_listen(listen: str) -> tuple[str, int]:
    """'host:port' as the settings take it, and also with port 0 (any free port: tests)."""
    try:
        return parse_host_port(listen)
    except Invalid:
        if not listen.endswith(":0"):
            raise
        host, _ = parse_host_port(listen[:-1] + "1")
        return host, 0


def serve_registry(registry: CollectorRegistry, cfg: Config, log: logging.Logger, *, listen: str, key: str) -> Endpoint:
    """Serve `registry` on /metrics at `listen` (the setting `key` names it) in background threads,
    with TLS and basic auth when configured; raise ExporterError (one line naming the setting)."""
    try:
        host, port = split_listen(listen)
    except Invalid as exc:
        raise ExporterError(f"{key}={listen}: expected {exc}") from None
    app = make_wsgi_app(registry)
    auth = "no auth"
    try:
        credentials = cfg.metrics_basic_auth()
    except (OSError, UnicodeDecodeError, Invalid) as exc:  # changed since the config check
        raise ExporterError(
            f"HELIX_METRICS_BASIC_AUTH_FILE={cfg.metrics_basic_auth_file}: expected a readable user:password file "
            f"({type(exc).__name__})"
        ) from None
    if credentials is not None:
        app = basic_auth(app, *credentials)
        auth = f"basic auth as {credentials[0]!r}"

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

    bound = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics:{bound}", daemon=True)
    thread.start()
    scheme = "https" if context is not None else "http"
    shown_host = f"[{host}]" if ":" in host else host
    if credentials is not None and context is None and not is_loopback(host):
        log.warning(
            "metrics: basic auth without TLS on %s: the password crosses the network in clear text "
            "(set HELIX_METRICS_TLS_CERT and HELIX_METRICS_TLS_KEY)",
            listen,
        )
    return Endpoint(f"{scheme}://{shown_host}:{bound}/metrics", bound, auth, httpd, thread)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
