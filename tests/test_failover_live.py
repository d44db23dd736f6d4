"""Issue 14, requirement 5 live: two managers (then a restarted one) as real process sets on this
machine, one leader lease in moto's DynamoDB server, the `local` provider's instance records as the
shared "cloud".

Each manager is a MonitorS and a ControllerASG of its own (table, port, ctl socket, activity log,
HELIX_MANAGER_ID); they share HELIX_STATE_DIR (the local provider's records: every controller sees,
and may terminate, the same instances), HELIX_GROUP and HELIX_LEASE. HELIX_MONITOR_ADDR lists every
manager's MonitorS, so the agents the leader launches register with each (a standby's table is
warm). Each MonitorS has a state directory of its own (its credential key), as on two VMs.

The first test, five acts on one cluster: (1) exactly one controller acts and the fleet reaches
min on both tables; (2) the leader's controller and MonitorS are SIGKILLed: the standby takes over
and heals a killed instance, with no duplicate launch and never more than max; (3) the new leader's
controller is SIGSTOPped past its lease, the first manager (restarted) takes over and heals, and the
woken one acts on nothing: no activity, and every instance launched since carries the newest epoch;
(4) the leader is cut off from the store (its own FaultProxy in front of moto loses every DynamoDB
request): it stops acting before its lease expires in the store, the standby takes over and heals,
and once the proxy heals the cut-off manager stands by; (5) every controller and MonitorS is
SIGKILLed at once and all are started again: exactly one leads (one new epoch), the fleet is adopted
as it is (no launch), and it keeps healing.

The second test runs the `ec2` provider on moto's EC2 server with two managers: only the leader
launches, each launch tagged with its epoch (helix:epoch); after a kill -9 of the leader's
controller the standby takes over without launching again, and its launches carry the new epoch.

`Cluster` is also what bench/bench_failover.py runs (with the default lease parameters).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared.table import MetricsTable, State
from tests.moto_server import CREDENTIALS, REGION, FaultProxy, moto_client
from tests.procs import (
    ROOT,
    Proc,
    ProcessPool,
    base_env,
    free_port,
    kill_local_instances,
    local_instance_records,
    manager_pki,
    wait_for,
)

pytestmark = pytest.mark.slow

TOKEN = "failover-token-0123456789"
MIN, MAX = 2, 4
ACTS = ("launch", "terminate", "replace")  # the activities that act on the cloud


def log_time(line: str) -> float:
    """The wall-clock time of one of Helix's log lines (`YYYY-mm-ddTHH:MM:SS.mmm LEVEL ...`, local time)."""
    whole, _, millis = line.partition(" ")[0].partition(".")
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000


