"""MonitorS's Fleet against a real table and real gRPC servers, in one process: rows it must stop
writing (freed by someone else, or dead for HELIX_FORGET_AFTER) are left alone, and a damaged
table is repaired when the fleet loads it."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
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


class Switchable(helix_pb2_grpc.AgentServicer):
    """Answers with the app live or down, or fails the call, as `mode` says."""

    def __init__(self):
        self.mode = "live"

    async def GetMetrics(self, request, context):
        if self.mode == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "failing for the test")
        return helix_pb2.Metrics(
            cpu=0.5,
            vcpus=2,
            mem=0.25,
            app_live=self.mode == "live",
            app_detail=self.mode,
            sample_time=time.time(),
            instance_id=request.instance_id,
        )


def make_fleet(table_name: str, unhealthy_after: int = 1) -> Fleet:
    cfg = load_config(
        {
            "HELIX_ENV_FILE": "",
            "HELIX_UNHEALTHY_AFTER": str(unhealthy_after),
            "HELIX_POLL_INTERVAL": "1",
            "HELIX_INSECURE": "1",
        }
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


def test_lost_rows_are_found_in_every_batch(table_name, monkeypatch):
    """Results written in several lock holds (BATCH_ROWS 4 here), answered and failed alike: exactly
    the entries whose rows someone else freed are forgotten, whichever batch they fell in, and every
    other row gets its own result."""
    monkeypatch.setattr("monitor_s.fleet.BATCH_ROWS", 4)

    async def scenario():
        fleet = make_fleet(table_name)
        try:
            for i in range(12):
                fleet.register(f"i-{i}", f"127.0.0.1:{free_port()}", 2, "t", "z", 0, time.time())
            freed = {"i-1", "i-6", "i-7", "i-9", "i-11"}
            for iid in freed:
                fleet.table.free(iid)
            entries = [fleet.entries[f"i-{i}"] for i in range(12)]
            answer = helix_pb2.Metrics(cpu=0.5, vcpus=2, mem=0.25, app_live=True, sample_time=time.time())
            fleet.write([(e, answer, 0.01) for e in entries[:6]] + [(e, "no answer", 0.0) for e in entries[6:]])
            assert set(fleet.entries) == {f"i-{i}" for i in range(12)} - freed
            rows = live(fleet.table)
            assert set(rows) == set(fleet.entries)
            for i in (0, 2, 3, 4, 5):
                assert (rows[f"i-{i}"].state, rows[f"i-{i}"].cpu, rows[f"i-{i}"].failures) == (State.HEALTHY, 0.5, 0)
            for i in (8, 10):
                assert (rows[f"i-{i}"].state, rows[f"i-{i}"].failures, rows[f"i-{i}"].last_seen) == (
                    State.UNHEALTHY,
                    1,
                    0.0,
                )
            snap = fleet.table.snapshot()
            assert snap.monitor.registered == 7 and len(snap.occupied) == 7  # nothing resurrected
        finally:
            await fleet.close()
            fleet.table.close()

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


async def serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    helix_pb2_grpc.add_AgentServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_rows_follow_the_state_machine_poll_by_poll(table_name):
    """Real polls of a real agent, HELIX_UNHEALTHY_AFTER=2: after every cycle the row in the table
    and the in-memory entry agree with monitor_s/rowstate.py's rules; a failed poll changes neither
    the row's metrics nor its last_seen."""
    R, H, U, D = State.REGISTERING, State.HEALTHY, State.UNHEALTHY, State.APP_DOWN
    steps = [
        ("fail", (R, 1, 0)),  # a new row that never answered stays REGISTERING below the threshold
        ("down", (D, 0, 1)),
        ("down", (D, 0, 2)),
        ("fail", (D, 1, 2)),
        ("fail", (U, 2, 2)),  # the threshold
        ("fail", (U, 3, 2)),
        ("down", (D, 0, 3)),  # the down count ran on through the failures
        ("live", (H, 0, 0)),
        ("fail", (H, 1, 0)),
    ]

    async def scenario():
        agent = Switchable()
        server, address = await serve(agent)
        fleet = make_fleet(table_name, unhealthy_after=2)
        try:
            fleet.register("i-a", address, 2, "t", "z", 0, time.time())
            previous = live(fleet.table)["i-a"]
            assert (previous.state, previous.failures, previous.app_down_polls) == (R, 0, 0)
            for mode, expected in steps:
                agent.mode = mode
                await fleet.cycle()
                row, entry = live(fleet.table)["i-a"], fleet.entries["i-a"]
                assert (row.state, row.failures, row.app_down_polls) == expected, (mode, row)
                assert (entry.state, entry.failures, entry.app_down_polls) == expected, (mode, entry)
                if mode == "fail":
                    assert (row.last_seen, row.app_detail, row.app_live) == (
                        previous.last_seen,
                        previous.app_detail,
                        previous.app_live,
                    )
                else:
                    assert row.last_seen > previous.last_seen and row.app_detail == mode
                    assert row.app_live == (mode == "live") and row.cpu == 0.5
                previous = row
        finally:
            await fleet.close()
            fleet.table.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_registering_again_refreshes_the_row_or_takes_one_again(table_name):
    """Same id, same address: the row keeps its slot, state and registered_at, and takes the new
    vCPUs, version, zone and app port. If someone freed the row meanwhile, the agent gets a row
    again (REGISTERING, its first registered_at) instead of a refresh written into a free slot."""

    async def scenario():
        server, address = await serve(Switchable())
        fleet = make_fleet(table_name)
        try:
            entry, new = fleet.register("i-a", address, 2, "v1", "z1", 0, 100.0)
            assert new
            await fleet.cycle()
            again, new = fleet.register("i-a", address, 4, "v2", "z2", 8080, 200.0)
            assert again is entry and not new
            row = live(fleet.table)["i-a"]
            assert (row.state, row.vcpus, row.agent_version, row.zone, row.app_port) == (
                State.HEALTHY,
                4,
                "v2",
                "z2",
                8080,
            )
            assert row.registered_at == 100.0 and entry.zone == "z2"

            fleet.table.free("i-a")
            third, new = fleet.register("i-a", address, 8, "v3", "z3", 9090, 300.0)
            assert not new and third is not entry and fleet.entries["i-a"] is third
            row = live(fleet.table)["i-a"]
            assert (row.state, row.vcpus, row.agent_version, row.zone, row.app_port, row.registered_at) == (
                State.REGISTERING,
                8,
                "v3",
                "z3",
                9090,
                100.0,
            )
            await fleet.cycle()
            assert live(fleet.table)["i-a"].state == State.HEALTHY and set(fleet.entries) == {"i-a"}
        finally:
            await fleet.close()
            fleet.table.close()
            await server.stop(0)

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
