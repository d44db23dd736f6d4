from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.table import (
    ADDRESS_BYTES,
    ID_BYTES,
    ROW_DTYPE,
    InstanceRow,
    LayoutMismatch,
    MetricsTable,
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