@dataclass
class Manager:
    name: str  # HELIX_MANAGER_ID
    tag: str  # this incarnation's name (m1, m1b, ...): its logs, table and activity log
    port: int
    table: str
    activity: str
    monitor: Proc
    controller: Proc
    socket: str = ""  # its controller's HELIX_CTL_SOCKET (helix-ctl)

    def lines(self, text: str) -> list[str]:
        return [line for line in self.controller.output().splitlines() if text in line]

    def leader_epoch(self) -> tuple[int, float] | None:
        """(epoch, when) of its latest 'leader now (epoch N)' line, None before one."""
        found = self.lines("leader now (epoch ")
        if not found:
            return None
        line = found[-1]
        epoch = int(line.split("leader now (epoch ", 1)[1].split(")", 1)[0])
        return epoch, log_time(line)

    def activities(self) -> list[dict]:
        if not os.path.exists(self.activity):
            return []
        with open(self.activity, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def acts(self, since: float = 0.0) -> list[dict]:
        return [a for a in self.activities() if a["action"] in ACTS and a["time"] >= since]

    def healthy(self) -> set[str]:
        try:
            with MetricsTable.attach(self.table) as table:
                return {r.instance_id for r in table.snapshot().instances() if r.state == State.HEALTHY}
        except Exception:  # noqa: BLE001 - not there (yet, or any more)
            return set()


@dataclass
class Watch:
    """Samples the local provider's records every 0.1 s: the most billable at any look, and every
    instance ever seen with the epoch it was launched under."""

    state_dir: str
    most: int = 0
    seen: dict[str, dict] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._run, name="failover-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.look()
            self._stop.wait(0.1)

    def look(self) -> dict[str, dict]:
        records = local_instance_records(self.state_dir)
        self.most = max(self.most, len(records))
        for iid, rec in records.items():
            self.seen.setdefault(iid, rec)
        return records

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Cluster:
    """Managers sharing one group, one lease table in moto and one local "cloud" (see the module)."""

    def __init__(
        self,
        pool: ProcessPool,
        moto_url: str,
        root: str,
        *,
        names: tuple[str, ...] = ("m1", "m2"),
        ttl: float = 4,
        margin: float = 1,
        poll: float = 1,
        extra: dict[str, str] | None = None,
        proxied: bool = False,
    ):
        """`proxied`: each manager's DynamoDB calls go through a FaultProxy of its own in front of
        moto (`self.proxies[name]`), so that one can be cut off from the store."""
        self.pool = pool
        self.root = root
        self.moto_url = moto_url
        self.proxies = {name: FaultProxy(moto_url) for name in names} if proxied else {}
        self._dynamodb: Any = None
        self.state_dir = os.path.join(root, "state")
        self.prefix = f"helix-fo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ports = {name: free_port() for name in names}
        self.managers: list[Manager] = []
        self.tables: list[str] = []  # every MonitorS table started: removed by `close`
        self.shared = dict(
            HELIX_TOKEN=TOKEN,
            HELIX_GROUP=f"fo{uuid.uuid4().hex[:6]}",
            HELIX_MONITOR_ADDR=",".join(f"127.0.0.1:{p}" for p in self.ports.values()),
            HELIX_POLL_INTERVAL=f"{poll:g}",
            HELIX_METRICS_LISTEN="",
            HELIX_CONTROLLER_METRICS_LISTEN="",
        )
        self.controller_env = {
            "HELIX_STATE_DIR": self.state_dir,
            "HELIX_PROVIDER": "local",
            "HELIX_LOCAL_APP_CMD": "",
            "HELIX_LOCAL_VCPUS": "1",
            "HELIX_MIN_INSTANCES": str(MIN),
            "HELIX_MAX_INSTANCES": str(MAX),
            "HELIX_CONTROL_INTERVAL": f"{poll:g}",
            "HELIX_HEALTH_GRACE": "20",
            "HELIX_LEASE": f"dynamodb:{self.prefix}-lease",
            "HELIX_LEASE_CREATE_TABLE": "1",
            "HELIX_LEASE_TTL": f"{ttl:g}",
            "HELIX_LEASE_CLOCK_MARGIN": f"{margin:g}",
            "HELIX_DYNAMODB_ENDPOINT_URL": moto_url,
            **CREDENTIALS,
            **(extra or {}),  # may override any of the above
        }
        self.watch = Watch(self.state_dir).start()

    def start(self, name: str, tag: str = "", **env: str) -> Manager:
        """Start manager `name` (MonitorS, then its controller once MonitorS serves); `tag` names
        this incarnation (default: `name`); `env`: settings of its controller's own."""
        return self.start_all([(name, tag or name)], **env)[0]

    def start_all(self, incarnations: list[tuple[str, str]], **env: str) -> list[Manager]:
        """Start several managers at once, (name, tag) each: every MonitorS, then every controller
        once all of them serve (a whole site powered up together)."""
        monitors = []
        for name, tag in incarnations:
            table = f"{self.prefix}-{tag}"
            self.tables.append(table)
            monitor = self.pool.python(
                f"monitor-{tag}",
                ["-m", "monitor_s"],
                base_env(
                    **self.shared,
                    HELIX_SHM_NAME=table,
                    HELIX_MONITOR_LISTEN=f"127.0.0.1:{self.ports[name]}",
                    HELIX_STATE_DIR=os.path.join(self.root, f"monitor-{tag}"),
                ),
            )
            monitors.append((name, tag, table, monitor))
        for _, tag, _, monitor in monitors:
            wait_for(lambda m=monitor: "MonitorS serving Registry" in m.output(), 60, f"{tag}'s MonitorS to serve")  # type: ignore[misc]
        started = []
        for name, tag, table, monitor in monitors:
            activity = os.path.join(self.root, f"activity-{tag}.jsonl")
            socket = os.path.join(self.root, f"ctl-{tag}.sock")
            proxy = {"HELIX_DYNAMODB_ENDPOINT_URL": self.proxies[name].url} if name in self.proxies else {}
            controller = self.pool.python(
                f"controller-{tag}",
                ["-m", "controller_asg"],
                base_env(
                    **{
                        **self.shared,
                        **self.controller_env,
                        **proxy,
                        "HELIX_MANAGER_ID": name,
                        "HELIX_SHM_NAME": table,
                        "HELIX_CTL_SOCKET": socket,
                        "HELIX_ACTIVITY_LOG": activity,
                        **env,
                    }
                ),
            )
            manager = Manager(name, tag, self.ports[name], table, activity, monitor, controller, socket)
            self.managers.append(manager)
            started.append(manager)
        return started

    def kill(self, manager: Manager) -> float:
        """SIGKILL the manager's controller and MonitorS (a dead VM); returns when."""
        at = time.time()
        for proc in (manager.controller, manager.monitor):
            os.kill(proc.pid, signal.SIGKILL)
        for proc in (manager.controller, manager.monitor):
            proc.wait(30)
        return at

    def kill_all(self, managers: list[Manager]) -> float:
        """SIGKILL every one of `managers`' controllers and MonitorS at the same moment (a site's
        power cut); returns when."""
        procs = [proc for m in managers for proc in (m.controller, m.monitor)]
        at = time.time()
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait(30)
        return at

    def lease(self) -> tuple[str, int, float]:
        """The lease item as the store holds it, read from moto directly (never through a proxy):
        (holder, epoch, expires_at); ('', 0, 0.0) before anyone took it."""
        if self._dynamodb is None:
            self._dynamodb = moto_client(self.moto_url, "dynamodb")
        item = self._dynamodb.get_item(
            TableName=f"{self.prefix}-lease",
            Key={"pk": {"S": f"lease#{self.shared['HELIX_GROUP']}"}},
            ConsistentRead=True,
        ).get("Item", {})
        return (
            item.get("holder", {}).get("S", ""),
            int(item.get("epoch", {}).get("N", "0")),
            float(item.get("expires_at", {}).get("N", "0")),
        )

    def live(self) -> dict[str, dict]:
        """The records whose agent still runs (not terminating)."""
        out = {}
        for iid, rec in self.watch.look().items():
            pids = [m["pid"] for m in rec.get("members", [])]
            if not rec.get("terminate_at") and pids and all(_running(pid) for pid in pids):
                out[iid] = rec
        return out

    def kill_instance(self, iid: str) -> float:
        """SIGKILL one instance's process group (the instance dies); returns when."""
        rec = self.watch.look()[iid]
        at = time.time()
        os.killpg(rec["pgid"], signal.SIGKILL)
        return at

    def settled(self, managers: list[Manager], count: int = MIN) -> set[str] | None:
        """The live instances when there are exactly `count`, each HEALTHY on every one of `managers`."""
        live = set(self.live())
        if len(live) != count:
            return None
        return live if all(live <= m.healthy() for m in managers) else None

    def close(self) -> None:
        """Controllers first (none may replace what goes next), then every instance, MonitorS, tables."""
        self.watch.stop()
        try:
            for kind in ("controller-", "monitor-"):
                for proc in self.pool.procs:
                    if proc.name.startswith(kind):
                        proc.kill_group()  # SIGKILL: a SIGSTOPped one too
                if kind == "controller-":
                    kill_local_instances(self.state_dir)
            for table in self.tables:
                MetricsTable.remove(table)
        finally:
            for proxy in self.proxies.values():
                proxy.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_and_wait_for_replacement(
    cluster: Cluster, manager: Manager, victim: str, what: str
) -> tuple[float, list[dict]]:
    """SIGKILL `victim` and wait for `manager`'s next acts; returns (when killed, those acts). Not its
    acts stamped after the kill: an act carries the start time of its control step, and a kill that
    lands inside a step, before the step looks at the provider, is replaced by that very step with
    a time a little before the kill (CI's loaded machine caught it). The fleet is settled before
    each kill, so the manager's next act is the replacement."""
    before = len(manager.acts())
    killed = cluster.kill_instance(victim)
    return killed, wait_for(lambda: manager.acts()[before:], 30, what)


def first_after(items: list[Any], since: float, key: Callable[[Any], float]) -> float | None:
    times = sorted(key(i) for i in items if key(i) >= since)
    return times[0] if times else None


# -------------------------------------------------------------------------------------------------


@pytest.fixture
def cluster(procs, moto_endpoint, tmp_path):
    c = Cluster(procs, moto_endpoint, str(tmp_path), proxied=True)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(c.state_dir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_kill_pause_cut_off_and_restart_all_the_fleet_keeps_healing_under_one_actor(cluster):
    started = time.monotonic()
    timings: dict[str, float] = {}
    ends: list[float] = []  # when each act ended, from the start (the file's time budget)

    # -- 1. two managers: one acts, the other stands by warm ------------------------------------
    m1 = cluster.start("m1")
    wait_for(m1.leader_epoch, 60, "m1 to lead")
    m2 = cluster.start("m2")
    first = wait_for(lambda: cluster.settled([m1, m2]), 60, f"{MIN} instances HEALTHY in both tables")
    wait_for(lambda: m2.lines("not acting: standby: manager m1 holds the lease"), 30, "m2 to say it stands by")
    assert (m1.leader_epoch() or (0, 0.0))[0] == 1
    assert m2.leader_epoch() is None and not m2.acts(), "the standby decided but acted on nothing"
    assert len(m1.acts()) >= 1 and all(a["action"] == "launch" for a in m1.acts())
    assert {cluster.watch.seen[i]["epoch"] for i in first} == {1}, "launched under m1's epoch"

    ends.append(time.monotonic() - started)  # act 1 done
    # -- 2. the leader's VM dies: the standby takes over and heals ----------------------------
    died = cluster.kill(m1)
    epoch2, leader2 = wait_for(m2.leader_epoch, 30, "m2 to take over")
    assert epoch2 == 2
    victim = sorted(first)[0]
    killed, replaced = kill_and_wait_for_replacement(cluster, m2, victim, "m2 to replace the killed instance")
    timings["kill -9: death -> 'leader now'"] = leader2 - died
    timings["kill -9: instance killed -> new leader's launch"] = replaced[0]["time"] - killed
    second = wait_for(lambda: cluster.settled([m2]), 60, f"the fleet back at {MIN} HEALTHY")
    assert victim not in second and len(second - first) == 1
    new = (second - first).pop()
    assert cluster.watch.seen[new]["epoch"] == 2, "launched under m2's epoch"
    assert [a["action"] for a in m2.acts()] == ["launch"] and m2.acts()[0]["count"] == 1, m2.acts()
    assert set(cluster.watch.seen) == first | {new}, "one launch for one lost instance: no duplicate"

    ends.append(time.monotonic() - started)  # act 2 done
    # -- 3. the new leader freezes past its lease; the first manager, restarted, takes over -----
    m1b = cluster.start("m1", tag="m1b")
    wait_for(lambda: m1b.lines("not acting: standby: manager m2 holds the lease"), 60, "m1 to stand by")
    wait_for(lambda: cluster.settled([m2, m1b]), 60, "the restarted m1's table to be warm")
    m2.controller.signal(signal.SIGSTOP)
    stopped = time.time()
    epoch3, leader3 = wait_for(m1b.leader_epoch, 30, "m1 to take over from the frozen m2")
    assert epoch3 == 3
    timings["SIGSTOP: stop -> 'leader now'"] = leader3 - stopped
    victim = sorted(second)[0]
    kill_and_wait_for_replacement(cluster, m1b, victim, "m1 to replace the killed instance")
    m2.controller.signal(signal.SIGCONT)
    woke = time.time()
    # The woken controller notices it lost the lease, and stands by.
    # ('lost to m1' when its first attempt on waking finds m1; 'm1 holds it' when the fence noticed
    # the lapse first, e.g. a renewal in flight at the SIGSTOP whose reply came back too late.)
    wait_for(
        lambda: m2.lines("lease: lost to m1 (epoch 3): standing by") or m2.lines("lease: m1 holds it (epoch 3)"),
        30,
        "m2 to learn it lost the lease",
    )
    third = wait_for(lambda: cluster.settled([m1b]), 60, f"the fleet back at {MIN} HEALTHY again")
    wait_for(lambda: m2.lines("not acting: standby: manager m1 holds the lease (epoch 3)"), 30, "m2 to stand by again")
    # Its first words on waking: it refused (its lease lapsed by its own monotonic clock) or it had
    # already learned it lost; never an act.
    woken = [
        line
        for line in m2.controller.output().splitlines()
        if log_time(line) >= stopped and (" controller_asg[" in line or " controller_asg.lease[" in line)
    ]
    refusals = (
        "not acting: lease not renewed",
        "lease: renewals are late: not acting",
        "lease: lost to m1",
        "lease: m1 holds it",
    )
    assert woken and any(r in woken[0] for r in refusals), woken[:5]
    assert not m2.acts(since=stopped), f"the woken manager acted: {m2.acts(since=stopped)}"
    after = set(cluster.watch.seen) - first - second
    assert len(after) == 1 and after <= third, (after, third)
    assert {cluster.watch.seen[i]["epoch"] for i in after} == {3}, "launched after the takeover: epoch 3 only"
    assert {r["epoch"] for r in local_instance_records(cluster.state_dir).values()} <= {1, 2, 3}

    # -- every act, by whom: one actor per epoch, never above max, one launch per lost instance --
    assert all(a["time"] < died for a in m1.acts()), m1.acts()
    assert all(leader2 <= a["time"] < stopped for a in m2.acts()), m2.acts()
    assert all(a["time"] >= leader3 for a in m1b.acts()) and len(m1b.acts()) == 1, m1b.acts()
    assert cluster.watch.most <= MAX, cluster.watch.most
    assert len(cluster.watch.seen) == MIN + 2, sorted(cluster.watch.seen)
    woke_watched = time.time() - woke

    ends.append(time.monotonic() - started)  # act 3 done
    # -- 4. the leader is cut off from the store: it stops acting before its lease expires there --
    # m1b leads (epoch 3) and m2 stands by, both tables warm. From the cut on, every DynamoDB request
    # of m1b is lost (its FaultProxy); its MonitorS and the "cloud" still answer it.
    steady = wait_for(lambda: cluster.settled([m1b, m2]), 60, "the fleet HEALTHY in both tables")
    before_cut = set(cluster.watch.seen)
    expiries: list[float] = []  # what the store held as m1b's lease's end, from the cut on

    def look_at_the_store() -> None:
        holder, epoch, expires = cluster.lease()
        if (holder, epoch) == ("m1", 3):
            expiries.append(expires)

    def lose(action: str, params: dict[str, str]) -> object:
        return "lose"  # every DynamoDB request of m1b: never reaches moto, no reply

    cut = time.time()
    cluster.proxies["m1"].rules.append(lose)
    look_at_the_store()

    def lapsed() -> list[str]:
        look_at_the_store()
        return [line for line in m1b.lines("not acting") if log_time(line) >= cut]

    stopped_acting = log_time(wait_for(lapsed, 30, "the cut-off m1 to stop acting")[0])
    # Something to act on while it cannot: one instance dies. Not act 3's replacement: m1b may have
    # seen it HEALTHY only in the step whose save the cut refused, and the churn breaker m2 restores
    # from the store would then count its death as a failed launch (a 10 s back-off of its slot).
    victim = sorted(steady & second)[0]
    killed = cluster.kill_instance(victim)

    def took_over() -> tuple[int, float] | None:
        look_at_the_store()
        seen = m2.leader_epoch()
        return seen if seen is not None and seen[0] > 3 else None

    epoch4, leader4 = wait_for(took_over, 30, "m2 to take over from the cut-off m1")
    assert epoch4 == 4 and expiries, (epoch4, expiries)
    expiry = max(expiries)  # m1b's last renewal that reached the store
    assert stopped_acting < expiry, f"m1 stopped acting at {stopped_acting:.3f}, its lease expired at {expiry:.3f}"
    assert leader4 >= expiry - 0.001, "m2 took the lease before it expired"
    timings["cut off: cut -> m1's 'not acting'"] = stopped_acting - cut
    timings["cut off: m1's 'not acting' -> lease expiry (store)"] = expiry - stopped_acting
    timings["cut off: cut -> m2's 'leader now'"] = leader4 - cut
    wait_for(lambda: m2.acts(since=killed), 30, "m2 to replace the instance killed during the cut")
    cluster.proxies["m1"].rules.remove(lose)
    healed = time.time()
    wait_for(
        lambda: [
            line
            for line in m1b.lines("not acting: standby: manager m2 holds the lease (epoch 4)")
            if log_time(line) >= healed
        ],
        30,
        "the healed m1 to stand by",
    )
    fourth = wait_for(lambda: cluster.settled([m2, m1b]), 60, f"the fleet back at {MIN} HEALTHY after the cut")
    after = set(cluster.watch.seen) - before_cut
    assert victim not in fourth and len(after) == 1 and after <= fourth, (after, fourth)
    assert {cluster.watch.seen[i]["epoch"] for i in after} == {4}, "launched after the takeover: epoch 4 only"
    assert not m1b.acts(since=stopped_acting), f"the cut-off m1 acted after its lease: {m1b.acts(since=cut)}"
    launched3 = [r["launched_at"] for r in cluster.watch.seen.values() if r["epoch"] == 3]
    assert launched3 and max(launched3) < stopped_acting, "an epoch-3 launch after m1 stopped acting"
    assert all(r["epoch"] == 4 and r["launched_at"] >= leader4 for i, r in cluster.watch.seen.items() if i in after), (
        "every launch since the cut by m2 under epoch 4, after it became leader"
    )
    assert [a["action"] for a in m2.acts(since=cut)] == ["launch"], m2.acts(since=cut)
    assert m2.acts(since=cut)[0]["count"] == 1

    ends.append(time.monotonic() - started)  # act 4 done
    # -- 5. every manager dies at once, and all come back: one leader, the fleet adopted as is ----
    before_restart = set(cluster.watch.seen)
    down = cluster.kill_all([m1b, m2])
    m1c, m2c = cluster.start_all([("m1", "m1c"), ("m2", "m2c")])
    leaders = wait_for(lambda: [m for m in (m1c, m2c) if m.leader_epoch()], 30, "one restarted manager to lead")
    assert len(leaders) == 1, "both restarted managers lead"
    leader5 = leaders[0]
    standby5 = m2c if leader5 is m1c else m1c
    epoch5, led5 = leader5.leader_epoch() or (0, 0.0)
    assert epoch5 == 5, epoch5
    timings["restart all: kill -> 'leader now'"] = led5 - down
    wait_for(
        lambda: standby5.lines(f"not acting: standby: manager {leader5.name} holds the lease (epoch 5)"),
        30,
        f"{standby5.tag} to stand by",
    )
    adopted = wait_for(lambda: cluster.settled([m1c, m2c]), 60, "the fleet HEALTHY in both new tables")
    assert adopted == fourth, ("adopted as it was", adopted, fourth)
    assert not m1c.acts() and not m2c.acts(), "the fleet was at min and healthy: nothing to do"
    assert set(cluster.watch.seen) == before_restart, "no launch on restart"
    # Not act 4's replacement: m2 may have died before a step of its own saw it HEALTHY, so the
    # churn breaker restored from the store may still be judging that launch, and a death before
    # the new leader sees it HEALTHY counts as a failed launch (its slot then backs off 10 s).
    victim = sorted(adopted - after)[0]
    killed, replaced = kill_and_wait_for_replacement(
        cluster, leader5, victim, f"{leader5.tag} to replace the killed instance"
    )
    timings["restart all: instance killed -> new leader's launch"] = replaced[0]["time"] - killed
    fifth = wait_for(lambda: cluster.settled([m1c, m2c]), 60, f"the fleet back at {MIN} HEALTHY after the restart")
    new = set(cluster.watch.seen) - before_restart
    assert victim not in fifth and len(new) == 1 and new <= fifth, (new, fifth)
    assert {cluster.watch.seen[i]["epoch"] for i in new} == {5}, "launched by the new leader under epoch 5"
    assert [(a["action"], a["count"]) for a in leader5.acts()] == [("launch", 1)], leader5.acts()
    assert not standby5.acts() and standby5.leader_epoch() is None, standby5.acts()
    assert cluster.lease()[:2] == (leader5.name, 5)

    ends.append(time.monotonic() - started)  # act 5 done
    # -- every act, by whom, over the five acts ---------------------------------------------------
    assert cluster.watch.most <= MAX, cluster.watch.most
    assert len(cluster.watch.seen) == MIN + 4, sorted(cluster.watch.seen)
    assert {r["epoch"] for r in cluster.watch.seen.values()} == {1, 2, 3, 4, 5}
    ledgers = os.path.join(cluster.state_dir, "launches")
    ids: list[str] = []
    for name in os.listdir(ledgers):
        with open(os.path.join(ledgers, name), encoding="utf-8") as fh:
            ids += json.load(fh)["ids"]
    assert sorted(ids) == sorted(cluster.watch.seen), "every launch in one ledger, once"
    print("\nfailover timeline (TTL 4 s, margin 1 s, control interval 1 s):")
    for what, seconds in timings.items():
        print(f"  {what:<52} {seconds:5.1f} s")
    print(f"  woken m2 watched for {woke_watched:.1f} s: no act")
    print(
        f"  acts 1-5 ended at {', '.join(f'{t:.1f}' for t in ends)} s; test wall time {time.monotonic() - started:.1f} s"
    )


# -- the ec2 provider on moto's EC2 server ---------------------------------------------------------

MOTO_AMI = "ami-12c6146b"  # one of the AMIs moto ships


def ec2_fleet(ec2: Any, group: str) -> dict[str, dict[str, str]]:
    """The group's instances that bill (not terminated) in moto: id -> tags."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag:helix:group", "Values": [group]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
    )
    return {
        i["InstanceId"]: {t["Key"]: t["Value"] for t in i.get("Tags", [])}
        for page in pages
        for r in page["Reservations"]
        for i in r["Instances"]
    }


@pytest.mark.timeout(120)
def test_ec2_only_the_leader_launches_under_its_epoch_and_a_standby_does_not_launch_again(
    procs, moto_endpoint, tmp_path
):
    """Two managers with the ec2 provider on moto: instances there have no agent, so a long health
    grace keeps every one of them (nothing is replaced for being unregistered)."""
    started = time.monotonic()
    ec2 = moto_client(moto_endpoint, "ec2")
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.7.{i}.0/24", AvailabilityZone=f"{REGION}{z}")["Subnet"]["SubnetId"]
        for i, z in enumerate("ab")
    ]
    sg = ec2.create_security_group(GroupName=f"helix-fo-{uuid.uuid4().hex[:6]}", Description="t", VpcId=vpc)["GroupId"]
    c = Cluster(
        procs,
        moto_endpoint,
        str(tmp_path),
        extra=dict(
            HELIX_PROVIDER="ec2",
            HELIX_EC2_AMI=MOTO_AMI,
            HELIX_EC2_SUBNETS=",".join(subnets),
            HELIX_EC2_SECURITY_GROUPS=sg,
            HELIX_EC2_ENDPOINT_URL=moto_endpoint,
            HELIX_IMDS_URL="",  # not on EC2
            HELIX_PKI_DIR=manager_pki(),
            HELIX_HEALTH_GRACE="600",
        ),
    )
    group = c.shared["HELIX_GROUP"]
    try:
        # -- both managers start together: one leads and launches min, tagged with epoch 1 ---------
        m1, m2 = c.start_all([("m1", "m1"), ("m2", "m2")])
        leaders = wait_for(lambda: [m for m in (m1, m2) if m.leader_epoch()], 60, "one manager to lead")
        assert len(leaders) == 1, "both managers lead"
        leader = leaders[0]
        standby = m2 if leader is m1 else m1
        assert (leader.leader_epoch() or (0, 0.0))[0] == 1

        def at_least(count: int) -> dict[str, dict[str, str]] | None:
            fleet = ec2_fleet(ec2, group)
            return fleet if len(fleet) >= count else None

        first = wait_for(lambda: at_least(MIN), 60, f"{MIN} instances in moto")
        assert len(first) == MIN and {t["helix:epoch"] for t in first.values()} == {"1"}, first
        wait_for(
            lambda: standby.lines(f"not acting: standby: manager {leader.name} holds the lease (epoch 1)"),
            30,
            f"{standby.tag} to stand by",
        )
        assert not standby.acts() and standby.leader_epoch() is None, standby.acts()
        launches = wait_for(leader.acts, 30, f"{leader.tag}'s launch in its activity log")
        assert [(a["action"], a["count"]) for a in launches] == [("launch", MIN)], launches

        # -- the leader's controller dies: the standby takes over (epoch 2), no launch -------------
        died = time.time()
        os.kill(leader.controller.pid, signal.SIGKILL)
        leader.controller.wait(30)
        epoch2, led2 = wait_for(standby.leader_epoch, 30, f"{standby.tag} to take over")
        assert epoch2 == 2
        assert ec2_fleet(ec2, group) == first and not standby.acts(), "the fleet is at min: no launch"

        # -- its helix-ctl raises min: the one new instance carries epoch 2 -----------------------
        # helix-ctl waits for the step in progress (a step and a request never interleave): a launch
        # the takeover made on its own would be recorded before `asked`.
        asked = time.time()
        ctl = subprocess.run(
            [sys.executable, "-m", "controller_asg.ctl", "set-capacity", "--min", "3", "--socket", standby.socket],
            env=base_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ctl.returncode == 0, ctl.stdout + ctl.stderr
        fleet = wait_for(lambda: at_least(MIN + 1), 30, "a third instance in moto")
        new = set(fleet) - set(first)
        assert set(first) <= set(fleet) and len(new) == 1, (first, fleet)
        assert fleet[new.pop()]["helix:epoch"] == "2", fleet
        launches = wait_for(standby.acts, 30, f"{standby.tag}'s launch in its activity log")
        assert [(a["action"], a["count"]) for a in launches] == [("launch", 1)], launches
        assert launches[0]["time"] >= asked, "launched on its own at the takeover: a duplicate"
        assert len(ec2_fleet(ec2, group)) == 3 <= MAX
        print(
            f"\nec2 on moto: kill -9 -> 'leader now' {led2 - died:.1f} s; "
            f"test wall time {time.monotonic() - started:.1f} s"
        )
    finally:
        c.close()
