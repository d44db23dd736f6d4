"""MonitorS's Fleet against a real table and real gRPC servers, in one process: rows it must stop
writing (freed by someone else, or dead for HELIX_FORGET_AFTER) are left alone."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc.aio

from monitor_s.fleet import Fleet
from protos import helix_pb2, helix_pb2_grpc
from shared.config import load_config
from shared.rpc_security import Auth
from shared.table import MetricsTable, State
from tests.procs import free_port


class Answering(helix_pb2_grpc.AgentServicer):
    async def GetMetrics(self, request, context):
        return helix_pb2.Metrics(cpu=0.5, vcpus=2, mem=0.25, app_live=True, app_detail="ok", sample_time=time.time(),
                                 instance_id=request.instance_id)


def make_fleet(table_name: str) -> Fleet:
    cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_UNHEALTHY_AFTER": "1", "HELIX_POLL_INTERVAL": "1",
                       "HELIX_INSECURE": "1"})
    return Fleet(cfg, MetricsTable.open_or_create(table_name, 16), Auth(""), logging.getLogger("test"))


def live(table: MetricsTable) -> dict:
    return {r.instance_id: r for r in table.snapshot().instances()}


def test_rows_freed_elsewhere_are_not_resurrected(table_name):
    async def scenario():
        server = grpc.aio.server()
        helix_pb2_grpc.add_AgentServicer_to_server(Answering(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        fleet = make_fleet(table_name)
        try:
            for iid in ("a", "b"):
                fleet.register(iid, f"127.0.0.1:{port}", 2, "t", "z", 0, time.time())
            fleet.register("dead", f"127.0.0.1:{free_port()}", 2, "t", "z", 0, time.time())
            await fleet.cycle()
            rows = live(fleet.table)
            assert rows["a"].state == rows["b"].state == State.HEALTHY and rows["dead"].state == State.UNHEALTHY

            slot_b, slot_dead = fleet.entries["b"].slot, fleet.entries["dead"].slot
            fleet.table.free("b")  # someone else frees rows MonitorS still polls
            fleet.table.free("dead")
            await fleet.cycle()
            rows = live(fleet.table)
            assert set(rows) == {"a"} and rows["a"].state == State.HEALTHY
            snap = fleet.table.snapshot().rows
            assert snap[slot_b]["state"] == State.FREE and snap[slot_dead]["state"] == State.FREE
            assert snap[slot_dead]["failures"] == 0
            assert set(fleet.entries) == {"a"}
        finally:
            await fleet.close()
            fleet.table.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_agents_silent_for_forget_after_are_forgotten(table_name):
    async def scenario():
        fleet = make_fleet(table_name)
        try:
            fleet.register("gone", f"127.0.0.1:{free_port()}", 2, "t", "z", 0, time.time())
            fleet.forget_after = 3600.0
            await fleet.cycle()
            assert live(fleet.table)["gone"].state == State.UNHEALTHY
            fleet.entries["gone"].failing_since -= 3600.0  # as if it had failed for an hour
            await fleet.cycle()
            assert live(fleet.table) == {} and fleet.entries == {}
        finally:
            await fleet.close()
            fleet.table.close()

    asyncio.run(scenario())
