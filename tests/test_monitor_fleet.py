"""MonitorS's Fleet against a real table and real gRPC servers, in one process: rows it must stop
writing (freed by someone else, or dead for HELIX_FORGET_AFTER) are left alone, and a damaged
table is repaired when the fleet loads it."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc.aio
import numpy as np

from monitor_s.fleet import Fleet
from protos import helix_pb2, helix_pb2_grpc
from shared.config import load_config
from shared.rpc_security import Auth
from shared.table import InstanceRow, MetricsTable, State
from tests.procs import free_port


class Answering(helix_pb2_grpc.AgentServicer):
    async def GetMetrics(self, request, context):
        return helix_pb2.Metrics(
            cpu=0.5,
            vcpus=2,
            mem=0.25,
            app_live=True,
            app_detail="ok",
            sample_time=time.time(),
            instance_id=request.instance_id,
        )


def make_fleet(table_name: str) -> Fleet:
    cfg = load_config(
        {"HELIX_ENV_FILE": "", "HELIX_UNHEALTHY_AFTER": "1", "HELIX_POLL_INTERVAL": "1", "HELIX_INSECURE": "1"}
    )
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


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_load_repairs_the_table_and_resumes_the_good_rows(table_name):
    """Bytes no Register would have written: freed, one log line each; the good rows are resumed in
    their own slots (and polled there), and the table is whole again."""

    async def scenario():
        server = grpc.aio.server()
        helix_pb2_grpc.add_AgentServicer_to_server(Answering(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        table = MetricsTable.open_or_create(table_name, 16)
        for i in range(7):
            table.register(InstanceRow(f"i-{i}", f"127.0.0.1:{port}", State.HEALTHY, registered_at=100.0 + i))
        with table.writing() as w:
            w.rows["state"][1] = 9
            w.rows["cpu"][2] = np.nan
            w.rows["instance_id"][3] = b"bad id!"  # fits the table, but Register refuses it
            w.rows["address"][4] = b"nowhere"
            w.header["high_water"] = 2**32 - 1
            w.header["registered"] = 40
        fleet = make_fleet(table_name)
        log = Collect()
        fleet.log.addHandler(log)
        try:
            assert fleet.load() == 3
            assert {iid: e.slot for iid, e in fleet.entries.items()} == {"i-0": 0, "i-5": 5, "i-6": 6}
            assert log.lines == [
                "table repair: high_water 4294967295 is beyond the capacity 16: clamped to 16",
                "table repair: freed slot 1 ('i-1'): state 9, expected a state from 0 to 4 "
                "(free, registering, healthy, unhealthy, app-down)",
                "table repair: freed slot 2 ('i-2'): cpu nan, expected a number from 0 to 1.5",
                "table repair: registered 40 recounted as 5",
                "table repair: freed slot 3: instance_id: 'bad id!', expected 1 to 64 of letters, digits, '.', '_', "
                "':' or '-', starting with a letter or digit",
                "table repair: freed slot 4: address: 'nowhere', expected host:port with a port from 1 to 65535 "
                "(IPv6 as [addr]:port)",
            ]
            snap = fleet.table.snapshot()
            assert snap.problems == () and snap.header_ok and snap.monitor.registered == 3
            await fleet.cycle()
            rows = live(fleet.table)
            assert set(rows) == {"i-0", "i-5", "i-6"}
            assert all(r.state == State.HEALTHY and r.cpu == 0.5 for r in rows.values())
            assert rows["i-5"].registered_at == 105.0  # resumed, not registered anew
        finally:
            fleet.log.removeHandler(log)
            await fleet.close()
            fleet.table.close()
            table.close()
            await server.stop(0)

    asyncio.run(scenario())
