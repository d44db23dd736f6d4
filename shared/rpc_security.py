"""Bearer-token authentication and TLS for every Helix gRPC endpoint (MonitorC and MonitorS).

Every RPC, in both directions, carries `authorization: Bearer <token>`. Servers install
`BearerAuthInterceptor`, which compares the header in constant time and answers UNAUTHENTICATED
before the handler runs, so a refused call changes nothing. Clients either install
`BearerClientInterceptor` on their channel or, on hot paths (MonitorS polls thousands of agents
per second), pass `Auth.metadata` to each call directly, which costs nothing extra.

Without a token a process refuses to start (exit 2) unless HELIX_INSECURE=1, and then it says so
loudly. TLS (HELIX_TLS_MODE): `ca` runs everything under the manager CA (shared/pki.py: MonitorS
issues each agent its certificate at registration, mutual TLS on every poll; the default on EC2);
`files` uses HELIX_TLS_CERT/KEY (servers serve TLS, clients present that certificate) and
HELIX_TLS_CA (clients verify servers with it, servers require client certificates signed by it).
"""

from __future__ import annotations

import hmac
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from shared import pki
from shared.config import EXIT_BAD_CONFIG, Config

AUTH_KEY = "authorization"
# Requests in Helix are tiny; anything bigger than this is refused by gRPC before decoding.
MAX_MESSAGE_BYTES = 16 * 1024


@dataclass(frozen=True)
class Auth:
    """The resolved token ('' when HELIX_INSECURE=1 and none is set: no header sent or checked)."""

    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_KEY, f"Bearer {self.token}"),) if self.token else ()

    @property
    def enabled(self) -> bool:
        return bool(self.token)


def _token_problem(token: str) -> str | None:
    if not token:
        return None
    if len(token) < 8:
        return "at least 8 characters"
    if not all(33 <= ord(ch) <= 126 for ch in token):
        return "printable ASCII without spaces (it travels in an HTTP/2 header)"
    return None


