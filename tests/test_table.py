from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import psutil
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.table import (
    ADDRESS_BYTES,
    DETAIL_BYTES,
    ID_BYTES,
    ROW_DTYPE,
    InstanceRow,
    LayoutMismatch,
    MetricsTable,
    PollFailure,
    PollSample,
    State,
    TableFull,
    TableNotFound,
    lock_path,
)
from tests.procs import ROOT, base_env, wait_for
from tests.table_worker import ROWS, consistent_row

SHM = "/dev/shm"


def worker(procs, role: str, name: str, *args: str):
    return procs.python(role, ["-m", "tests.table_worker", role, name, *args])


def ready_line(proc) -> str:
    line = wait_for(
        lambda: (
            next((line for line in proc.output().splitlines() if line.startswith("ready")), None)
            or (None if proc.alive() else (_ for _ in ()).throw(AssertionError(proc.output())))
        ),
        60,
        f"{proc.name} to get ready",
    )
    assert line is not None  # wait_for returns only a truthy value
    return line


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM, name))


# -- lifecycle -----------------------------------------------------------------------------------


def test_attach_then_exit_never_unlinks(procs, table_name):
    table = MetricsTable.open_or_create(table_name, 8)
    table.register(InstanceRow("i-a", "10.0.0.1:1"))
    table.close()
    proc = worker(procs, "attach-exit", table_name)
    assert proc.wait(60) == 0, proc.output()
    assert "ready rows=1" in proc.output()
    assert "leaked shared_memory" not in proc.output()
    assert exists(table_name)
    with MetricsTable.attach(table_name) as again:
        assert [r.instance_id for r in again.snapshot().instances()] == ["i-a"]


def test_sigkilled_creator_keeps_the_registry(procs, table_name):
    creator = worker(procs, "create", table_name)
    tracker_pid = int(ready_line(creator).split("tracker=")[1])
    creator.signal(signal.SIGKILL)
    creator.wait(30)
    # Python's resource tracker notices its parent is gone and cleans up what it tracked, then
    # exits: once it is gone, whatever it would have unlinked is gone too.
    wait_for(
        lambda: not psutil.pid_exists(tracker_pid) or psutil.Process(tracker_pid).status() == "zombie",
        60,
        "the creator's resource tracker to finish",
    )
    assert exists(table_name)
    reader = worker(procs, "snapshot", table_name)
    assert ready_line(reader) == "ready i-survivor"


def test_reattach_keeps_rows_and_mismatch_needs_reset(table_name):
    with MetricsTable.open_or_create(table_name, 8) as table:
        table.register(InstanceRow("i-keep", "10.0.0.1:1"))
    with MetricsTable.open_or_create(table_name, 8) as table:
        assert [r.instance_id for r in table.snapshot().instances()] == ["i-keep"]
    with pytest.raises(LayoutMismatch, match="capacity 8, expected HELIX_SHM_CAPACITY=16; set HELIX_SHM_RESET=1"):
        MetricsTable.open_or_create(table_name, 16)
    assert exists(table_name)  # a refusal changes nothing
    with MetricsTable.open_or_create(table_name, 16, reset=True) as table:
        assert table.capacity == 16 and table.snapshot().instances() == []


def test_foreign_segment_is_a_layout_mismatch(table_name):
    from multiprocessing import resource_tracker, shared_memory

    shm = shared_memory.SharedMemory(name=table_name, create=True, size=4096)
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 - the tracker's own key
    shm.buf[:8] = b"NOTHELIX"
    shm.close()
    with pytest.raises(LayoutMismatch, match="magic"):
        MetricsTable.attach(table_name)
    with pytest.raises(LayoutMismatch, match="magic"):
        MetricsTable.open_or_create(table_name, 8)


