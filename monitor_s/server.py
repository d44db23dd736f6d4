"""MonitorS's process: the Registry service, the poll loop (each cycle: poll, forget rows off the
roster, start the lifecycle hooks that are due) and the table heartbeat."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, NoReturn

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from monitor_s.admission import RateLimiter, admit
from monitor_s.credentials import CredentialIssuer
from monitor_s.fleet import Fleet
from monitor_s.identitydoc import DocumentVerifier
from monitor_s.validation import Refusal, check_caller, check_instance_id, check_reason, check_register, peer_ip
from protos import helix_pb2, helix_pb2_grpc
from shared import pki, rpc_security, sdnotify
from shared.config import Config
from shared.rpc_security import bearer_matches
from shared.table import MetricsTable, NotPrivate, Roster, TableFull

FLOOD_QUIET_SECONDS = 60.0


class RegistryService(helix_pb2_grpc.RegistryServicer):
    def __init__(self, fleet: Fleet, cfg: Config, log: logging.Logger, manager_ca: pki.ManagerCA | None = None):
        self.fleet = fleet
        self.manager_ca = manager_ca
        self.cfg = cfg
        self.log = log
        self.limiter = RateLimiter(cfg.register_rate)
        self._flooding: dict[str, float] = {}  # source -> when it was last refused for rate
        self._roster: Roster | None = None
        self.verifier = DocumentVerifier.from_file(cfg.identity_cert) if cfg.identity_cert else None

    def roster(self) -> Roster:
        """The roster, re-read only when the controller published a new one (a fleet registering at
        once costs one copy per publish, not one per agent)."""
        at = self.fleet.table.roster_published_at()
        if self._roster is None or self._roster.published_at != at:
            self._roster = self.fleet.table.roster()
        return self._roster

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any], what: str, refusal: Refusal) -> NoReturn:
        # Not on the roster yet is the normal race of a new instance with the controller's next publish.
        level = logging.INFO if refusal.code == grpc.StatusCode.UNAVAILABLE else logging.WARNING
        self.log.log(level, "refused %s from %s: %s %s", what, context.peer(), refusal.code.name, refusal.message)
        await context.abort(refusal.code, refusal.message)

    async def Register(
        self,
        request: helix_pb2.RegisterRequest,
        context: grpc.aio.ServicerContext[helix_pb2.RegisterRequest, helix_pb2.RegisterResponse],
    ) -> helix_pb2.RegisterResponse:
        source = peer_ip(context.peer()) or context.peer()
        now = time.monotonic()
        if not self.limiter.allow(source, now):
            # One line per flood: again only once the source has been refused nothing for a minute.
            last = self._flooding.get(source)
            if last is None or now - last > FLOOD_QUIET_SECONDS:
                self.log.warning(
                    "refusing registrations from %s: more than HELIX_REGISTER_RATE=%g per second (said once per flood)",
                    source,
                    self.cfg.register_rate,
                )
            self._flooding[source] = now
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"registrations from {source}: more than {self.cfg.register_rate:g} per second; retry later",
            )
        try:
            reg = check_register(request)
            check_caller("address", reg.host, context.peer(), self.cfg.trust_advertised)
            if self.cfg.roster == "required":
                admit(
                    reg,
                    request.instance_secret,
                    self.roster(),
                    request.identity_document,
                    request.identity_signature,
                    self.verifier,
                )
            certificate = self._certificate(request, reg.instance_id)
        except Refusal as refusal:
            await self._refuse(context, "Register", refusal)
        try:
            entry, new = self.fleet.register(
                reg.instance_id, reg.address, reg.vcpus, reg.agent_version, reg.zone, reg.app_port, time.time()
            )
        except TableFull as exc:
            self.log.error("refused Register of %s: %s", reg.instance_id, exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            await self._refuse(context, "Register", Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        if new:
            self.log.info(
                "registered %s at %s (zone %s, %d vCPUs, agent %s, slot %d)",
                reg.instance_id,
                reg.address,
                reg.zone or "-",
                reg.vcpus,
                reg.agent_version or "-",
                entry.slot,
            )
        else:
            self.log.info("%s registered again at %s (slot %d)", reg.instance_id, reg.address, entry.slot)
        return helix_pb2.RegisterResponse(
            slot=entry.slot,
            poll_interval=self.cfg.poll_interval,
            server_time=time.time(),
            credential=self.fleet.issuer.credential(entry.instance_id, entry.registered_at),
            certificate=certificate,
        )

    def _certificate(self, request: helix_pb2.RegisterRequest, instance_id: str) -> bytes:
        """Under the manager CA, the agent's certificate for the key in its request (signed only once
        the caller was admitted, and before its row is touched, so a bad request changes nothing)."""
        if self.manager_ca is None:
            return b""
        if not request.csr:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "csr: empty, expected a certificate signing request (MonitorS runs HELIX_TLS_MODE=ca)",
            )
        try:
            return self.manager_ca.issue_agent(request.csr, instance_id)
        except ValueError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    async def Deregister(
        self,
        request: helix_pb2.DeregisterRequest,
        context: grpc.aio.ServicerContext[helix_pb2.DeregisterRequest, helix_pb2.DeregisterResponse],
    ) -> helix_pb2.DeregisterResponse:
        try:
            instance_id = check_instance_id(request.instance_id)
            reason = check_reason(request.reason)
            entry = self.fleet.entries.get(instance_id)
            if entry is not None:
                host = entry.address.rpartition(":")[0].strip("[]")
                check_caller("instance_id", host, context.peer(), self.cfg.trust_advertised)
                # The agent's own credential (or, from a legacy agent, the fleet token) removes its row.
                accepted = [self.fleet.issuer.credential(entry.instance_id, entry.registered_at), self.fleet.auth.token]
                if (self.fleet.auth.enabled or self.cfg.roster == "required") and not bearer_matches(
                    context.invocation_metadata(), accepted
                ):
                    raise Refusal(
                        grpc.StatusCode.UNAUTHENTICATED,
                        f"instance_id: {instance_id!r}: expected its own "
                        "credential (from its Register answer) as the bearer",
                    )
        except Refusal as refusal:
            await self._refuse(context, "Deregister", refusal)
        found = self.fleet.deregister(instance_id) is not None
        self.log.info(
            "deregistered %s (%s)%s", instance_id, reason or "no reason given", "" if found else ": was not registered"
        )
        return helix_pb2.DeregisterResponse(found=found)


def forget_off_roster(fleet: Fleet, roster: Roster, off_since: dict[str, float], now: float, grace: float) -> None:
    """Free the rows of instances that left the roster (terminated, or never this group's) once they
    have been off it for `grace` seconds (a listing that lags for a moment frees nothing). Without
    this a SIGKILLed instance's row would be polled for HELIX_FORGET_AFTER."""
    if roster.published_at <= 0:
        return
    for instance_id in list(off_since):
        if instance_id in roster.entries or instance_id not in fleet.entries:
            del off_since[instance_id]
    for instance_id, entry in list(fleet.entries.items()):
        if instance_id in roster.entries:
            continue
        since = off_since.setdefault(instance_id, now)
        if now - since >= grace:
            del off_since[instance_id]
            fleet.forget(entry, f"no longer on the controller's roster (for {now - since:.0f}s)")


async def serve(
    cfg: Config,
    auth: rpc_security.Auth,
    table: MetricsTable,
    log: logging.Logger,
    manager_ca: pki.ManagerCA | None = None,
    early_signals: list[int] | None = None,
) -> int:
    try:
        issuer = CredentialIssuer.from_state_dir(cfg.state_dir)
    except (OSError, NotPrivate) as exc:
        log.error("cannot use the per-agent credential key under %s: %s (HELIX_STATE_DIR)", cfg.state_dir, exc)
        return 1
    fleet = Fleet(cfg, table, auth, log, issuer, manager_ca)
    resumed = fleet.load()
    started_at = time.time()
    pid = os.getpid()
    table.monitor_heartbeat(started_at, pid, cfg.poll_interval, 0.0, started_at=started_at)
    metrics = "off"
    if cfg.effective_metrics_listen:
        from monitor_s.prom import ExporterError, start_exporter

        try:
            metrics = start_exporter(fleet, cfg, log)
        except ExporterError as exc:
            log.error("cannot serve Prometheus metrics: %s", exc)
            await fleet.close()
            return 1

    # With the roster required, Register authenticates the caller itself (the roster, the caller's
    # address, the instance's secret) and Deregister checks the agent's own credential: agents need
    # no fleet token. Every other call (health) still needs the token.
    exempt = ("/helix.v1.Registry/Register", "/helix.v1.Registry/Deregister") if cfg.roster == "required" else ()
    # Authentication first (an unauthenticated caller learns nothing, not even that its bytes were
    # malformed), then the decode guard around the handler.
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if auth.enabled:
        interceptors.append(rpc_security.BearerAuthInterceptor(auth.token, log, exempt=exempt))
    interceptors.append(rpc_security.DecodeGuardInterceptor(log))
    server = grpc.aio.server(interceptors=interceptors, options=rpc_security.SERVER_OPTIONS)
    try:
        registry = RegistryService(fleet, cfg, log, manager_ca)
    except (OSError, ValueError) as exc:
        log.error("HELIX_IDENTITY_CERT=%s: expected a PEM certificate (%s)", cfg.identity_cert, exc)
        await fleet.close()
        return 1
    helix_pb2_grpc.add_RegistryServicer_to_server(registry, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        rpc_security.add_port(
            server,
            cfg.monitor_listen,
            cfg,
            rpc_security.manager_server_credentials(manager_ca) if manager_ca else None,
        )
    except RuntimeError as exc:
        log.error("%s (HELIX_MONITOR_LISTEN=%s)", exc, cfg.monitor_listen)
        await fleet.close()
        return 1
    await server.start()
    for name in ("", "helix.v1.Registry"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "MonitorS serving Registry on %s, table '%s' (%d rows, %d resumed), %s every %gs, "
        "unhealthy after %d failures, metrics %s, TLS %s",
        cfg.monitor_listen,
        table.name,
        table.capacity,
        resumed,
        "polling" if cfg.poll_mode == "poll" else "streaming",
        cfg.poll_interval,
        cfg.unhealthy_after,
        metrics,
        {"ca": f"under the manager CA ({cfg.effective_pki_dir})", "files": "from HELIX_TLS_CERT/CA", "off": "off"}[
            cfg.effective_tls_mode
        ],
    )
    # systemd (Type=notify): started once the Registry answers; the poll loop below pings the
    # watchdog after every cycle, so a cycle that hangs (a poll, the table's lock) stops the pings.
    sdnotify.ready(f"serving Registry on {cfg.monitor_listen}")
    watchdog = sdnotify.Watchdog.from_env()
    watchdog.cover(cfg.poll_interval, "the poll loop (HELIX_POLL_INTERVAL)")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        log.info("received %s: stopping (the table and its registry stay)", signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if early_signals:  # a stop asked for while starting up is honoured now, cleanly
        on_signal(early_signals[0])

    next_tick = loop.time()
    off_roster: dict[str, float] = {}  # registered id -> when it was first seen missing from the roster
    stopping = asyncio.ensure_future(stop.wait())
    while not stop.is_set():
        cycle = asyncio.ensure_future(fleet.cycle())
        await asyncio.wait([cycle, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not cycle.done():  # stop mid-cycle: in-flight polls are abandoned, the rows keep their last values
            cycle.cancel()
            await asyncio.gather(cycle, return_exceptions=True)
            break
        cycle_seconds = cycle.result()
        roster = registry.roster()  # re-read only when the controller published a new one
        if cfg.roster == "required":
            forget_off_roster(fleet, roster, off_roster, time.time(), max(10.0, 3 * cfg.poll_interval))
        # Launch hooks, and drains the roster asks for (with HELIX_ROSTER=off nobody publishes one:
        # launch hooks only).
        fleet.lifecycle.step(roster)
        table.monitor_heartbeat(time.time(), pid, cfg.poll_interval, cycle_seconds)
        watchdog.ping()
        if cycle_seconds > cfg.poll_interval:
            log.warning("poll cycle took %.3fs, longer than HELIX_POLL_INTERVAL=%g", cycle_seconds, cfg.poll_interval)
        next_tick += cfg.poll_interval
        now = loop.time()
        if next_tick < now:  # overran: start the next cycle now, don't try to catch up
            next_tick = now
        await asyncio.wait([stopping], timeout=next_tick - now)

    sdnotify.stopping("stopping")
    for name in ("", "helix.v1.Registry"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=0.5)
    await fleet.close()
    log.info("MonitorS stopped")
    return 0
