"""Metrics-table figures: consistent snapshot of 1,024 and 10,000 rows, one-row update, lock pair.

Target (issue 2): a consistent 1,024-row snapshot under 20 µs median on a 2-core machine. For
comparison it also prints the two ways we did not choose: numpy's field-by-field copy of the
structured array, and the bare byte copy with no lock.
"""

from __future__ import annotations

import fcntl
import os
import statistics
import time
import uuid
from collections.abc import Callable

from shared.table import HEADER_SIZE, ROW_DTYPE, InstanceRow, MetricsTable, State


def median_us(fn: Callable[[], object], repeat: int = 2000) -> float:
    for _ in range(min(200, repeat)):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def fill(table: MetricsTable, rows: int) -> None:
    for i in range(rows):
        table.register(
            InstanceRow(
                f"i-{i:017x}",
                f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:50051",
                State.HEALTHY,
                cpu=0.5,
                mem=0.4,
                vcpus=2,
                app_live=True,
            )
        )


def main() -> None:
    print(f"row size {ROW_DTYPE.itemsize} bytes, header {HEADER_SIZE} bytes")
    print(f"{'figure':<52} {'median':>10}")
    for rows in (1024, 10_000):
        name = f"helix-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        table = MetricsTable.open_or_create(name, rows)
        try:
            bench_one(table, rows)
        finally:
            table.close()
            MetricsTable.remove(name)


def bench_one(table: MetricsTable, rows: int) -> None:
    """The figures for one table. Its views of the segment die with this call, before the table closes."""
    fill(table, rows)
    repeat = 5000 if rows <= 1024 else 1000
    print(f"{f'consistent snapshot, {rows} rows (lock + bytes copy)':<52} {median_us(table.snapshot, repeat):>8.1f} µs")
    live = table._rows  # noqa: SLF001 - comparison only
    buf = table._shm.buf  # noqa: SLF001
    assert buf is not None  # an open segment always has its buffer
    print(f"{f'  for comparison: numpy arr.copy(), {rows} rows':<52} {median_us(live.copy, repeat):>8.1f} µs")
    size = HEADER_SIZE + rows * ROW_DTYPE.itemsize
    print(
        f"{f'  for comparison: raw bytes copy, no lock, {rows} rows':<52} "
        f"{median_us(lambda: bytes(buf[:size]), repeat):>8.1f} µs"
    )
    if rows == 1024:
        record = InstanceRow("i-00000000000000001", "10.0.0.1:50051", State.HEALTHY, cpu=0.7).to_record()

        def update_one() -> None:
            with table.writing() as w:
                w.rows[1] = record

        def lock_pair() -> None:
            fcntl.flock(table._lock_fd, fcntl.LOCK_EX)  # noqa: SLF001
            fcntl.flock(table._lock_fd, fcntl.LOCK_UN)  # noqa: SLF001

        print(f"{'update one row (lock, write, seq bump, unlock)':<52} {median_us(update_one):>8.1f} µs")
        print(f"{'flock lock/unlock pair':<52} {median_us(lock_pair):>8.1f} µs")


if __name__ == "__main__":
    main()