def test_attach_while_monitor_s_is_still_making_the_table_waits_for_the_whole_table(table_name):
    """CI caught a controller that attached between MonitorS creating the segment and writing its
    magic, and exited on 'magic 0x0'. The creator holds the lock exclusive throughout: a reader
    blocks on it, then sees the finished table; and a half-made one left by a dead creator is
    'not there yet' to a reader and replaced by the next MonitorS, with no reset."""
    import threading

    from shared.table import _create_segment, _open_lock, segment_size

    lock_fd = _open_lock(table_name)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # MonitorS inside open_or_create
    try:
        _create_segment(table_name, "", segment_size(8)).close()  # made, header not yet written
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(_attach_or_error(table_name)), daemon=True)
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not got, f"attach did not wait for the creator: {got}"
        MetricsTable._open_or_create_locked(table_name, 8, False, lock_fd, "")  # noqa: SLF001 - the creator's own step
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    reader.join(30)
    (table,) = got
    assert isinstance(table, MetricsTable) and table.capacity == 8
    table.close()

    MetricsTable.remove(table_name)
    _create_segment(table_name, "", segment_size(8)).close()  # its creator died before the magic
    with pytest.raises(TableNotFound, match=f"table '{table_name}' is half-made"):
        MetricsTable.attach(table_name)
    with MetricsTable.open_or_create(table_name, 8) as table:
        assert table.capacity == 8 and table.snapshot().instances() == []


def _attach_or_error(name: str) -> object:
    try:
        return MetricsTable.attach(name)
    except Exception as exc:  # noqa: BLE001 - the test reports whatever attach did
        return exc


def test_attach_without_segment(table_name):
    with pytest.raises(TableNotFound, match=f"no metrics table '{table_name}'"):
        MetricsTable.attach(table_name)
    assert not exists(table_name)


def test_remove_unlinks_segment_and_lock(table_name):
    MetricsTable.open_or_create(table_name, 4).close()
    assert exists(table_name) and os.path.exists(lock_path(table_name))
    assert MetricsTable.remove(table_name) is True
    assert not exists(table_name) and not os.path.exists(lock_path(table_name))
    assert MetricsTable.remove(table_name) is False


# -- rows ------------------------------------------------------------------------------------------


def test_full_table_refuses_and_reregistering_reuses_the_slot(table_name):
    with MetricsTable.open_or_create(table_name, 2) as table:
        assert table.register(InstanceRow("i-1", "10.0.0.1:1")) == 0
        assert table.register(InstanceRow("i-2", "10.0.0.2:1")) == 1
        assert table.register(InstanceRow("i-1", "10.0.0.9:1")) == 0  # same id, same slot
        with pytest.raises(TableFull, match="all 2 rows in use"):
            table.register(InstanceRow("i-3", "10.0.0.3:1"))
        assert table.free("i-1") is True and table.free("i-1") is False
        assert table.register(InstanceRow("i-3", "10.0.0.3:1")) == 0  # the freed slot
        snap = table.snapshot()
        assert sorted(r.instance_id for r in snap.instances()) == ["i-2", "i-3"]
        assert snap.monitor.registered == 2


def test_seq_bumps_on_every_write(table_name):
    with MetricsTable.open_or_create(table_name, 4) as table:
        s0 = table.snapshot().seq
        table.register(InstanceRow("i-1", "a:1"))
        table.monitor_heartbeat(1.0, 1, 1.0)
        assert table.snapshot().seq == s0 + 2


text_ids = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=80)


@hsettings(max_examples=300, deadline=None)
@given(
    instance_id=text_ids,
    address=text_ids,
    cpu=st.floats(0, 1, width=32),
    failures=st.integers(0, 2**32 - 1),
    vcpus=st.integers(0, 65535),
    state=st.sampled_from(list(State)),
    net=st.floats(0, 1e12),
)
def test_row_roundtrip_or_clear_rejection(instance_id, address, cpu, failures, vcpus, state, net):
    row = InstanceRow(instance_id, address, state=state, cpu=cpu, failures=failures, vcpus=vcpus, net_rx=net)
    too_long = len(instance_id.encode()) > ID_BYTES or len(address.encode()) > ADDRESS_BYTES
    if too_long:
        with pytest.raises(ValueError, match=r"^(instance_id|address): .* bytes, expected at most (64|64)$"):
            row.to_record()
        return
    arr = np.zeros(1, dtype=ROW_DTYPE)
    arr[0] = row.to_record()
    assert InstanceRow.from_record(arr[0]) == row