def auth_from_config(cfg: Config, log: logging.Logger, *, prog: str, identity: bool = False) -> Auth:
    """The token this process uses, or exit 2 when there is none and HELIX_INSECURE is not set.
    `identity`: the process proves who it is another way (an agent with HELIX_INSTANCE_SECRET),
    so no token is fine."""
    try:
        token = cfg.resolved_token()
    except OSError as exc:  # the file vanished since the config check
        print(
            f"{prog}: bad configuration: HELIX_TOKEN_FILE={cfg.token_file}: expected a readable file ({exc.strerror})",
            file=sys.stderr,
        )
        sys.exit(EXIT_BAD_CONFIG)
    problem = _token_problem(token)
    if problem:
        key = "HELIX_TOKEN" if cfg.token else "HELIX_TOKEN_FILE"
        shown = f"<hidden, {len(token)} characters>" if cfg.token else cfg.token_file
        print(f"{prog}: bad configuration: {key}={shown}: expected a token of {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    if not token and not identity:
        if not cfg.insecure:
            print(
                f"{prog}: bad configuration: HELIX_TOKEN=: expected a bearer token (HELIX_TOKEN or HELIX_TOKEN_FILE), "
                "or HELIX_INSECURE=1 to run without one",
                file=sys.stderr,
            )
            sys.exit(EXIT_BAD_CONFIG)
        log.warning(
            "INSECURE: HELIX_INSECURE=1 and no token: every RPC is accepted unauthenticated. Never in production."
        )
    return Auth(token)


def check_bearer(metadata: Sequence[tuple[str, str | bytes]] | None, token: str) -> bool:
    """True when `metadata` carries `Bearer <token>` (constant-time comparison); an agent's call may
    carry its own credential beside the fleet token, so every `authorization` header is looked at."""
    if not token:
        return True
    return bearer_matches(metadata, [token])


def bearer_matches(metadata: Iterable[tuple[str, str | bytes]] | None, accepted: Sequence[str]) -> bool:
    """True when any `authorization` header in `metadata` is `Bearer <one of accepted>` (each compared
    in constant time; empty strings in `accepted` are ignored)."""
    wanted = [f"Bearer {a}".encode() for a in accepted if a]
    found = False
    for key, value in metadata or ():
        if key == AUTH_KEY:
            got = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
            for expected in wanted:
                found |= hmac.compare_digest(got, expected)
    return found


class _RefusalCount:
    """Counts refused calls and says so at most once per `every` seconds, not once per call."""

    def __init__(self, log: logging.Logger, every: float):
        self.log = log
        self.every = every
        self.count = 0
        self._last_log = 0.0

    def refused(self, message: str, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last_log > self.every:
            self._last_log = now
            self.log.warning(message + " (%d refused so far)", *args, self.count)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the right bearer token with UNAUTHENTICATED.

    `token` is the token, or a callable giving the one accepted right now (an agent accepts its
    own per-agent credential once it has one); an empty token accepts every call (HELIX_INSECURE).
    `exempt`: full method names whose handler authenticates the caller itself (MonitorS's
    Register, bound to the roster and the instance's secret)."""

    def __init__(self, token: str | Callable[[], str], log: logging.Logger, exempt: Sequence[str] = ()):
        self._token = token if callable(token) else (lambda: token)
        self._exempt = frozenset(exempt)
        self._refusals = _RefusalCount(log, every=10.0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        if check_bearer(handler_call_details.invocation_metadata, self._token()):
            return handler
        self._refusals.refused("refused unauthenticated call to %s", handler_call_details.method)
        return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    @property
    def refused(self) -> int:
        return self._refusals.count


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}

    async def unary(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    async def stream(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


class _Malformed:
    """What a request that is not its message decodes to (see DecodeGuardInterceptor)."""

    def __init__(self, error: str):
        self.error = error


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that are not the method's message get INVALID_ARGUMENT and one log line a minute.

    Without it gRPC answers UNKNOWN and logs a traceback for every such call: the deserializer
    raises before any handler runs. Here it returns a marker instead, and the call is refused."""

    def __init__(self, log: logging.Logger):
        self._refusals = _RefusalCount(log, every=60.0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.stream_unary or handler.stream_stream:
            return handler
        decode = handler.request_deserializer
        method = handler_call_details.method

        def safe(data: bytes) -> object:
            try:
                return decode(data)
            except Exception as exc:  # noqa: BLE001 - whatever the decoder says, the bytes are not the message
                return _Malformed(type(exc).__name__)

        async def refuse(request: _Malformed, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._refusals.refused("refused a malformed request to %s (%s)", method, request.error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method}")

        serialize = handler.response_serializer
        # grpc's stubs type handlers for the sync server; these are the aio server's coroutines.
        inner: Any = handler.unary_unary or handler.unary_stream
        if handler.unary_unary:

            async def unary(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> object:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=safe,
                response_serializer=serialize,
            )

        async def stream(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[object]:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            async for item in inner(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=safe,
            response_serializer=serialize,
        )


class _ClientAuth:
    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or ()) + list(self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
        )


class BearerUnaryUnaryInterceptor(_ClientAuth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryUnaryCall[Any, Any]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryUnaryCall[Any, Any]:
        return await continuation(self._details(client_call_details), request)


class BearerUnaryStreamInterceptor(_ClientAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryStreamCall[Any, Any]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryStreamCall[Any, Any]:
        return await continuation(self._details(client_call_details), request)


def client_interceptors(auth: Auth) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add the bearer header to every call on an aio channel."""
    if not auth.enabled:
        return []
    return [BearerUnaryUnaryInterceptor(auth.metadata), BearerUnaryStreamInterceptor(auth.metadata)]


# ---------------------------------------------------------------------------------------------
# TLS


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def server_credentials(cfg: Config) -> grpc.ServerCredentials | None:
    """HELIX_TLS_MODE=files: TLS server credentials from HELIX_TLS_CERT/KEY; client certificates
    required when HELIX_TLS_CA is set. None in the other modes (`ca` builds its own, below)."""
    if cfg.effective_tls_mode != "files" or not cfg.tls_cert:
        return None
    ca = _read(cfg.tls_ca) if cfg.tls_ca else None
    return grpc.ssl_server_credentials(
        [(_read(cfg.tls_key), _read(cfg.tls_cert))], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(cfg: Config) -> grpc.ChannelCredentials | None:
    """HELIX_TLS_MODE=files: TLS channel credentials (presenting HELIX_TLS_CERT for mTLS when set)."""
    if cfg.effective_tls_mode != "files":
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.tls_ca) if cfg.tls_ca else None,
        private_key=_read(cfg.tls_key) if cfg.tls_key else None,
        certificate_chain=_read(cfg.tls_cert) if cfg.tls_cert else None,
    )


@dataclass(frozen=True)
class ChannelTLS:
    """How to dial one peer under the manager CA: credentials and the name its certificate must carry
    (grpc's target-name override: the address says where, the name says who)."""

    credentials: grpc.ChannelCredentials
    server_name: str


def manager_server_credentials(ca: pki.ManagerCA) -> grpc.ServerCredentials:
    """MonitorS's Registry under the manager CA. No client certificate is asked for: an agent has
    none until Register gives it one; Register authenticates it by the roster and its identity."""
    return grpc.ssl_server_credentials([(ca.monitor_key_pem, ca.monitor_cert_pem)])


def manager_client_credentials(ca: pki.ManagerCA) -> grpc.ChannelCredentials:
    """MonitorS polling agents: verifies each agent against the CA and presents its own certificate."""
    return grpc.ssl_channel_credentials(ca.ca_pem, ca.monitor_key_pem, ca.monitor_cert_pem)


class AgentServerTLS:
    """An agent's serving credentials under the manager CA, swapped in place when Register returns a
    certificate (and again at each renewal) with no restart and no new port.

    Until then the agent serves a self-signed certificate that no one trusts, so no poll succeeds
    before enrolment. Clients must present a certificate the CA issued for client use: only
    MonitorS's has that usage (agent certificates are server-only, and BoringSSL enforces it)."""

    def __init__(self, key: pki.AgentKey):
        self._key = key
        self._pending: grpc.ServerCertificateConfiguration | None = None
        initial = grpc.ssl_server_certificate_configuration(
            [(key.key_pem, key.self_signed_pem)], root_certificates=key.ca_pem
        )
        # grpc's stubs say the fetcher returns a configuration; its docs: None keeps the current one.
        fetch: Any = self._fetch
        self.credentials = grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)

    def install(self, cert_pem: bytes) -> None:
        self._pending = grpc.ssl_server_certificate_configuration(
            [(self._key.key_pem, cert_pem)], root_certificates=self._key.ca_pem
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake; None keeps the current configuration.
        pending, self._pending = self._pending, None
        return pending


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second process on the same port must fail, not share it
]


def add_port(server: grpc.aio.Server, address: str, cfg: Config, creds: grpc.ServerCredentials | None = None) -> int:
    """Bind `address` with `creds`, or HELIX_TLS_MODE=files' TLS when configured, else plaintext;
    return the bound port (raises RuntimeError if it cannot bind)."""
    creds = creds or server_credentials(cfg)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"cannot listen on {address}")
    return port


def open_channel(
    target: str,
    cfg: Config,
    auth: Auth | None = None,
    options: Sequence[tuple] = (),
    tls: ChannelTLS | None = None,
) -> grpc.aio.Channel:
    """An aio channel to `target`: under the manager CA with `tls`, else HELIX_TLS_MODE=files' TLS
    when configured, else plaintext; with `auth`, every call carries the token."""
    interceptors = client_interceptors(auth) if auth else []
    creds = tls.credentials if tls else channel_credentials(cfg)
    opts = [("grpc.max_receive_message_length", 1024 * 1024), *options]
    if tls:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    if creds:
        return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors or None)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors or None)
