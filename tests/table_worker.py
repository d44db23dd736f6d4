"""Separate-interpreter roles for the table tests: `python -m tests.table_worker ROLE NAME [ARGS]`.

Each role prints one line `ready ...` once it is in position, so tests wait on that, not on time.
"""

from __future__ import annotations

import os
import sys
import time
from multiprocessing import resource_tracker

import numpy as np

from shared.table import ROW_DTYPE, InstanceRow, MetricsTable, State

ROWS = 64


def consistent_row(slot: int, k: int) -> InstanceRow:
    """Every numeric field derives from k, and k is in the id: a torn row breaks the invariant."""
    return InstanceRow(
        instance_id=f"i-{slot:04d}-{k:012d}",
        address=f"10.0.0.{slot % 250}:{1 + k % 60000}",
        state=State.HEALTHY,
        registered_at=k,
        last_seen=k + 1,
        last_metrics=k + 2,
        sample_time=k + 3,
        net_rx=k * 2.0,
        net_tx=k * 3.0,
        failures=k % 1000,
        cpu=(k % 1000) / 1000.0,
        vcpus=k % 64,
        load1=float(k % 4096),
    )


def check_row(rec) -> None:
    row = InstanceRow.from_record(rec)
    k = int(row.instance_id.rsplit("-", 1)[1])
    # Compare through the record so float32 columns round the same way on both sides.
    expected = InstanceRow.from_record(
        np.array([consistent_row(int(row.instance_id.split("-")[1]), k).to_record()], dtype=ROW_DTYPE)[0]
    )
    if row != expected:
        raise SystemExit(f"torn row: {row} != {expected}")


def main() -> None:
    role, name = sys.argv[1], sys.argv[2]
    if role == "create":  # create, register one row, then idle until killed
        table = MetricsTable.open_or_create(name, 16)
        table.register(InstanceRow("i-survivor", "10.0.0.1:50051", State.HEALTHY, cpu=0.25))
        # The test watches the tracker die (a private attribute: the stubs do not have it).
        tracker_pid = resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]  # noqa: SLF001
        print(f"ready tracker={tracker_pid}", flush=True)
        time.sleep(3600)
    elif role == "attach-exit":  # attach, read, exit normally
        table = MetricsTable.attach(name)
        print(f"ready rows={len(table.snapshot().live)}", flush=True)
        table.close()
    elif role == "hold-lock":  # take the write lock and die holding it
        table = MetricsTable.attach(name)
        with table.writing():
            print("ready locked", flush=True)
            time.sleep(3600)
    elif role == "writer":  # rewrite every row with a fresh k, forever
        table = MetricsTable.attach(name)
        k = 0
        print("ready writing", flush=True)
        while True:
            k += 1
            for slot in range(ROWS):
                with table.writing() as w:
                    w.rows[slot] = consistent_row(slot, k * ROWS + slot).to_record()
    elif role == "reader":  # check snapshots for SECONDS, print how many and how many distinct
        seconds = float(sys.argv[3])
        table = MetricsTable.attach(name)
        deadline = time.monotonic() + seconds
        count, seqs = 0, set()
        print("ready reading", flush=True)
        while time.monotonic() < deadline:
            snap = table.snapshot()
            for rec in snap.live:
                check_row(rec)
            seqs.add(snap.seq)
            count += 1
        print(f"checked {count} snapshots, {len(seqs)} distinct, pid {os.getpid()}", flush=True)
    elif role == "snapshot":  # one snapshot, print the live ids
        table = MetricsTable.attach(name)
        print("ready " + ",".join(sorted(r.instance_id for r in table.snapshot().instances())), flush=True)
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