@pytest.mark.parametrize("length", [ID_BYTES, ID_BYTES + 1])
def test_ids_at_and_beyond_the_limit(length, table_name):
    with MetricsTable.open_or_create(table_name, 4) as table:
        row = InstanceRow("i" * length, "10.0.0.1:1")
        if length <= ID_BYTES:
            table.register(row)
            assert table.snapshot().instances()[0].instance_id == "i" * length
        else:
            with pytest.raises(ValueError, match=f"instance_id: 'i+' is {length} bytes, expected at most {ID_BYTES}"):
                table.register(row)
            assert table.snapshot().instances() == []  # nothing half-written
    with pytest.raises(ValueError, match="contains a NUL"):
        InstanceRow("i-\x00", "a:1").to_record()
    with pytest.raises(ValueError, match="failures: -1 expected an integer"):
        InstanceRow("i-1", "a:1", failures=-1).to_record()


# -- MonitorS's poll writes ------------------------------------------------------------------------


def sample(slot: int, instance_id: str, **values) -> PollSample:
    base = PollSample(
        slot=slot,
        instance_id=instance_id,
        state=State.HEALTHY,
        app_down_polls=0,
        poll_latency=0.125,
        cpu=0.5,
        mem=0.25,
        disk=0.75,
        load1=1.5,
        load5=1.25,
        load15=1.0,
        net_rx=1234.5,
        net_tx=678.25,
        sample_time=99.5,
        vcpus=4,
        app_live=True,
        app_detail="ok",
    )
    return replace(base, **values)


def registered(table: MetricsTable, *ids: str) -> dict[str, InstanceRow]:
    rows = {}
    for n, iid in enumerate(ids):
        row = InstanceRow(
            iid,
            f"10.0.0.{n}:7",
            State.REGISTERING,
            zone="z1",
            agent_version="v1",
            registered_at=10.0 + n,
            failures=2,
            vcpus=2,
            app_port=8080,
        )
        table.register(row)
        rows[iid] = row
    return rows


def live_rows(table: MetricsTable) -> dict[str, InstanceRow]:
    return {r.instance_id: r for r in table.snapshot().instances()}


def test_write_samples_writes_the_poll_and_nothing_else(table_name):
    with MetricsTable.open_or_create(table_name, 8) as table:
        before = registered(table, "i-a", "i-b", "i-c")
        seq = table.snapshot().seq
        missed = table.write_samples(
            [
                sample(0, "i-a"),
                sample(
                    1,
                    "i-b",
                    state=State.APP_DOWN,
                    app_down_polls=3,
                    cpu=1.7,  # clipped to the column's 0..1
                    vcpus=70000,  # capped at what the column holds
                    app_live=False,
                    app_detail="connection refused " * 5,  # clipped with an ellipsis
                ),
            ],
            now=500.0,
        )
        assert missed == []
        assert table.snapshot().seq == seq + 1  # one lock hold for the batch
        written = dict(
            last_seen=500.0,
            last_metrics=500.0,
            failures=0,
            poll_latency=0.125,
            mem=0.25,
            disk=0.75,
            load1=1.5,
            load5=1.25,
            load15=1.0,
            net_rx=1234.5,
            net_tx=678.25,
            sample_time=99.5,
        )
        rows = live_rows(table)
        assert rows["i-a"] == replace(
            before["i-a"], **written, state=State.HEALTHY, cpu=0.5, vcpus=4, app_live=True, app_detail="ok"
        )
        detail = rows["i-b"].app_detail
        assert len(detail.encode()) <= DETAIL_BYTES and detail.startswith("connection refused") and detail[-1] == "…"
        assert rows["i-b"] == replace(
            before["i-b"],
            **written,
            state=State.APP_DOWN,
            app_down_polls=3,
            cpu=1.0,
            vcpus=65535,
            app_live=False,
            app_detail=detail,
        )
        assert rows["i-c"] == before["i-c"]  # not in the batch: untouched
        assert table.write_samples([], now=600.0) == [] and table.snapshot().seq == seq + 1  # no lock for nothing


