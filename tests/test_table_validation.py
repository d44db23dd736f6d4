"""A table no byte can wedge: bad bytes written straight into a real segment are left out and
described by every reader, never raised; MonitorS's repair frees them. (MonitorS repairing at
start in a real process is in test_monitor_e2e.py; Fleet.load in test_monitor_fleet.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.table import (
    HEADER_DTYPE,
    HEADER_SIZE,
    LAYOUT_VERSION,
    ROW_DTYPE,
    ControllerStatus,
    InstanceRow,
    MetricsTable,
    MonitorStatus,
    State,
    check_rows,
)
from tests.procs import ROOT, base_env

NOW = 1_700_000_000.0


def good_row(i: int, **changes) -> InstanceRow:
    row = InstanceRow(
        f"i-{i}",
        f"10.0.0.{i}:50051",
        State.HEALTHY,
        zone="z1",
        registered_at=NOW - 60,
        last_seen=NOW - 1,
        last_metrics=NOW - 1,
        sample_time=NOW - 1,
        net_rx=1e4,
        net_tx=2e4,
        cpu=0.5,
        mem=0.25,
        disk=0.1,
        load1=0.5,
        load5=0.4,
        load15=0.3,
        poll_latency=0.002,
        vcpus=2,
        app_live=True,
    )
    return dataclasses.replace(row, **changes)


def filled(table_name: str, n: int = 4, capacity: int = 8) -> MetricsTable:
    table = MetricsTable.open_or_create(table_name, capacity)
    for i in range(n):
        table.register(good_row(i))
    table.monitor_heartbeat(NOW, 4242, 1.0, 0.01, started_at=NOW - 100)
    return table


def ids(snap) -> list[str]:
    return [r.instance_id for r in snap.instances()]


# -- rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, line",
    [
        (
            "state",
            9,
            "slot 1 ('i-1'): state 9, expected a state from 0 to 4 (free, registering, healthy, unhealthy, app-down)",
        ),
        (
            "state",
            255,
            "slot 1 ('i-1'): state 255, expected a state from 0 to 4 (free, registering, healthy, unhealthy, app-down)",
        ),
        ("cpu", np.nan, "slot 1 ('i-1'): cpu nan, expected a number from 0 to 1.5"),
        ("cpu", 2.0, "slot 1 ('i-1'): cpu 2.0, expected a number from 0 to 1.5"),
        ("mem", -0.5, "slot 1 ('i-1'): mem -0.5, expected a number from 0 to 1.5"),
        ("disk", np.inf, "slot 1 ('i-1'): disk inf, expected a number from 0 to 1.5"),
        ("load15", -np.inf, "slot 1 ('i-1'): load15 -inf, expected a finite number >= 0"),
        ("poll_latency", np.nan, "slot 1 ('i-1'): poll_latency nan, expected a finite number >= 0"),
        ("registered_at", -1.0, "slot 1 ('i-1'): registered_at -1.0, expected a finite number >= 0"),
        ("last_seen", np.nan, "slot 1 ('i-1'): last_seen nan, expected a finite number >= 0"),
        ("last_metrics", np.inf, "slot 1 ('i-1'): last_metrics inf, expected a finite number >= 0"),
        ("sample_time", -1e300, "slot 1 ('i-1'): sample_time -1e+300, expected a finite number >= 0"),
        ("net_tx", np.nan, "slot 1 ('i-1'): net_tx nan, expected a finite number >= 0"),
        ("instance_id", b"", "slot 1: instance_id b'', expected a non-empty value"),
        ("instance_id", b"\x00i-1", "slot 1: instance_id b'\\x00i-1', expected no NUL byte inside"),
        ("instance_id", b"i-\x001", "slot 1: instance_id b'i-\\x001', expected no NUL byte inside"),
        ("instance_id", b"i-\xff", "slot 1: instance_id b'i-\\xff', expected valid UTF-8"),
        ("address", b"", "slot 1 ('i-1'): address b'', expected a non-empty value"),
        (
            "address",
            b"10.0.0.1:\x0050051",
            "slot 1 ('i-1'): address b'10.0.0.1:\\x0050051', expected no NUL byte inside",
        ),
        ("address", b"\xc3(:1", "slot 1 ('i-1'): address b'\\xc3(:1', expected valid UTF-8"),
    ],
)
def test_a_bad_row_is_left_out_and_described(table_name, field, value, line):
    with filled(table_name) as table:
        with table.writing() as w:  # straight into the segment, as a stray write would
            w.rows[field][1] = value
        snap = table.snapshot()  # never raises
        assert ids(snap) == ["i-0", "i-2", "i-3"]
        assert snap.problems == (line,)
        assert [(p.slot, p.field) for p in snap.row_problems] == [(1, field)]
        assert list(snap.live_slots) == [0, 2, 3] and len(snap.live) == 3 and len(snap.occupied) == 4
        assert snap.header_ok  # the header is fine: only the row is bad


def test_every_bad_row_is_named_once_by_its_first_bad_field(table_name):
    with filled(table_name, n=6) as table:
        with table.writing() as w:
            w.rows["state"][0] = 9
            w.rows["cpu"][0] = np.nan  # the same row: named once, by its state
            w.rows["mem"][2] = np.nan
            w.rows["load1"][2] = np.inf
            w.rows["last_seen"][5] = np.inf
        snap = table.snapshot()
        assert ids(snap) == ["i-1", "i-3", "i-4"]
        assert [p.split(":")[0] for p in snap.problems] == ["slot 0 ('i-0')", "slot 2 ('i-2')", "slot 5 ('i-5')"]
        assert "state 9" in snap.problems[0] and "mem nan" in snap.problems[1]
        assert all("\n" not in p for p in snap.problems)


def test_what_is_valid_stays(table_name):
    """Edges that are fine: -0.0, the bounds themselves, non-ASCII UTF-8 ids, garbage in free rows."""
    with filled(table_name, n=3) as table:
        table.register(good_row(7, instance_id="i-é-ü", cpu=1.5, mem=0.0, net_rx=0.0))
        table.free("i-2")
        with table.writing() as w:
            w.rows["last_seen"][0] = -0.0
            w.rows["load1"][1] = float(np.finfo(np.float32).max)
            w.rows["cpu"][2] = np.nan  # a free row: nobody reads it
            w.rows["instance_id"][2] = b"\xff\x00x"
        snap = table.snapshot()
        assert ids(snap) == ["i-0", "i-1", "i-é-ü"]
        assert snap.problems == () and snap.header_ok


def test_a_fresh_table_and_an_empty_one_have_no_problems(table_name):
    with MetricsTable.open_or_create(table_name, 4) as table:
        snap = table.snapshot()
        assert snap.instances() == [] and snap.problems == () and snap.header_ok
        assert not snap.monitor.alive(time.time())
        table.register(good_row(1))
        table.free("i-1")
        snap = table.snapshot()
        assert len(snap.rows) == 1 and snap.problems == () and snap.header_ok


# A plain per-row restatement of the rules, to hold the vectorised check (and its whole-array
# shortcut for clean tables) to.
BOUNDS = {
    name: 1.5 if name in ("cpu", "mem", "disk") else math.inf
    for name in ROW_DTYPE.names or ()
    if ROW_DTYPE[name].kind == "f"
}


def reference_good(rec) -> bool:
    if not 1 <= int(rec["state"]) <= 4:
        return False
    if int(rec["lifecycle"]) > 5 or int(rec["hook_result"]) > 4 or int(rec["notice"]) > 2:
        return False
    for name in ("instance_id", "address"):
        data = bytes(rec[name])
        if not data or b"\x00" in data:
            return False
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(math.isfinite(float(rec[name])) and 0 <= float(rec[name]) <= high for name, high in BOUNDS.items())


SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, -1.0, 1.5, 1.5000001, 2.0, 1e300]
patches = st.lists(
    st.one_of(
        st.tuples(st.just("byte"), st.integers(0, 7), st.integers(0, ROW_DTYPE.itemsize - 1), st.integers(0, 255)),
        st.tuples(st.just("float"), st.integers(0, 7), st.sampled_from(list(BOUNDS)), st.sampled_from(SPECIAL_FLOATS)),
    ),
    max_size=6,
)


@hsettings(max_examples=400, deadline=None)
@given(patches=patches, free=st.sets(st.integers(0, 7), max_size=3))
def test_check_rows_agrees_with_the_plain_rules_and_never_raises(patches, free):
    rows = np.zeros(8, dtype=ROW_DTYPE)
    for i in range(8):
        if i not in free:
            rows[i] = good_row(i).to_record()
    raw = rows.view(np.uint8).reshape(8, ROW_DTYPE.itemsize)
    for kind, slot, where, value in patches:
        if kind == "byte":
            raw[slot, where] = value
        else:
            with np.errstate(over="ignore"):  # 1e300 into a float32 column is inf, as intended
                rows[where][slot] = value
    check = check_rows(rows)
    occupied = [i for i in range(8) if rows["state"][i] != State.FREE]
    assert [i for i in range(8) if check.good[i]] == [i for i in occupied if reference_good(rows[i])]
    assert [p.slot for p in check.problems] == [i for i in occupied if not check.good[i]]
    for i in np.flatnonzero(check.good):
        InstanceRow.from_record(rows[i])  # a row that passed always decodes


# -- header ----------------------------------------------------------------------------------------


def test_huge_high_water_is_clamped_not_raised(table_name):
    with filled(table_name, n=3, capacity=8) as table:
        with table.writing() as w:
            w.header["high_water"] = 2**32 - 1
        snap = table.snapshot()
        assert len(snap.rows) == 8
        assert ids(snap) == ["i-0", "i-1", "i-2"]
        line = "header: high_water 4294967295, expected at most the capacity 8; read the first 8 rows"
        assert snap.problems == (line,) and line in snap.header_problems and not snap.header_ok


@pytest.mark.parametrize("heartbeat", [math.nan, math.inf, -math.inf, NOW + 1e6, 1e300])
def test_a_bad_heartbeat_is_not_alive(table_name, heartbeat):
    with filled(table_name) as table:
        assert table.snapshot().monitor.alive(NOW)
        with table.writing() as w:
            w.header["monitor_heartbeat"] = heartbeat
        snap = table.snapshot()
        assert snap.monitor.alive(NOW) is False
        assert MonitorStatus(1, 0, 0.0, heartbeat, 1.0, 0.0).alive(NOW) is False  # the value as such, too
        assert len(snap.instances()) == 4  # the rows are not the header's problem
    finite = math.isfinite(heartbeat) and heartbeat >= 0
    assert snap.header_ok is finite
    if not finite:
        assert snap.header_problems == (f"header: monitor_heartbeat {heartbeat!r}, expected a finite number >= 0",)
        assert snap.monitor.heartbeat == 0.0  # read as 'never written'


@pytest.mark.parametrize(
    "poll_interval, problem",
    [
        (math.nan, "header: poll_interval nan, expected a finite number >= 0"),
        (math.inf, "header: poll_interval inf, expected a finite number >= 0"),
        (-1.0, "header: poll_interval -1.0, expected a finite number >= 0"),
        (0.0, "header: poll_interval 0.0, expected a number > 0 once MonitorS writes heartbeats"),
    ],
)
def test_a_bad_poll_interval_is_not_alive(table_name, poll_interval, problem):
    with filled(table_name) as table:
        with table.writing() as w:
            w.header["poll_interval"] = poll_interval
        snap = table.snapshot()
        assert snap.monitor.alive(NOW) is False and snap.header_problems == (problem,)
    assert MonitorStatus(1, 0, 0.0, NOW, poll_interval, 0.0).alive(NOW) is False


def test_alive_window_both_ways():
    mon = MonitorStatus(1, 0, NOW - 100, NOW, 1.0, 0.0)
    assert mon.alive(NOW) and mon.alive(NOW + 3.0) and mon.alive(NOW - 0.5)
    assert not mon.alive(NOW + 3.1) and not mon.alive(NOW - 3.1)
    assert not MonitorStatus(1, 0, 0.0, 0.0, 1.0, 0.0).alive(NOW)


def test_header_floats_and_registered_are_checked(table_name):
    with filled(table_name) as table:
        with table.writing() as w:
            w.header["cycle_seconds"] = math.nan
            w.header["monitor_started_at"] = -5.0
            w.header["controller_heartbeat"] = math.inf
            w.header["registered"] = 99
        snap = table.snapshot()
        assert snap.header_problems == (
            "header: monitor_started_at -5.0, expected a finite number >= 0",
            "header: cycle_seconds nan, expected a finite number >= 0",
            "header: controller_heartbeat inf, expected a finite number >= 0",
            "header: registered 99, expected 4 (the occupied rows)",
        )
        assert snap.problems == ()  # nothing was left out
        assert (snap.monitor.cycle_seconds, snap.monitor.started_at, snap.controller.heartbeat) == (0.0, 0.0, 0.0)
        assert snap.monitor.alive(NOW)  # heartbeat and interval are fine


# -- the controller's new header fields ------------------------------------------------------------

V1_OFFSETS = {
    "magic": 0,
    "layout_version": 8,
    "capacity": 12,
    "row_size": 16,
    "high_water": 20,
    "seq": 24,
    "monitor_pid": 32,
    "registered": 36,
    "monitor_started_at": 40,
    "monitor_heartbeat": 48,
    "poll_interval": 56,
    "cycle_seconds": 64,
    "controller_pid": 72,
    "desired": 76,
    "in_service": 80,
    "pending": 84,
    "controller_heartbeat": 88,
    "decision_at": 96,
    "frozen": 104,
    "dry_run": 105,
    "decision_action": 106,
    "decision_reason": 122,
    "policy": 522,
}


def test_new_header_fields_come_from_the_reserved_tail():
    assert {name: HEADER_DTYPE.fields[name][1] for name in V1_OFFSETS} == V1_OFFSETS
    assert HEADER_DTYPE.itemsize == HEADER_SIZE == 1024
    assert LAYOUT_VERSION == 3  # 2: the roster region; 3: lifecycle and notice columns, drain requests
    new = ["breaker", "breaker_failures", "billable", "max_instances", "table_problems"]
    assert all(HEADER_DTYPE.fields[name][1] >= 538 for name in new)
    assert HEADER_DTYPE.names[-1] == "_reserved"


def test_controller_fields_roundtrip_and_default_to_zero(table_name):
    with filled(table_name) as table:
        assert table.snapshot().controller == ControllerStatus()  # a table from before them reads defaults
        status = ControllerStatus(
            pid=77,
            desired=3,
            heartbeat=NOW,
            decision_at=NOW,
            action="hold",
            policy="target",
            breaker=True,
            breaker_failures=3,
            billable=4,
            max_instances=10,
            table_problems=2,
        )
        table.write_controller(status)
        assert table.snapshot().controller == status
        table.write_controller(ControllerStatus(pid=77, breaker_failures=-1, billable=2**40, table_problems=2**40))
        got = table.snapshot().controller
        assert (got.breaker, got.breaker_failures, got.billable, got.table_problems) == (False, 0, 2**31 - 1, 2**32 - 1)


# -- repair (what MonitorS runs at start) ----------------------------------------------------------


def test_repair_frees_bad_rows_and_duplicates_and_recounts(table_name):
    with filled(table_name, n=6, capacity=8) as table:
        with table.writing() as w:
            w.rows["state"][1] = 9
            w.rows["cpu"][3] = np.nan
            w.rows[4] = good_row(0, address="10.9.9.9:1").to_record()  # a second row for i-0
            w.header["high_water"] = 2**32 - 1
            w.header["registered"] = 1
        before = table.snapshot().seq
        notes = table.repair()
        assert notes == [
            "high_water 4294967295 is beyond the capacity 8: clamped to 8",
            "freed slot 1 ('i-1'): state 9, expected a state from 0 to 4 "
            "(free, registering, healthy, unhealthy, app-down)",
            "freed slot 3 ('i-3'): cpu nan, expected a number from 0 to 1.5",
            "freed slot 4 ('i-0'): instance_id repeats slot 0's, expected each id once",
            "registered 1 recounted as 3",
        ]
        snap = table.snapshot()
        assert snap.seq == before + 1 and snap.problems == () and snap.header_ok
        assert ids(snap) == ["i-0", "i-2", "i-5"] and snap.monitor.registered == 3
        assert not snap.rows[[1, 3, 4]].tobytes().strip(b"\x00")  # freed rows are zeroed
        assert table.repair() == []  # nothing left to do
        assert table.register(good_row(9)) == 1  # a freed slot is reused


def test_repair_raises_a_mark_that_hides_occupied_rows(table_name):
    with filled(table_name, n=5, capacity=8) as table:
        with table.writing() as w:
            w.header["high_water"] = 2
        assert ids(table.snapshot()) == ["i-0", "i-1"]
        assert table.repair() == ["high_water 2 leaves out occupied rows up to slot 4: raised to 5"]
        assert ids(table.snapshot()) == ["i-0", "i-1", "i-2", "i-3", "i-4"]


# -- inspect ---------------------------------------------------------------------------------------


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.inspect", *args],
        env=base_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_inspect_shows_a_damaged_table_and_changes_nothing(table_name):
    with filled(table_name) as table:
        with table.writing() as w:
            w.rows["state"][1] = 9
            w.rows["cpu"][2] = np.nan
            w.header["high_water"] = 2**32 - 1
            w.header["monitor_heartbeat"] = math.nan
        before = table.snapshot()
    result = run_inspect("--name", table_name, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # strict JSON: no NaN sneaks through
    assert [i["instance_id"] for i in data["instances"]] == ["i-0", "i-3"]
    assert data["problems"] == [
        "header: high_water 4294967295, expected at most the capacity 8; read the first 8 rows",
        "header: monitor_heartbeat nan, expected a finite number >= 0",
        "slot 1 ('i-1'): state 9, expected a state from 0 to 4 (free, registering, healthy, unhealthy, app-down)",
        "slot 2 ('i-2'): cpu nan, expected a number from 0 to 1.5",
    ]
    assert data["monitor"]["alive"] is False and data["monitor"]["heartbeat_age_s"] is None
    text = run_inspect("--name", table_name)
    assert text.returncode == 0, text.stderr
    assert "table problems (4; bad rows are left out below):" in text.stdout
    assert "  slot 1 ('i-1'): state 9" in text.stdout and "NOT RESPONDING" in text.stdout
    with MetricsTable.attach(table_name) as table:
        after = table.snapshot()
    assert after.seq == before.seq and after.rows.tobytes() == before.rows.tobytes()
    assert int(after.header["high_water"]) == 2**32 - 1  # read-only: described, not repaired


def test_inspect_shows_the_breaker_and_billable(table_name):
    with filled(table_name) as table:
        table.write_controller(
            ControllerStatus(pid=77, heartbeat=time.time(), policy="target", billable=4, max_instances=10)
        )
        text = run_inspect("--name", table_name).stdout
        assert "billable 4 of max 10 instances" in text and "breaker" not in text
        table.write_controller(
            ControllerStatus(
                pid=77,
                heartbeat=time.time(),
                policy="target",
                breaker=True,
                breaker_failures=3,
                billable=4,
                max_instances=10,
                table_problems=1,
            )
        )
        text = run_inspect("--name", table_name).stdout
        assert "breaker: TRIPPED after 3 failed launches" in text
        assert "its last snapshot left out 1 bad row(s)" in text
        data = json.loads(run_inspect("--name", table_name, "--json").stdout)["controller"]
        assert (data["breaker"], data["billable"], data["max_instances"], data["table_problems"]) == (
            {"tripped": True, "failures": 3},
            4,
            10,
            1,
        )
