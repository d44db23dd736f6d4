"""Issue 14, requirement 5 live: two managers (then a restarted one) as real process sets on this
machine, one leader lease in moto's DynamoDB server, the `local` provider's instance records as the
shared "cloud".

Each manager is a MonitorS and a ControllerASG of its own (table, port, ctl socket, activity log,
HELIX_MANAGER_ID); they share HELIX_STATE_DIR (the local provider's records: every controller sees,
and may terminate, the same instances), HELIX_GROUP and HELIX_LEASE. HELIX_MONITOR_ADDR lists every
manager's MonitorS, so the agents the leader launches register with each (a standby's table is
warm). Each MonitorS has a state directory of its own (its credential key), as on two VMs.

One test, three acts: (1) exactly one controller acts and the fleet reaches min on both tables;
(2) the leader's controller and MonitorS are SIGKILLed: the standby takes over and heals a killed
instance, with no duplicate launch and never more than max; (3) the new leader's controller is
SIGSTOPped past its lease, the first manager (restarted) takes over and heals, and the woken one
acts on nothing: no activity, and every instance launched since carries the newest epoch.

`Cluster` is also what bench/bench_failover.py runs (with the default lease parameters).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared.table import MetricsTable, State
from tests.moto_server import CREDENTIALS
from tests.procs import Proc, ProcessPool, base_env, free_port, kill_local_instances, local_instance_records, wait_for

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
    ):
        self.pool = pool
        self.root = root
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
        self.controller_env = dict(
            HELIX_STATE_DIR=self.state_dir,
            HELIX_PROVIDER="local",
            HELIX_LOCAL_APP_CMD="",
            HELIX_LOCAL_VCPUS="1",
            HELIX_MIN_INSTANCES=str(MIN),
            HELIX_MAX_INSTANCES=str(MAX),
            HELIX_CONTROL_INTERVAL=f"{poll:g}",
            HELIX_HEALTH_GRACE="20",
            HELIX_LEASE=f"dynamodb:{self.prefix}-lease",
            HELIX_LEASE_CREATE_TABLE="1",
            HELIX_LEASE_TTL=f"{ttl:g}",
            HELIX_LEASE_CLOCK_MARGIN=f"{margin:g}",
            HELIX_DYNAMODB_ENDPOINT_URL=moto_url,
            **CREDENTIALS,
            **(extra or {}),
        )
        self.watch = Watch(self.state_dir).start()

    def start(self, name: str, tag: str = "", **env: str) -> Manager:
        """Start manager `name` (MonitorS, then its controller once MonitorS serves); `tag` names
        this incarnation (default: `name`); `env`: settings of its controller's own."""
        tag = tag or name
        port = self.ports[name]
        table = f"{self.prefix}-{tag}"
        self.tables.append(table)
        monitor = self.pool.python(
            f"monitor-{tag}",
            ["-m", "monitor_s"],
            base_env(
                **self.shared,
                HELIX_SHM_NAME=table,
                HELIX_MONITOR_LISTEN=f"127.0.0.1:{port}",
                HELIX_STATE_DIR=os.path.join(self.root, f"monitor-{tag}"),
            ),
        )
        wait_for(lambda: "MonitorS serving Registry" in monitor.output(), 60, f"{tag}'s MonitorS to serve")
        activity = os.path.join(self.root, f"activity-{tag}.jsonl")
        controller = self.pool.python(
            f"controller-{tag}",
            ["-m", "controller_asg"],
            base_env(
                **{
                    **self.shared,
                    **self.controller_env,
                    "HELIX_MANAGER_ID": name,
                    "HELIX_SHM_NAME": table,
                    "HELIX_CTL_SOCKET": os.path.join(self.root, f"ctl-{tag}.sock"),
                    "HELIX_ACTIVITY_LOG": activity,
                    **env,
                }
            ),
        )
        manager = Manager(name, tag, port, table, activity, monitor, controller)
        self.managers.append(manager)
        return manager

    def kill(self, manager: Manager) -> float:
        """SIGKILL the manager's controller and MonitorS (a dead VM); returns when."""
        at = time.time()
        for proc in (manager.controller, manager.monitor):
            os.kill(proc.pid, signal.SIGKILL)
        for proc in (manager.controller, manager.monitor):
            proc.wait(30)
        return at

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
        for kind in ("controller-", "monitor-"):
            for proc in self.pool.procs:
                if proc.name.startswith(kind):
                    proc.kill_group()  # SIGKILL: a SIGSTOPped one too
            if kind == "controller-":
                kill_local_instances(self.state_dir)
        for table in self.tables:
            MetricsTable.remove(table)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def first_after(items: list[Any], since: float, key: Callable[[Any], float]) -> float | None:
    times = sorted(key(i) for i in items if key(i) >= since)
    return times[0] if times else None


# -------------------------------------------------------------------------------------------------


@pytest.fixture
def cluster(procs, moto_endpoint, tmp_path):
    c = Cluster(procs, moto_endpoint, str(tmp_path))
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(c.state_dir, ignore_errors=True)


@pytest.mark.timeout(240)
def test_kill_and_pause_the_leader_the_fleet_keeps_healing_under_one_actor(cluster):
    started = time.monotonic()
    timings: dict[str, float] = {}

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

    # -- 2. the leader's VM dies: the standby takes over and heals ----------------------------
    died = cluster.kill(m1)
    epoch2, leader2 = wait_for(m2.leader_epoch, 30, "m2 to take over")
    assert epoch2 == 2
    victim = sorted(first)[0]
    killed = cluster.kill_instance(victim)
    replaced = wait_for(lambda: m2.acts(since=killed), 30, "m2 to replace the killed instance")
    timings["kill -9: death -> 'leader now'"] = leader2 - died
    timings["kill -9: instance killed -> new leader's launch"] = replaced[0]["time"] - killed
    second = wait_for(lambda: cluster.settled([m2]), 60, f"the fleet back at {MIN} HEALTHY")
    assert victim not in second and len(second - first) == 1
    new = (second - first).pop()
    assert cluster.watch.seen[new]["epoch"] == 2, "launched under m2's epoch"
    assert [a["action"] for a in m2.acts()] == ["launch"] and m2.acts()[0]["count"] == 1, m2.acts()
    assert set(cluster.watch.seen) == first | {new}, "one launch for one lost instance: no duplicate"

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
    killed = cluster.kill_instance(victim)
    wait_for(lambda: m1b.acts(since=killed), 30, "m1 to replace the killed instance")
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
    ledgers = os.path.join(cluster.state_dir, "launches")
    ids: list[str] = []
    for name in os.listdir(ledgers):
        with open(os.path.join(ledgers, name), encoding="utf-8") as fh:
            ids += json.load(fh)["ids"]
    assert sorted(ids) == sorted(cluster.watch.seen), "every launch in one ledger, once"
    print("\nfailover timeline (TTL 4 s, margin 1 s, control interval 1 s):")
    for what, seconds in timings.items():
        print(f"  {what:<50} {seconds:5.1f} s")
    print(
        f"  woken m2 watched for {time.time() - woke:.1f} s: no act; test wall time {time.monotonic() - started:.1f} s"
    )
