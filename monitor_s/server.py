"""MonitorS's process: the Registry service, the poll loop and the table heartbeat."""

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

from monitor_s.fleet import Fleet
from monitor_s.validation import Refusal, check_caller, check_instance_id, check_reason, check_register
from protos import helix_pb2, helix_pb2_grpc
from shared import rpc_security
from shared.config import Config
from shared.table import MetricsTable, TableFull


class RegistryService(helix_pb2_grpc.RegistryServicer):
    def __init__(self, fleet: Fleet, cfg: Config, log: logging.Logger):
        self.fleet = fleet
        self.cfg = cfg
        self.log = log

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any], what: str, refusal: Refusal) -> NoReturn:
        self.log.warning("refused %s from %s: %s %s", what, context.peer(), refusal.code.name, refusal.message)
        await context.abort(refusal.code, refusal.message)

    async def Register(
        self,
        request: helix_pb2.RegisterRequest,
        context: grpc.aio.ServicerContext[helix_pb2.RegisterRequest, helix_pb2.RegisterResponse],
    ) -> helix_pb2.RegisterResponse:
        try:
            reg = check_register(request)
            check_caller("address", reg.host, context.peer(), self.cfg.trust_advertised)
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
            slot=entry.slot, poll_interval=self.cfg.poll_interval, server_time=time.time()
        )

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
        except Refusal as refusal:
            await self._refuse(context, "Deregister", refusal)
        found = self.fleet.deregister(instance_id) is not None
        self.log.info(
            "deregistered %s (%s)%s", instance_id, reason or "no reason given", "" if found else ": was not registered"
        )
        return helix_pb2.DeregisterResponse(found=found)


async def serve(cfg: Config, auth: rpc_security.Auth, table: MetricsTable, log: logging.Logger) -> int:
    fleet = Fleet(cfg, table, auth, log)
    resumed = fleet.load()
    started_at = time.time()
    pid = os.getpid()
    table.monitor_heartbeat(started_at, pid, cfg.poll_interval, 0.0, started_at=started_at)
    if cfg.metrics_port:
        from monitor_s.prom import start_exporter

        try:
            start_exporter(fleet, cfg.metrics_port)
        except OSError as exc:
            log.error(
                "cannot serve Prometheus metrics on port %d: %s (HELIX_METRICS_PORT)", cfg.metrics_port, exc.strerror
            )
            await fleet.close()
            return 1

    interceptors = [rpc_security.BearerAuthInterceptor(auth.token, log)] if auth.enabled else []
    server = grpc.aio.server(interceptors=interceptors, options=rpc_security.SERVER_OPTIONS)
    helix_pb2_grpc.add_RegistryServicer_to_server(RegistryService(fleet, cfg, log), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        rpc_security.add_port(server, cfg.monitor_listen, cfg)
    except RuntimeError as exc:
        log.error("%s (HELIX_MONITOR_LISTEN=%s)", exc, cfg.monitor_listen)
        await fleet.close()
        return 1
    await server.start()
    for name in ("", "helix.v1.Registry"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "MonitorS serving Registry on %s, table '%s' (%d rows, %d resumed), %s every %gs, "
        "unhealthy after %d failures, metrics port %s",
        cfg.monitor_listen,
        table.name,
        table.capacity,
        resumed,
        "polling" if cfg.poll_mode == "poll" else "streaming",
        cfg.poll_interval,
        cfg.unhealthy_after,
        cfg.metrics_port or "off",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        log.info("received %s: stopping (the table and its registry stay)", signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    next_tick = loop.time()
    stopping = asyncio.ensure_future(stop.wait())
    while not stop.is_set():
        cycle = asyncio.ensure_future(fleet.cycle())
        await asyncio.wait([cycle, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not cycle.done():  # stop mid-cycle: in-flight polls are abandoned, the rows keep their last values
            cycle.cancel()
            await asyncio.gather(cycle, return_exceptions=True)
            break
        cycle_seconds = cycle.result()
        table.monitor_heartbeat(time.time(), pid, cfg.poll_interval, cycle_seconds)
        if cycle_seconds > cfg.poll_interval:
            log.warning("poll cycle took %.3fs, longer than HELIX_POLL_INTERVAL=%g", cycle_seconds, cfg.poll_interval)
        next_tick += cfg.poll_interval
        now = loop.time()
        if next_tick < now:  # overran: start the next cycle now, don't try to catch up
            next_tick = now
        await asyncio.wait([stopping], timeout=next_tick - now)

    for name in ("", "helix.v1.Registry"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=0.5)
    await fleet.close()
    log.info("MonitorS stopped")
    return 0