def test_mark_failures_writes_the_count_and_state_only(table_name):
    with MetricsTable.open_or_create(table_name, 8) as table:
        registered(table, "i-a", "i-b")
        table.write_samples([sample(0, "i-a"), sample(1, "i-b")], now=500.0)
        polled = live_rows(table)
        seq = table.snapshot().seq
        assert (
            table.mark_failures([PollFailure(0, "i-a", State.UNHEALTHY, 3), PollFailure(1, "i-b", State.HEALTHY, 1)])
            == []
        )
        assert table.snapshot().seq == seq + 1
        rows = live_rows(table)
        assert rows["i-a"] == replace(polled["i-a"], state=State.UNHEALTHY, failures=3)  # metrics and last_seen kept
        assert rows["i-b"] == replace(polled["i-b"], failures=1)
        assert table.mark_failures([]) == [] and table.snapshot().seq == seq + 1


def test_poll_writes_leave_rows_that_are_no_longer_theirs_alone(table_name):
    """A row freed by someone else stays free (not resurrected half-empty), and a slot that holds
    another instance meanwhile keeps it; the writes report those positions and do the rest."""
    with MetricsTable.open_or_create(table_name, 8) as table:
        registered(table, "i-a", "i-b", "i-c")
        table.free("i-b")
        table.free("i-c")
        assert table.register(InstanceRow("i-d", "10.0.0.9:7", vcpus=1)) == 1  # i-b's old slot
        untouched = table.snapshot().rows[1:3].tobytes()

        missed = table.write_samples([sample(1, "i-b"), sample(0, "i-a"), sample(2, "i-c")], now=500.0)
        assert missed == [0, 2]
        assert table.snapshot().rows[1:3].tobytes() == untouched
        assert live_rows(table)["i-a"].state == State.HEALTHY

        missed = table.mark_failures(
            [
                PollFailure(0, "i-a", State.UNHEALTHY, 5),
                PollFailure(2, "i-c", State.UNHEALTHY, 5),
                PollFailure(1, "i-b", State.UNHEALTHY, 5),
            ]
        )
        assert missed == [1, 2]
        snap = table.snapshot()
        assert snap.rows[1:3].tobytes() == untouched and not snap.rows[2].tobytes().strip(b"\0")
        assert live_rows(table)["i-a"].failures == 5
        assert sorted(live_rows(table)) == ["i-a", "i-d"] and snap.monitor.registered == 2


def test_update_registration_refreshes_what_the_agent_reports(table_name):
    with MetricsTable.open_or_create(table_name, 8) as table:
        registered(table, "i-a", "i-b")
        table.write_samples([sample(0, "i-a", state=State.APP_DOWN, app_down_polls=2, app_live=False)], now=500.0)
        polled = live_rows(table)["i-a"]
        assert table.update_registration(0, "i-a", 8, "v2", "z2", 9090) is True
        assert live_rows(table)["i-a"] == replace(polled, vcpus=8, agent_version="v2", zone="z2", app_port=9090)

        before = table.snapshot()
        assert table.update_registration(1, "i-a", 8, "v2", "z2", 9090) is False  # slot 1 holds i-b
        table.free("i-b")
        freed = table.snapshot()
        assert table.update_registration(1, "i-b", 8, "v2", "z2", 9090) is False  # not brought back
        assert table.snapshot().rows.tobytes() == freed.rows.tobytes()
        assert before.rows[0].tobytes() == freed.rows[0].tobytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((70000, "v2", "z2", 80), "vcpus: 70000 expected an integer from 0 to 65535"),
        ((8, "v2", "z2", -1), "app_port: -1 expected an integer from 0 to 65535"),
        ((8, "v" * 17, "z2", 80), "agent_version: 'v+' is 17 bytes, expected at most 16"),
        ((8, "v2", "z" * 33, 80), "zone: 'z+' is 33 bytes, expected at most 32"),
        ((8, "v2", "z\x00", 80), "zone: .* contains a NUL character"),
    ],
)
def test_update_registration_refuses_what_does_not_fit(args, message, table_name):
    with MetricsTable.open_or_create(table_name, 8) as table:
        registered(table, "i-a")
        before = table.snapshot()
        with pytest.raises(ValueError, match=message):
            table.update_registration(0, "i-a", *args)
        after = table.snapshot()
        assert after.seq == before.seq and after.rows.tobytes() == before.rows.tobytes()


