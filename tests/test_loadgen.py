"""The demo's load generator: curves, balancing, and a real run against real sample apps."""

from __future__ import annotations

import json
import os

import numpy as np
import psutil
import pytest

from deploy.local import loadgen
from deploy.local.loadgen import Backend, Balancer, CurveError, per_second, read_curve
from shared.table import InstanceRow, MetricsTable, State
from tests.procs import base_env, free_port, wait_for
from tests.test_sample_app import get

# -- curves ------------------------------------------------------------------------------------


def test_per_second_averages_and_scales_to_the_peak():
    assert per_second(np.array([1.0, 2, 3]), 6, 3).tolist() == [1, 1, 2, 2, 3, 3]
    # 7 steps over 2 s: each second averages 3.5 steps; the busier is scaled to the peak.
    rates = per_second(np.arange(1.0, 8), 2, 3)
    assert rates[1] == pytest.approx(3) and rates[0] == pytest.approx(3 * 8 / 20)


def test_shipped_nasa_day_is_one_day_and_quiet_busy_quiet():
    curve = loadgen.builtin_curve("nasa")
    assert len(curve) == 1440
    rates = per_second(curve, 60, 45)
    assert rates.max() == pytest.approx(45)
    assert rates[:5].mean() < 0.35 * 45 and rates[-5:].mean() < 0.35 * 45
    assert 15 <= int(np.argmax(rates)) <= 45


def test_read_curve_names_the_bad_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# mine\n1\n\n2.5  # busy\n0\n")
    assert read_curve(str(good)).tolist() == [1, 2.5, 0]
    bad = tmp_path / "bad.txt"
    bad.write_text("1\nlots\n")
    with pytest.raises(CurveError, match=r"bad.txt:2: 'lots': expected one non-negative number"):
        read_curve(str(bad))
    (tmp_path / "zero.txt").write_text("0\n0\n")
    with pytest.raises(CurveError, match="at least one positive"):
        read_curve(str(tmp_path / "zero.txt"))


# -- balancing ---------------------------------------------------------------------------------


def test_least_outstanding_with_round_robin_ties_and_ejection():
    now = [100.0]
    bal = Balancer(eject_seconds=3, clock=lambda: now[0])
    a, b, c = (Backend(x, "127.0.0.1", p) for x, p in (("a", 1), ("b", 2), ("c", 3)))
    assert bal.acquire() is None
    bal.update([a, b, c])
    first = [bal.acquire() for _ in range(3)]
    assert sorted(x.instance_id for x in first) == ["a", "b", "c"]  # ties: each once
    bal.release(b)
    assert bal.acquire() == b  # the only one with nothing in flight
    bal.release(a, refused=True)
    bal.release(c)
    assert bal.acquire() == c and bal.acquire(avoid=a) in (b, c)
    assert all(bal.acquire() != a for _ in range(5))  # ejected for 3 s
    now[0] += 3.5
    bal.update([a, b, c])
    assert bal.acquire() == a  # back, and the least loaded
    assert bal.acquire(avoid=a) != a


# -- the real thing ----------------------------------------------------------------------------


def test_healthy_backends_reads_the_table(table_name):
    with MetricsTable.open_or_create(table_name, 8) as table:
        table.register(InstanceRow("i-1", "127.0.0.1:50051", State.HEALTHY, app_port=8001))
        table.register(InstanceRow("i-2", "127.0.0.2:50051", State.UNHEALTHY, app_port=8002))
        table.register(InstanceRow("i-3", "127.0.0.3:50051", State.HEALTHY, app_port=0))
        table.register(InstanceRow("i-4", "[::1]:50051", State.HEALTHY, app_port=8004))
        table.register(InstanceRow("i-5", "127.0.0.5:50051", State.REGISTERING, app_port=8005))
        got = loadgen.healthy_backends(table.snapshot())
    assert got == [Backend("i-1", "127.0.0.1", 8001), Backend("i-4", "::1", 8004)]


def app_cpu(pid: int) -> float:
    return sum(psutil.Process(pid).cpu_times()[:2])


def test_spreads_load_over_healthy_instances_only(procs, table_name, tmp_path):
    """Two healthy apps share the load, an unhealthy one gets none, and a healthy row whose app is
    gone (refuses connections) costs no failed request: the retry goes elsewhere."""
    apps = {}
    for name in ("a", "b", "sick"):
        port = free_port()
        proc = procs.python(f"app-{name}", ["-m", "deploy.local.sample_app", "--port", str(port), "--work-ms", "5"])
        apps[name] = (proc, port)
    for name, (_, port) in apps.items():
        wait_for(lambda: get(port, "/health")[0] == 200, 30, f"app {name}")  # noqa: B023 - wait_for calls it before the loop moves on
    gone = free_port()
    with MetricsTable.open_or_create(table_name, 8) as table:
        table.register(InstanceRow("i-a", "127.0.0.1:1", State.HEALTHY, app_port=apps["a"][1]))
        table.register(InstanceRow("i-b", "127.0.0.1:1", State.HEALTHY, app_port=apps["b"][1]))
        table.register(InstanceRow("i-sick", "127.0.0.1:1", State.UNHEALTHY, app_port=apps["sick"][1]))
        table.register(InstanceRow("i-gone", "127.0.0.1:1", State.HEALTHY, app_port=gone))
        before = {name: app_cpu(proc.pid) for name, (proc, _) in apps.items()}
        stats = tmp_path / "stats.jsonl"
        gen = procs.python(
            "loadgen",
            [
                "-m",
                "deploy.local.loadgen",
                "--duration",
                "4",
                "--peak-rps",
                "40",
                "--curve",
                "spike",
                "--stats",
                str(stats),
            ],
            base_env(HELIX_SHM_NAME=table_name),
        )
        assert gen.wait(timeout=60) == 0, gen.output()
    lines = [json.loads(x) for x in stats.read_text().splitlines()]
    final = lines[-1]
    assert final["final"] and len(lines) == 5
    assert [x["t"] for x in lines[:-1]] == [1, 2, 3, 4]
    assert all(x["backends"] == 3 for x in lines[:-1])
    assert final["failed"] == 0, lines
    assert final["served"] == final["sent"] >= 40
    used = {name: app_cpu(proc.pid) - before[name] for name, (proc, _) in apps.items()}
    share = final["served"] * 0.005 / 2
    assert used["a"] > 0.4 * share and used["b"] > 0.4 * share, used
    assert used["sick"] < 0.1 * share, used


def test_no_instance_means_failed_requests_and_bad_trace_exits_2(procs, table_name, tmp_path):
    stats = tmp_path / "stats.jsonl"
    # No table at all yet: every request fails (a load balancer with no backend answers 503).
    gen = procs.python(
        "loadgen",
        ["-m", "deploy.local.loadgen", "--duration", "2", "--peak-rps", "5", "--stats", str(stats)],
        base_env(HELIX_SHM_NAME=table_name),
    )
    assert gen.wait(timeout=60) == 0, gen.output()
    final = json.loads(stats.read_text().splitlines()[-1])
    assert final["served"] == 0 and final["failed"] == final["sent"] > 0
    assert not os.path.exists(f"/dev/shm/{table_name}")
    bad = tmp_path / "bad.txt"
    bad.write_text("-3\n")
    gen = procs.python(
        "loadgen-bad", ["-m", "deploy.local.loadgen", "--trace", str(bad)], base_env(HELIX_SHM_NAME=table_name)
    )
    assert gen.wait(timeout=60) == 2
    assert "bad.txt:1: '-3': expected one non-negative number per line" in gen.output()
