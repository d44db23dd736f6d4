"""MonitorC's process: the Agent gRPC server, the liveness probe loop and the registration loop.

Re-registration design. MonitorS polls the agent, so the agent cannot be told "I don't know you"
in an answer. Instead the agent watches its own inbox: every authenticated Heartbeat, GetMetrics
or WatchMetrics message counts as "polled". Register is idempotent on MonitorS (same id, same row,
`registered_at` kept), so when the agent has not been polled for SILENT_INTERVALS poll intervals
(at least MIN_SILENCE seconds) it simply registers again. That one rule covers MonitorS restarting
with a fresh table, MonitorS deregistering a live agent, and a lost registration, with no extra RPC.

Several managers. HELIX_MONITOR_ADDR may list several MonitorS (one per manager: the leader and its
warm standbys). The agent keeps one `Manager` per address, each with its own registration loop,
back-off, credential, poll clock and log lines naming it, so a manager that is down or slow never
delays registering with the others, and one that restarts is re-registered with on its own. Each
poll is attributed to its MonitorS by the per-agent credential it carries (each MonitorS derives its
own), which is how "not polled" is judged per manager, and how the rates a poll returns (CPU,
network: monitor_c/sampling.py) are computed over each poller's own interval instead of being reset
by the other poller. The agent accepts the credential of every MonitorS it registered with, and no
fleet token once it holds one. Under the manager CA (HELIX_TLS_MODE=ca) the managers share one CA
(the operator copies the PKI directory to each): every MonitorS signs this agent's one key for the
same name, so the certificate the agent serves (the latest one issued) verifies for all of them.

Lifecycle hooks (Prepare, Drain) and EC2 notices live in monitor_c/hooks.py and monitor_c/notices.py;
this module validates the calls and streams the hook's progress.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from monitor_c import AGENT_VERSION
from monitor_c.appmetrics import AppMetrics
from monitor_c.hooks import HookRunner, parse_command
from monitor_c.identity import Identity, resolve_identity
from monitor_c.notices import NoticeWatcher
from monitor_c.probe import AppProbe
from monitor_c.sampling import Sampler
from protos import helix_pb2, helix_pb2_grpc
from shared import pki, rpc_security
from shared.config import EXIT_BAD_CONFIG, Config

SILENT_INTERVALS = 5
MIN_SILENCE = 3.0
REGISTER_TIMEOUT = 3.0
DEREGISTER_TIMEOUT = 2.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 30.0
MIN_WATCH_INTERVAL, MAX_WATCH_INTERVAL = 0.05, 3600.0
MIN_HOOK_TIMEOUT, MAX_HOOK_TIMEOUT = 1.0, 7200.0
MAX_HOOK_REASON = 200  # bytes


class Manager:
    """What the agent keeps per MonitorS (one per HELIX_MONITOR_ADDR address)."""

    def __init__(self, addr: str):
        self.addr = addr
        # The per-agent credential this MonitorS handed out at registration ('' until then): what
        # its polls carry, and what tells them apart from the other managers' polls.
        self.credential = ""
        self.last_polled = time.monotonic()
        self.poll_interval = 1.0
        self.registered = False  # has answered a Register (the poll interval is its own)
        self.register_sent = False  # a Register went out: deregister from it when stopping
        self.channel: grpc.aio.Channel | None = None
        self.registry: helix_pb2_grpc.RegistryStub | None = None

    def __repr__(self) -> str:
        return f"Manager({self.addr!r})"


class AgentState:
    def __init__(self, identity: Identity, vcpus: int, sampler: Sampler, probe: AppProbe):
        self.identity = identity
        self.vcpus = vcpus
        self.sampler = sampler
        self.probe = probe
        self.started = time.monotonic()
        self.app_live, self.app_detail = True, "not probed yet"
        self.poll_interval = 1.0  # the shortest of the managers' intervals (probe cadence, app metrics wait)
        self.notices: NoticeWatcher | None = None  # on EC2 only
        self.app_metrics: AppMetrics | None = None  # with HELIX_APP_METRICS_URL only
        self.managers: list[Manager] = []

    def polled(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """Note an authenticated call (a poll, a hook call) as its MonitorS polling this agent;
        returns the poller's key for the per-poller rates: its address, or "" for a caller that
        carries no manager's credential (a MonitorS that handed out none, the fleet token before
        registration, an insecure agent), which counts for every manager without a credential."""
        now = time.monotonic()
        for manager in self.managers:
            if manager.credential and rpc_security.bearer_matches(metadata, [manager.credential]):
                manager.last_polled = now
                return manager.addr
        for manager in self.managers:
            if not manager.credential:
                manager.last_polled = now
        return ""

    async def sample_app(self, interval: float) -> None:
        """The app's request counter is read as part of a poll (monitor_c/appmetrics.py), before
        `metrics()` builds the answer; `interval` bounds how long the poll waits for it."""
        if self.app_metrics is not None:
            await self.app_metrics.sample(interval)

    def metrics(self, poller: str = "") -> helix_pb2.Metrics:
        s = self.sampler.sample(poller)
        notice = self.notices.current if self.notices else None
        return helix_pb2.Metrics(
            cpu=s.cpu,
            vcpus=self.vcpus,
            mem=s.mem,
            load1=s.load1,
            load5=s.load5,
            load15=s.load15,
            net_rx_bps=s.net_rx_bps,
            net_tx_bps=s.net_tx_bps,
            disk=s.disk,
            app_live=self.app_live,
            app_detail=self.app_detail[:40],
            sample_time=s.sample_time,
            instance_id=self.identity.instance_id,
            notice=f"NOTICE_{notice.notice.name}" if notice else "NOTICE_NONE",
            notice_at=notice.at if notice else 0.0,
            rps=self.app_metrics.rate if self.app_metrics else 0.0,
        )


class AgentService(helix_pb2_grpc.AgentServicer):
    def __init__(
        self, state: AgentState, hooks: dict[str, HookRunner] | None = None, log: logging.Logger | None = None
    ):
        self.state = state
        # "launch" (Prepare) and "terminate" (Drain); a kind missing here has no hook: CONTINUE.
        self.hooks = hooks if hooks is not None else {}
        self.log = log or logging.getLogger("monitor_c")

    async def _check_id(self, wanted: str, context: grpc.aio.ServicerContext) -> None:
        if wanted and wanted != self.state.identity.instance_id:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"instance_id: this agent is {self.state.identity.instance_id!r}, not {wanted[:64]!r}",
            )

    async def Heartbeat(
        self, request: helix_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> helix_pb2.HeartbeatResponse:
        st = self.state
        st.polled(context.invocation_metadata())
        return helix_pb2.HeartbeatResponse(
            agent_time=time.time(),
            uptime_seconds=time.monotonic() - st.started,
            agent_version=AGENT_VERSION,
            app_live=st.app_live,
            instance_id=st.identity.instance_id,
        )

    async def GetMetrics(
        self, request: helix_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> helix_pb2.Metrics:
        await self._check_id(request.instance_id, context)
        poller = self.state.polled(context.invocation_metadata())
        await self.state.sample_app(self.state.poll_interval)
        return self.state.metrics(poller)

    async def WatchMetrics(
        self, request: helix_pb2.WatchMetricsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[helix_pb2.Metrics]:
        await self._check_id(request.instance_id, context)
        interval = request.interval_seconds
        if not MIN_WATCH_INTERVAL <= interval <= MAX_WATCH_INTERVAL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"interval_seconds: {interval:g}, expected {MIN_WATCH_INTERVAL:g} to {MAX_WATCH_INTERVAL:g}",
            )
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        metadata = context.invocation_metadata()
        while True:
            poller = self.state.polled(metadata)  # each message pushed counts as a poll by its MonitorS
            await self.state.sample_app(interval)
            yield self.state.metrics(poller)
            next_at += interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (host stalled): skip, never burst
                next_at, delay = loop.time(), 0
            await asyncio.sleep(delay)

    async def Prepare(
        self, request: helix_pb2.HookRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[helix_pb2.HookProgress]:
        async for progress in self._hook("launch", "Prepare", request, context):
            yield progress

    async def Drain(
        self, request: helix_pb2.HookRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[helix_pb2.HookProgress]:
        async for progress in self._hook("terminate", "Drain", request, context):
            yield progress

    async def _hook(
        self, kind: str, rpc: str, request: helix_pb2.HookRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[helix_pb2.HookProgress]:
        await self._check_id(request.instance_id, context)
        timeout, reason = request.timeout_seconds, request.reason
        if not MIN_HOOK_TIMEOUT <= timeout <= MAX_HOOK_TIMEOUT:  # NaN fails too
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_seconds: {timeout:g}, expected {MIN_HOOK_TIMEOUT:g} to {MAX_HOOK_TIMEOUT:g} seconds",
            )
        if len(reason.encode()) > MAX_HOOK_REASON:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"reason: {len(reason.encode())} bytes, expected at most {MAX_HOOK_REASON}",
            )
        if not reason.isprintable():  # it goes into the hook's environment and the log
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"reason: {reason[:40]!r}, expected printable text (no control characters)",
            )
        st = self.state
        metadata = context.invocation_metadata()
        st.polled(metadata)
        launch = self.hooks.get("launch")
        if kind == "terminate" and launch is not None and launch.running:
            # Going away: preparing for service is moot, and two hooks must not fight over the app.
            self.log.info("Drain while the launch hook runs: stopping the launch hook first")
            await launch.close()
        runner = self.hooks.get(kind) or self._no_hook(kind)
        if not runner.start(timeout, reason):
            # A repeated call (its caller lost the stream, a restarted MonitorS, or another manager's
            # MonitorS asking too): no new run.
            final = runner.final
            self.log.info(
                "%s called again (reason: %r): %s",
                rpc,
                reason,
                f"following the {kind} hook, running for {runner.elapsed():.1f}s"
                if final is None
                else f"the {kind} hook already ended: {final.result.name} ({final.detail})",
            )
        async for progress in runner.follow(timeout, reason):
            st.polled(metadata)  # a caller streaming a hook is polling this agent
            yield helix_pb2.HookProgress(
                result=progress.result.name, elapsed_seconds=progress.elapsed, detail=progress.detail
            )

    def _no_hook(self, kind: str) -> HookRunner:
        runner = HookRunner(kind, "", self.state.identity.instance_id, self.log)
        self.hooks[kind] = runner
        return runner


class ManagersAuthInterceptor(grpc.aio.ServerInterceptor):
    """The agent's bearer check: a call must carry one of the bearers `accepted()` gives right now
    (every registered MonitorS's credential; before any, the fleet token). An empty list accepts
    every call (HELIX_INSECURE before registering). shared.rpc_security's interceptor takes one token;
    several managers need several."""

    def __init__(self, accepted: Callable[[], list[str]], log: logging.Logger):
        self._accepted = accepted
        self.log = log
        self.refused = 0
        self._last_log = 0.0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        accepted = self._accepted()
        if handler is None or not accepted:
            return handler
        if rpc_security.bearer_matches(handler_call_details.invocation_metadata, accepted):
            return handler
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log > 10.0:  # one line per 10 s, not one per call
            self._last_log = now
            self.log.warning(
                "refused unauthenticated call to %s (%d refused so far)", handler_call_details.method, self.refused
            )
        return _unauthenticated(handler)


def _unauthenticated(handler: Any) -> Any:
    """A handler answering UNAUTHENTICATED before the method runs (the agent serves unary and
    server-streaming methods only)."""
    message = "missing or wrong bearer token"

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream or handler.stream_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


class Agent:
    def __init__(
        self,
        cfg: Config,
        auth: rpc_security.Auth,
        log: logging.Logger,
        early_signals: list[int] | None = None,
        key: pki.AgentKey | None = None,
    ):
        self.early_signals = early_signals if early_signals is not None else []
        # HELIX_TLS_MODE=ca: the agent's key (in memory only), which MonitorS certifies at registration.
        self.key = key
        self.server_tls = rpc_security.AgentServerTLS(self.key) if self.key else None
        self.renew_at = math.inf
        self.cfg = cfg
        self.auth = auth
        self.log = log
        self.stop_event = asyncio.Event()
        # One per MonitorS (HELIX_MONITOR_ADDR lists one per manager), in the order given.
        self.managers = [Manager(addr) for addr in cfg.monitor_addrs]
        self._refuse_all = secrets.token_urlsafe(32)

    def accepted_bearers(self) -> list[str]:
        # The per-agent credentials the MonitorS handed out at registration: once there is one, the
        # only bearers this agent accepts (the fleet token, if any, no longer opens it).
        credentials = [m.credential for m in self.managers if m.credential]
        # A MonitorS that registered the agent without handing out a credential (one from before
        # credentials) polls with the fleet token: then that stays accepted beside the credentials.
        legacy = any(m.registered and not m.credential for m in self.managers)
        if credentials and not legacy:
            return credentials
        if self.auth.token:
            return [*credentials, self.auth.token]
        # No token: refuse everything (an impossible bearer) until a credential arrives, unless the
        # operator asked for an insecure agent.
        if self.cfg.insecure:
            return []
        return credentials or [self._refuse_all]

    async def run(self) -> int:
        cfg, log = self.cfg, self.log
        commands = {"launch": cfg.launch_hook, "terminate": cfg.terminate_hook}
        for kind, command in commands.items():
            try:
                parse_command(kind, command)
            except ValueError as exc:  # before binding: a bad hook is a bad configuration (exit 2)
                log.error("bad configuration: %s", exc)
                return EXIT_BAD_CONFIG
        app_metrics = None
        if cfg.app_metrics_url:
            try:
                app_metrics = AppMetrics(cfg.app_metrics_url, cfg.app_metrics_name, log)
            except ValueError as exc:  # a manager's `{port}` URL that reached an agent unfilled (exit 2)
                log.error("bad configuration: %s", exc)
                return EXIT_BAD_CONFIG
        interceptors = [
            ManagersAuthInterceptor(self.accepted_bearers, log),  # first: see monitor_s/server.py
            rpc_security.DecodeGuardInterceptor(log),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=rpc_security.SERVER_OPTIONS)
        try:
            port = rpc_security.add_port(
                server, cfg.agent_listen, cfg, self.server_tls.credentials if self.server_tls else None
            )
        except RuntimeError as exc:
            log.error("%s (HELIX_AGENT_LISTEN=%s)", exc, cfg.agent_listen)
            return 1
        identity = resolve_identity(cfg, port)
        allotment = cfg.vcpus or os.cpu_count() or 1
        vcpus = max(1, math.ceil(allotment))  # what registration reports: whole vCPUs
        self.state = AgentState(
            identity, vcpus, Sampler(cfg.cpu_source, allotment), AppProbe(cfg.app_check, cfg.app_check_timeout)
        )
        self.state.app_metrics = app_metrics
        self.state.managers = self.managers
        hooks = {kind: HookRunner(kind, command, identity.instance_id, log) for kind, command in commands.items()}
        # EC2's notices are only asked of the IMDS this agent's identity came from.
        if cfg.imds_url and identity.source == "imds":
            self.state.notices = NoticeWatcher(cfg.imds_url, log)
        helix_pb2_grpc.add_AgentServicer_to_server(AgentService(self.state, hooks, log), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await server.start()
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "agent %s (%s) serving on %s, advertising %s, cpu %s over %d vCPUs, app check %s, app metrics %s, "
            "hooks %s, EC2 notices %s, MonitorS %s, version %s",
            identity.instance_id,
            identity.source,
            cfg.agent_listen,
            identity.address,
            cfg.cpu_source,
            vcpus,
            cfg.app_check or "none",
            f"{cfg.app_metrics_name} at {cfg.app_metrics_url}" if app_metrics else "none",
            "+".join(kind for kind, runner in hooks.items() if runner.argv) or "none",
            "on" if self.state.notices else "off",
            " + ".join(m.addr for m in self.managers),
            AGENT_VERSION,
        )

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.early_signals:
            self._on_signal(self.early_signals[0])
        registry_tls = None
        if self.key:
            registry_tls = rpc_security.ChannelTLS(grpc.ssl_channel_credentials(self.key.ca_pem), pki.MONITOR_NAME)
        for manager in self.managers:
            manager.channel = rpc_security.open_channel(manager.addr, cfg, self.auth, tls=registry_tls)
            manager.registry = helix_pb2_grpc.RegistryStub(manager.channel)
        tasks = [asyncio.create_task(self._probe_loop())]
        # One registration loop per MonitorS: each with its own back-off, none waits for another.
        tasks += [asyncio.create_task(self._registration_loop(manager)) for manager in self.managers]
        if self.state.notices:
            tasks.append(asyncio.create_task(self.state.notices.run()))
        await self.stop_event.wait()

        # Shutdown: stop a running hook (its whole process group; its callers get ABANDON), then
        # deregister from every MonitorS at once (each bounded), then stop serving.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *(runner.close() for runner in hooks.values()), return_exceptions=True)
        if app_metrics is not None:
            await app_metrics.close()
        await asyncio.gather(*(self._deregister(m, "agent stopping") for m in self.managers if m.register_sent))
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=0.5)
        await asyncio.gather(*(m.channel.close() for m in self.managers if m.channel is not None))
        log.info("agent %s stopped", identity.instance_id)
        return 0

    def _on_signal(self, sig: int) -> None:
        self.log.info("received %s: deregistering and stopping", signal.Signals(sig).name)
        self.stop_event.set()

    async def _probe_loop(self) -> None:
        st = self.state
        while True:
            live, detail = await st.probe.check()
            if live != st.app_live:
                self.log.info("app %s (%s)", "live" if live else "NOT live", detail)
            st.app_live, st.app_detail = live, detail
            await asyncio.sleep(min(max(st.poll_interval, 0.2), 5.0))

    def _request(self) -> helix_pb2.RegisterRequest:
        ident = self.state.identity
        return helix_pb2.RegisterRequest(
            instance_id=ident.instance_id,
            address=ident.address,
            vcpus=self.state.vcpus,
            agent_version=AGENT_VERSION,
            labels=ident.labels,
            instance_secret=self.cfg.instance_secret,
            identity_document=ident.document,
            identity_signature=ident.signature,
            csr=self.key.csr_pem if self.key else b"",
        )

    async def _registration_loop(self, manager: Manager) -> None:
        st, log = self.state, self.log
        assert manager.registry is not None
        backoff = BACKOFF_FIRST
        reason = "start"
        while True:
            try:
                # Set before the call: a stop while Register is in flight must still deregister,
                # since MonitorS may have written the row already (Deregister of an unknown id is harmless).
                manager.register_sent = True
                resp = await manager.registry.Register(self._request(), timeout=REGISTER_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                level = (
                    logging.ERROR
                    if code
                    in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED,
                    )
                    else logging.WARNING
                )
                delay = backoff * random.uniform(0.5, 1.5)  # jitter: a fleet restarting together spreads out
                log.log(
                    level,
                    "register with %s failed: %s %s; retrying in %.1fs",
                    manager.addr,
                    code.name,
                    exc.details(),
                    delay,
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if self.key and not self._enrol(manager, resp.certificate):
                delay = backoff * random.uniform(0.5, 1.5)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_FIRST
            if resp.credential:
                manager.credential = resp.credential
            manager.poll_interval = resp.poll_interval or 1.0
            manager.registered = True
            st.poll_interval = min(m.poll_interval for m in self.managers if m.registered)
            manager.last_polled = time.monotonic()
            log.info(
                "registered with %s as %s at %s (slot %d, poll interval %gs, reason: %s)",
                manager.addr,
                st.identity.instance_id,
                st.identity.address,
                resp.slot,
                manager.poll_interval,
                reason,
            )
            silence = max(SILENT_INTERVALS * manager.poll_interval, MIN_SILENCE)
            while (quiet := time.monotonic() - manager.last_polled) < silence and time.time() < self.renew_at:
                await asyncio.sleep(min(silence - quiet, manager.poll_interval) + 0.01)
            if quiet < silence:
                # Any one MonitorS signs the renewal (they share the manager CA); the first loop to
                # get one moves renew_at on, and the others keep waiting.
                reason = "certificate renewal"
                log.info(
                    "certificate is two-thirds through its life: registering again with %s for a new one",
                    manager.addr,
                )
                continue
            reason = f"not polled by {manager.addr} for {quiet:.1f}s"
            log.warning("%s: that MonitorS may have lost this agent; registering again", reason)

    def _enrol(self, manager: Manager, certificate: bytes) -> bool:
        """Serve with the certificate Register returned, once it checks out (for this key, from the
        manager CA, for this instance); False (logged) when it does not. With several managers the
        latest certificate wins: any of them, from the one manager CA for the one key and name,
        verifies for every MonitorS."""
        assert self.key is not None and self.server_tls is not None
        if not certificate:
            self.log.error(
                "register with %s returned no certificate: is MonitorS running HELIX_TLS_MODE=ca? retrying",
                manager.addr,
            )
            return False
        try:
            expires_at = self.key.accept(certificate, self.state.identity.instance_id)
        except ValueError as exc:
            self.log.error("register with %s returned a bad %s; retrying", manager.addr, exc)
            return False
        self.server_tls.install(certificate)
        self.renew_at = pki.renew_at(time.time(), expires_at)
        return True

    async def _deregister(self, manager: Manager, reason: str) -> None:
        assert manager.registry is not None
        try:
            resp = await manager.registry.Deregister(
                helix_pb2.DeregisterRequest(instance_id=self.state.identity.instance_id, reason=reason),
                timeout=DEREGISTER_TIMEOUT,
                metadata=((rpc_security.AUTH_KEY, f"Bearer {manager.credential}"),) if manager.credential else None,
            )
            self.log.info("deregistered from %s (row %s)", manager.addr, "freed" if resp.found else "already gone")
        except grpc.aio.AioRpcError as exc:
            self.log.warning("deregister from %s failed: %s %s", manager.addr, exc.code().name, exc.details())


async def _set_health(servicer: health.HealthServicer | health.aio.HealthServicer, status: int) -> None:
    # The sync servicer's set() returns None, the aio one's a coroutine.
    result = servicer.set("", status)
    if asyncio.iscoroutine(result):
        await result
    result = servicer.set("helix.v1.Agent", status)
    if asyncio.iscoroutine(result):
        await result


__all__ = ["Agent", "AgentService", "AgentState", "Manager"]
