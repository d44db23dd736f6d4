"""The demo's load generator: curves, balancing, routing by lifecycle and drain, failure causes,
and real runs against real sample apps."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import psutil
import pytest

from deploy.local import loadgen
from deploy.local.loadgen import (
    DIED,
    NO_BACKEND,
    TERMINATED,
    Attribution,
    Backend,
    Balancer,
    CurveError,
    TableView,
    per_second,
    read_curve,
)
from shared.table import InstanceRow, Lifecycle, MetricsTable, RosterEntry, State
from tests.procs import base_env, free_port, wait_for
from tests.test_sample_app import get, inflight

IN_SERVICE = Lifecycle.IN_SERVICE

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


def test_a_backend_leaving_the_list_keeps_its_requests_until_they_end():
    """Draining: the requests already sent run to completion (and are released as usual); only
    new ones go elsewhere."""
    bal = Balancer()
    a, b = Backend("a", "127.0.0.1", 1), Backend("b", "127.0.0.1", 2)
    bal.update([a, b])
    held = [bal.acquire(), bal.acquire()]
    assert set(held) == {a, b}
    bal.update([b])  # a is draining
    assert bal.outstanding(a) == 1
    assert all(bal.acquire() == b for _ in range(3))
    bal.release(a)
    assert bal.outstanding(a) == 0 and a not in bal.backends


# -- routing: only rows in service, not asked to drain ----------------------------------------


def row(iid: str, state=State.HEALTHY, lifecycle=IN_SERVICE, port: int = 8000, **kw) -> InstanceRow:
    return InstanceRow(iid, "127.0.0.1:50051", state, app_port=port, lifecycle=lifecycle, **kw)


def test_routes_only_healthy_rows_in_service_and_not_asked_to_drain(table_name):
    with MetricsTable.open_or_create(table_name, 16) as table:
        table.register(InstanceRow("i-1", "127.0.0.1:50051", State.HEALTHY, app_port=8001, lifecycle=IN_SERVICE))
        table.register(InstanceRow("i-2", "127.0.0.2:50051", State.UNHEALTHY, app_port=8002, lifecycle=IN_SERVICE))
        table.register(InstanceRow("i-3", "127.0.0.3:50051", State.HEALTHY, app_port=0, lifecycle=IN_SERVICE))
        table.register(InstanceRow("i-4", "[::1]:50051", State.HEALTHY, app_port=8004, lifecycle=IN_SERVICE))
        table.register(InstanceRow("i-5", "127.0.0.5:50051", State.REGISTERING, app_port=8005))
        for iid, lifecycle in (
            ("i-6", Lifecycle.NONE),
            ("i-7", Lifecycle.PREPARING),
            ("i-8", Lifecycle.DRAINING),
            ("i-9", Lifecycle.DRAINED),
            ("i-10", Lifecycle.ABANDONED),
        ):
            table.register(InstanceRow(iid, "127.0.0.1:50051", State.HEALTHY, app_port=8000, lifecycle=lifecycle))
        table.register(InstanceRow("i-11", "127.0.0.1:50051", State.HEALTHY, app_port=8011, lifecycle=IN_SERVICE))
        table.register(InstanceRow("i-12", "127.0.0.1:50051", State.HEALTHY, app_port=8012, lifecycle=IN_SERVICE))
        reader = loadgen.TableReader(table_name)
        try:
            # No roster yet (no controller): the rows alone decide.
            got = reader.look().backends
            assert [b.instance_id for b in got] == ["i-1", "i-4", "i-11", "i-12"]
            assert got[1] == Backend("i-4", "::1", 8004)
            # The roster: i-11 asked to drain, i-12 not on it any more (terminated).
            on = ["i-1", "i-4", "i-11"]
            table.publish_roster(
                [RosterEntry(i, "127.0.0.1", drain_deadline=9e9 if i == "i-11" else 0.0) for i in on], 5.0
            )
            view = reader.look()
            assert [b.instance_id for b in view.backends] == ["i-1", "i-4"]
            assert view.drains == {"i-11": 9e9} and view.roster == frozenset(on)
        finally:
            reader.close()


# -- failure causes ----------------------------------------------------------------------------


def look(at: float, rows=(), drains=None, roster=None) -> TableView:
    return TableView(at, (), {r.instance_id: r for r in rows}, drains or {}, roster)


def test_a_failure_after_the_drain_began_is_the_terminate():
    attr = Attribution(drain_timeout=20)
    assert attr.observe(look(102.0, [row("a")], drains={"a": 121.0}, roster=frozenset({"a"}))) == []
    # The drain began at 121 - 20 = 101 (before the look that showed it): a failure at 101.5 is the
    # scale-in's, one at 100.5 is not.
    assert attr.broken("a", 101.5, {"n": 1}) == TERMINATED
    assert attr.broken("a", 100.5, {"n": 2}) is None
    # Also the row's own DRAINING time counts, and the earliest evidence wins.
    attr2 = Attribution(drain_timeout=0)
    attr2.observe(look(50.0, [row("b", lifecycle=Lifecycle.DRAINING, lifecycle_at=48.0)]))
    assert attr2.broken("b", 48.5, {}) == TERMINATED


def test_a_terminate_without_drain_is_told_by_the_row_leaving():
    """Drain off: the instance was in service, healthy, when its requests broke; its agent
    deregistered as it was terminated, so the next look has no row for it."""
    attr = Attribution(drain_timeout=0)
    attr.observe(look(10.0, [row("a"), row("b")]))
    assert attr.broken("a", 10.4, {"n": 1}) is None  # pending: nothing says why yet
    assert attr.pending() == 1
    assert attr.observe(look(11.0, [row("b")])) == [({"n": 1}, TERMINATED)]
    # Off the roster says the same.
    attr.observe(look(12.0, [row("b"), row("c")], roster=frozenset({"b", "c"})))
    assert attr.broken("c", 12.2, {}) is None
    assert attr.observe(look(13.0, [row("b"), row("c")], roster=frozenset({"b"}))) == [({}, TERMINATED)]


def test_a_crashed_app_is_a_death_even_when_the_replacement_drains_it_later():
    attr = Attribution(drain_timeout=20)
    attr.observe(look(10.0, [row("a")], roster=frozenset({"a"})))
    assert attr.broken("a", 10.2, {"n": 1}) is None
    # The agent lives and says the app is down; the controller later replaces it (a drain, then
    # the row leaves): none of that is why the request failed.
    assert attr.observe(look(11.0, [row("a", state=State.APP_DOWN)], roster=frozenset({"a"}))) == [({"n": 1}, DIED)]
    attr.observe(look(13.0, [row("a", state=State.APP_DOWN)], drains={"a": 33.0}, roster=frozenset({"a"})))
    assert attr.broken("a", 12.5, {"n": 2}) == DIED  # app down at the last look; drain began at 13
    attr.observe(look(14.0, []))
    assert attr.broken("a", 13.5, {"n": 3}) == TERMINATED  # after the drain began: the replacement's


def test_a_healthy_backend_that_drops_a_request_died_after_the_settle_time():
    attr = Attribution(drain_timeout=0, settle=3.0)
    attr.observe(look(10.0, [row("a")]))
    assert attr.broken("a", 10.5, {"n": 1}) is None
    assert attr.observe(look(12.0, [row("a")])) == []
    assert attr.observe(look(13.5, [row("a")])) == [({"n": 1}, DIED)]
    assert attr.broken("a", 14.0, {"n": 2}) is None
    assert attr.flush() == [({"n": 2}, DIED)] and attr.pending() == 0


# -- the real thing ----------------------------------------------------------------------------


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
        table.register(row("i-a", port=apps["a"][1]))
        table.register(row("i-b", port=apps["b"][1]))
        table.register(row("i-sick", State.UNHEALTHY, port=apps["sick"][1]))
        table.register(row("i-gone", port=gone))
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
    assert final["failed"] == 0 and final["causes"] == {}, lines
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
    assert final["causes"] == {NO_BACKEND: final["failed"]}
    assert not os.path.exists(f"/dev/shm/{table_name}")
    bad = tmp_path / "bad.txt"
    bad.write_text("-3\n")
    gen = procs.python(
        "loadgen-bad", ["-m", "deploy.local.loadgen", "--trace", str(bad)], base_env(HELIX_SHM_NAME=table_name)
    )
    assert gen.wait(timeout=60) == 2
    assert "bad.txt:1: '-3': expected one non-negative number per line" in gen.output()


def test_sends_nothing_to_instances_draining_preparing_or_asked_to_drain(procs, table_name, tmp_path):
    """The roster's drain request and the row's lifecycle both keep requests away, in the real
    process: only the one app in service and not asked to drain gets any."""
    apps = {}
    for name in ("serving", "asked", "draining", "preparing"):
        port = free_port()
        procs.python(f"app-{name}", ["-m", "deploy.local.sample_app", "--port", str(port), "--work-ms", "1"])
        apps[name] = port
    for name, port in apps.items():
        wait_for(lambda: get(port, "/health")[0] == 200, 30, f"app {name}")  # noqa: B023 - called before the loop moves on
    with MetricsTable.open_or_create(table_name, 8) as table:
        table.register(row("i-serving", port=apps["serving"]))
        table.register(row("i-asked", port=apps["asked"]))
        table.register(row("i-draining", lifecycle=Lifecycle.DRAINING, port=apps["draining"]))
        table.register(row("i-preparing", lifecycle=Lifecycle.PREPARING, port=apps["preparing"]))
        ids = ["i-serving", "i-asked", "i-draining", "i-preparing"]
        table.publish_roster(
            [RosterEntry(i, "127.0.0.1", drain_deadline=9e9 if i == "i-asked" else 0.0) for i in ids], 1.0
        )
        stats = tmp_path / "stats.jsonl"
        gen = procs.python(
            "loadgen",
            [
                "-m",
                "deploy.local.loadgen",
                "--duration",
                "3",
                "--peak-rps",
                "20",
                "--curve",
                "spike",
                "--stats",
                str(stats),
            ],
            base_env(HELIX_SHM_NAME=table_name),
        )
        assert gen.wait(timeout=60) == 0, gen.output()
    final = json.loads(stats.read_text().splitlines()[-1])
    assert final["failed"] == 0 and final["served"] > 0, final
    assert inflight(apps["serving"])["last_request_at"] > 0
    for name in ("asked", "draining", "preparing"):
        assert inflight(apps[name])["last_request_at"] == 0, f"{name} got requests"


@pytest.mark.parametrize("terminated", [True, False], ids=["terminated", "died"])
def test_requests_broken_by_a_backend_are_attributed(procs, table_name, tmp_path, terminated):
    """An app killed with requests in flight breaks them. If its row then leaves the table (a
    terminate: the agent deregisters) they are `backend-terminated`; if the row stays and says
    the app is down (a crash) they are `backend-died`. Requests refused after the kill are retried
    on the other instance and served."""
    victim_port, other_port = free_port(), free_port()
    victim = procs.python(
        "app-victim", ["-m", "deploy.local.sample_app", "--port", str(victim_port), "--work-ms", "100"]
    )
    procs.python("app-other", ["-m", "deploy.local.sample_app", "--port", str(other_port), "--work-ms", "100"])
    for port in (victim_port, other_port):
        wait_for(lambda: get(port, "/health")[0] == 200, 30, "the apps")  # noqa: B023 - called before the loop moves on
    stats, requests = tmp_path / "stats.jsonl", tmp_path / "requests.jsonl"
    with MetricsTable.open_or_create(table_name, 8) as table:
        table.register(row("i-victim", port=victim_port))
        table.register(row("i-other", port=other_port))
        # 5 s: the kill comes within the first second or two (a request every 0.25 s, half of them
        # to the victim), its failures are settled at the next look at the table (one a second),
        # and the seconds after it send the refused requests to the other instance.
        gen = procs.python(
            "loadgen",
            [
                "-m",
                "deploy.local.loadgen",
                "--duration",
                "5",
                "--peak-rps",
                "4",
                "--trace",
                str(_flat(tmp_path)),
                "--stats",
                str(stats),
                "--requests",
                str(requests),
            ],
            base_env(HELIX_SHM_NAME=table_name),
        )
        wait_for(lambda: inflight(victim_port)["inflight"] >= 1, 30, "a request in flight on the victim")
        victim.signal(signal.SIGKILL)
        if terminated:
            table.free("i-victim")
        else:
            table.register(row("i-victim", State.APP_DOWN, port=victim_port))
        assert gen.wait(timeout=60) == 0, gen.output()
    final = json.loads(stats.read_text().splitlines()[-1])
    cause = TERMINATED if terminated else DIED
    assert final["failed"] >= 1 and final["causes"] == {cause: final["failed"]}, final
    logged = [json.loads(x) for x in requests.read_text().splitlines()]
    assert len(logged) == final["sent"]
    broken = [r for r in logged if r["outcome"] != "served"]
    assert {r["instance"] for r in broken} == {"i-victim"} and {r["outcome"] for r in broken} == {cause}
    assert all(r["start"] <= r["end"] for r in logged)


def _flat(tmp_path) -> object:
    path = tmp_path / "flat.txt"
    path.write_text("1\n")
    return path
