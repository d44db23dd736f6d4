"""Failover of the leader lease (issue 14, requirement 6), with the default lease parameters
(HELIX_LEASE_TTL 10 s, HELIX_LEASE_CLOCK_MARGIN 2 s, renewals every 2.5 s): two managers as real
process sets on this machine (tests/test_failover_live.py's Cluster: MonitorS + ControllerASG each,
the `local` provider's records shared, the lease in moto's DynamoDB server).

1. The store's cost: every DynamoDB call of each manager goes through a FaultProxy of its own
   (tests/moto_server.py, which records each request), counted over a steady window (default 60 s)
   with the fleet at min 2: calls per minute by operation, for the leader and the standby (one
   group: that is the cost per group).
2. N trials (default 3): SIGKILL the leader's controller and MonitorS and, at the same moment, one
   instance (so that the new leader has a replacement to make); measure the time from the kill to
   the standby's 'leader now (epoch N)' log line, and to its first act (its first launch, terminate
   or replace in its own HELIX_ACTIVITY_LOG). The dead manager is then restarted as the standby
   of the next trial. Goal: death to first act within 15 s.

BENCH_FAILOVER_TRIALS and BENCH_FAILOVER_WINDOW (seconds) change the defaults.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections import Counter

from tests.moto_server import FaultProxy, start_moto
from tests.procs import ProcessPool, wait_for
from tests.test_failover_live import Cluster, Manager

TTL, MARGIN = 10.0, 2.0  # the defaults (shared/config.py)
GOAL = 15.0


def _count(proxy: FaultProxy, since: int) -> Counter[str]:
    return Counter(action for service, action, _ in proxy.requests[since:] if service == "dynamodb")


def _steady_cost(cluster: Cluster, proxies: dict[str, FaultProxy], roles: dict[str, str], window: float) -> None:
    marks = {name: len(p.requests) for name, p in proxies.items()}
    started = time.monotonic()
    time.sleep(window)
    minutes = (time.monotonic() - started) / 60
    counts = {name: _count(p, marks[name]) for name, p in proxies.items()}
    ops = sorted(set().union(*counts.values()))
    print(f"\nstore calls per minute over a steady {window:.0f} s (one group, fleet at min, TTL {TTL:g} s):")
    print(f"  {'operation':<14}" + "".join(f"{roles[n]:>10}" for n in proxies) + f"{'group':>10}")
    for op in ops:
        per = [counts[n][op] / minutes for n in proxies]
        print(f"  {op:<14}" + "".join(f"{v:>10.1f}" for v in per) + f"{sum(per):>10.1f}")
    totals = [sum(counts[n].values()) / minutes for n in proxies]
    print(f"  {'all':<14}" + "".join(f"{v:>10.1f}" for v in totals) + f"{sum(totals):>10.1f}")


def _trial(cluster: Cluster, leader: Manager, standby: Manager) -> tuple[float, float, int]:
    epoch_before = (standby.leader_epoch() or (0, 0.0))[0]
    victim = sorted(cluster.live())[0]
    died = cluster.kill(leader)
    cluster.kill_instance(victim)

    def took_over() -> tuple[int, float] | None:
        seen = standby.leader_epoch()
        return seen if seen is not None and seen[0] > epoch_before else None

    seen = wait_for(took_over, 120, f"{standby.tag} to take over")
    assert seen is not None
    epoch, leader_at = seen
    acts = wait_for(lambda: standby.acts(since=died), 120, f"{standby.tag}'s first act")
    return leader_at - died, acts[0]["time"] - died, epoch


def main() -> None:
    trials = int(os.environ.get("BENCH_FAILOVER_TRIALS", "3"))
    window = float(os.environ.get("BENCH_FAILOVER_WINDOW", "60"))
    tmp = tempfile.mkdtemp(prefix="helix-bench-failover-")
    pool = ProcessPool()
    proxies: dict[str, FaultProxy] = {}
    cluster: Cluster | None = None
    try:
        moto = start_moto(pool)
        proxies = {name: FaultProxy(moto) for name in ("m1", "m2")}
        cluster = Cluster(pool, moto, tmp, ttl=TTL, margin=MARGIN)
        started = time.monotonic()
        leader = cluster.start("m1", HELIX_DYNAMODB_ENDPOINT_URL=proxies["m1"].url)
        wait_for(leader.leader_epoch, 120, "m1 to lead")
        standby = cluster.start("m2", HELIX_DYNAMODB_ENDPOINT_URL=proxies["m2"].url)
        wait_for(lambda: cluster.settled([leader, standby]), 120, "the fleet at min, HEALTHY in both tables")
        print(f"two managers up, fleet at min 2 on both tables in {time.monotonic() - started:.1f} s")
        _steady_cost(cluster, proxies, {"m1": "leader", "m2": "standby"}, window)

        rows = []
        for n in range(1, trials + 1):
            to_leader, to_act, epoch = _trial(cluster, leader, standby)
            rows.append((n, leader.name, standby.name, epoch, to_leader, to_act))
            wait_for(lambda s=standby: cluster.settled([s]), 120, "the fleet healed")  # type: ignore[misc]
            if n == trials:
                break
            # The dead manager comes back (same name, same address) as the next trial's standby.
            name = leader.name
            back = cluster.start(name, f"{name}-{n}", HELIX_DYNAMODB_ENDPOINT_URL=proxies[name].url)
            wait_for(lambda b=back: b.lines("not acting: standby"), 120, f"{name} to stand by")  # type: ignore[misc]
            wait_for(lambda s=standby, b=back: cluster.settled([s, b]), 120, f"{name}'s table warm")  # type: ignore[misc]
            leader, standby = standby, back

        print(f"\nfailover, SIGKILL of the leader's controller and MonitorS (TTL {TTL:g} s, margin {MARGIN:g} s):")
        print(
            f"  {'trial':>5}  {'killed':>6}  {'new':>4}  {'epoch':>5}  {'death->leader s':>15}  {'death->first act s':>18}"
        )
        for n, dead, new, epoch, to_leader, to_act in rows:
            print(f"  {n:>5}  {dead:>6}  {new:>4}  {epoch:>5}  {to_leader:>15.1f}  {to_act:>18.1f}")
        acts = [r[5] for r in rows]
        worst = max(acts)
        print(
            f"  median death->first act {statistics.median(acts):.1f} s, worst {worst:.1f} s: "
            f"{'within' if worst <= GOAL else 'OVER'} the {GOAL:g} s goal"
        )
        print(
            f"  billable instances at most {cluster.watch.most} (max 4); instances ever launched {len(cluster.watch.seen)}"
        )
    finally:
        if cluster is not None:
            cluster.close()
        for proxy in proxies.values():
            proxy.close()
        pool.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