# -- concurrency across processes ----------------------------------------------------------------


def test_sigkilled_lock_holder_never_wedges_readers(procs, table_name):
    MetricsTable.open_or_create(table_name, 8).close()
    holder = worker(procs, "hold-lock", table_name)
    ready_line(holder)
    holder.signal(signal.SIGKILL)
    holder.wait(30)
    reader = worker(procs, "snapshot", table_name)
    assert ready_line(reader) == "ready "
    assert reader.wait(60) == 0


def test_concurrent_writer_and_readers_never_see_torn_rows(procs, table_name):
    with MetricsTable.open_or_create(table_name, ROWS) as table:
        for slot in range(ROWS):
            table.register(consistent_row(slot, slot))
    writer = worker(procs, "writer", table_name)
    ready_line(writer)
    readers = [worker(procs, "reader", table_name, "3") for _ in range(2)]
    for reader in readers:
        assert reader.wait(120) == 0, reader.output()
        line = reader.output().strip().splitlines()[-1]
        count, distinct = int(line.split()[1]), int(line.split()[3])
        assert count > 10 and distinct > 10, line  # really concurrent with the writer
    assert writer.alive()


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


def test_inspect_without_table_is_one_line_and_status_1(table_name):
    result = run_inspect("--name", table_name)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"inspect: no metrics table '{table_name}' in /dev/shm (is MonitorS running?)"
    ]
    assert not exists(table_name)


def test_inspect_json_and_text_change_nothing(table_name):
    with MetricsTable.open_or_create(table_name, 8) as table:
        table.register(
            InstanceRow(
                "i-0abc",
                "10.0.0.7:50051",
                State.HEALTHY,
                zone="us-east-1a",
                cpu=0.42,
                mem=0.5,
                app_live=True,
                last_seen=1.0,
            )
        )
        table.monitor_heartbeat(1.0, 1234, 1.0)
        before = table.snapshot()
    result = run_inspect("--name", table_name, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"monitor", "controller", "instances"}
    inst = data["instances"][0]
    for key in ("instance_id", "address", "state", "cpu", "mem", "last_seen_age_s", "failures", "app_live"):
        assert key in inst
    assert (inst["instance_id"], inst["state"], inst["cpu"], inst["app_live"]) == ("i-0abc", "healthy", 0.42, True)
    assert data["monitor"]["pid"] == 1234 and data["monitor"]["alive"] is False
    text = run_inspect("--name", table_name)
    assert text.returncode == 0 and "i-0abc" in text.stdout and "NOT RESPONDING" in text.stdout
    with MetricsTable.attach(table_name) as table:
        after = table.snapshot()
    assert after.seq == before.seq and bytes(after.rows.tobytes()) == bytes(before.rows.tobytes())


def test_an_agents_nan_or_huge_metrics_never_make_a_bad_row(table_name):
    """A NaN or an overflow from an agent would make the controller leave the row out (and later
    replace a healthy instance): the write path sanitises what agents report."""
    from shared.table import PollSample

    with MetricsTable.open_or_create(table_name, 4) as table:
        slot = table.register(InstanceRow("i-1", "127.0.0.1:1"))
        sample = PollSample(
            slot=slot,
            instance_id="i-1",
            state=State.HEALTHY,
            app_down_polls=0,
            poll_latency=float("nan"),
            cpu=float("nan"),
            mem=float("inf"),
            disk=-1.0,
            load1=1e300,
            load5=float("-inf"),
            load15=2.0,
            net_rx=float("nan"),
            net_tx=5.0,
            sample_time=float("inf"),
            vcpus=1,
            app_live=True,
            app_detail="",
        )
        table.write_samples([sample], 100.0)
        snap = table.snapshot()
        assert snap.problems == (), snap.problems
        (row,) = snap.instances()
        assert (row.cpu, row.mem, row.disk, row.load5, row.load15, row.net_rx) == (0.0, 0.0, 0.0, 0.0, 2.0, 0.0)
