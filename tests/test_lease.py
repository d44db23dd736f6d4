"""The leader lease (controller_asg/lease.py) against moto's DynamoDB server over HTTP: two and three
managers (DynamoDbLease + LeaseFence each) on one table. Exactly one acts; epochs only grow; a
holder that stops renewing (stopped, frozen, or cut off from the store) stops acting before its
lease expires in the store, and another takes over only after it expired; a release hands over at
once; the table is created on first use only when allowed; every DynamoDB call is allowed by the
IAM policy `python -m controller_asg.iam` generates.

Short leases (TTL 2 s, margin 0.5 s, renewed every 0.5 s) keep the file fast; nothing sleeps a fixed
time: every wait is on a condition with a deadline."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from controller_asg.iam import policy_for
from controller_asg.lease import (
    CREATE_OPERATIONS,
    OPERATIONS,
    DynamoDbLease,
    LeaseFence,
    LeaseTableMissing,
    LeaseView,
    dynamodb_client,
    ensure_table,
    make_fence,
    make_lease,
)
from controller_asg.statestore import DynamoDbStore, StaleEpoch, make_store
from shared.config import load_config
from tests.iam_eval import Request, allowed, denied
from tests.moto_server import CREDENTIALS, REGION
from tests.procs import free_port, wait_for

TTL = 2.0
MARGIN = 0.5
PERIOD = 0.5
MOTO_ACCOUNT = "123456789012"
# Polling granularity and scheduling on a loaded machine. At most MARGIN, so "stopped within
# TTL - MARGIN + SLACK" still means stopped before the lease expired, when another may act.
SLACK = 0.5


def config(endpoint: str, table: str, **extra: str):
    return load_config(
        {
            "HELIX_ENV_FILE": "",
            **CREDENTIALS,
            "HELIX_LEASE": f"dynamodb:{table}",
            "HELIX_DYNAMODB_ENDPOINT_URL": endpoint,
            "HELIX_LEASE_TTL": "3",
            "HELIX_LEASE_CLOCK_MARGIN": "1",
            **extra,
        }
    )


@pytest.fixture
def table(moto_endpoint):
    name = f"helix-lease-{uuid.uuid4().hex[:8]}"
    ensure_table(dynamodb_client(config(moto_endpoint, name)), name, create=True)
    return name


class Manager:
    """One manager's lease and fence (TTL 2 s), at `endpoint` (moto, or a proxy in front of it)."""

    def __init__(self, endpoint: str, table: str, name: str):
        self.name = name
        self.lease = DynamoDbLease(dynamodb_client(config(endpoint, table)), table, "web", name, TTL)
        self.changes: list[LeaseView] = []
        self.fence = LeaseFence(self.lease, TTL, MARGIN, period=PERIOD, on_change=self.changes.append)

    def acting(self) -> bool:
        return self.fence.may_act() == ""


class Watch:
    """Samples every manager's may_act() in a thread: at no sample may two act at once."""

    def __init__(self, managers: list[Manager]):
        self.managers = managers
        self.overlaps: list[list[str]] = []
        self.samples = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.wait(0.005):
            acting = [m.name for m in self.managers if m.acting()]
            self.samples += 1
            if len(acting) > 1:
                self.overlaps.append(acting)

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(5)


def leader(managers: list[Manager], timeout: float = 5 * TTL) -> Manager:
    found = wait_for(lambda: next((m for m in managers if m.acting()), None), timeout, "a leader")
    assert found is not None
    return found


def test_one_of_three_acts_epochs_grow_and_a_release_hands_over_at_once(moto_endpoint, table):
    managers = [Manager(moto_endpoint, table, name) for name in "ABC"]
    watch = Watch(managers)
    try:
        for m in managers:
            m.fence.start()
        first = leader(managers)
        others = [m for m in managers if m is not first]
        held = first.lease.read()
        assert first.fence.epoch == 1 and (held.holder, held.epoch, held.mine) == (first.name, 1, True)
        for m in others:
            wait_for(lambda m=m: m.fence.view and m.fence.view.holder == first.name, TTL, "the standby to see it")
            assert m.fence.may_act() == f"standby: manager {first.name} holds the lease (epoch 1)"
            assert m.fence.epoch == 0 and not m.lease.read().mine
        # Several renewals later: still the same holder and epoch (a renewal keeps the epoch).
        wait_for(lambda: first.lease.read().expires_at > held.expires_at + PERIOD, 3 * TTL, "renewals")
        assert first.fence.epoch == 1 and first.acting() and first.fence.leader_changes == 1

        # The leader dies without a word (kill -9): the others wait for the lease to expire.
        expires = first.lease.read().expires_at
        first.fence.stop(release=False)
        assert not first.acting()
        second = leader(others)
        assert time.time() >= expires, "taken over before the lease expired in the store"
        assert second.fence.epoch == 2 and second.lease.read().holder == second.name

        # A clean shutdown releases: the last one takes it at its next attempt, not after the TTL.
        last = next(m for m in others if m is not second)
        second.fence.stop(release=True)
        released = time.monotonic()
        assert leader([last], TTL) is last
        assert time.monotonic() - released < PERIOD + SLACK + 0.5 < TTL
        held = last.lease.read()
        assert last.fence.epoch == 3 and (held.holder, held.epoch, held.mine) == (last.name, 3, True)
        assert [v.mine for v in second.changes] == [True, False] and second.changes[0].epoch == 2
        assert last.changes[-1].mine and last.changes[-1].epoch == 3
    finally:
        watch.stop()
        for m in managers:
            m.fence.stop()
    assert watch.samples > 100 and watch.overlaps == []
    assert managers[0].lease.read().epoch == 3  # released, never reset: epochs never go back


def test_a_frozen_holder_stops_acting_before_its_lease_expires_and_learns_it_lost(moto_endpoint, table):
    a, b = Manager(moto_endpoint, table, "A"), Manager(moto_endpoint, table, "B")
    a.fence.start()
    assert a.acting()
    b.fence.start()
    watch = Watch([a, b])
    try:
        # A's renewals stop (its process frozen by SIGSTOP, as far as the lease can tell).
        a.fence.renew_paused.set()
        wait_for(lambda: not a.acting(), TTL, "the frozen holder to stop acting")
        stopped = time.time()
        expires = b.lease.read().expires_at  # A's last renewal, as the store (and B) sees it
        assert expires - TTL < stopped < expires - MARGIN + SLACK, "still acting inside the clock margin"
        assert a.fence.may_act().startswith("lease not renewed for ")
        assert a.fence.epoch == 1  # it does not know it lost yet: it only stopped acting
        # B takes over once the lease expired in the store, with a newer epoch.
        wait_for(b.acting, 3 * TTL, "the standby to take over")
        assert time.time() >= expires and b.fence.epoch == 2
        # A thaws: its renewal is refused (B holds epoch 2), and it says who leads.
        a.fence.renew_paused.clear()
        wait_for(lambda: a.fence.epoch == 0, 2 * TTL, "the thawed holder to learn it lost")
        assert a.fence.may_act() == "standby: manager B holds the lease (epoch 2)" and not a.acting()
        assert [(v.mine, v.epoch) for v in a.changes] == [(True, 1), (False, 1)]
    finally:
        watch.stop()
        a.fence.stop()
        b.fence.stop()
    assert watch.overlaps == []


def test_a_paused_process_refuses_at_once_when_it_wakes_past_its_lease(moto_endpoint, table):
    # A fence on injectable clocks and no thread: SIGSTOP for longer than the lease is a jump of
    # both clocks between two may_act() calls. The first call after waking refuses.
    clock = {"mono": 1000.0, "wall": time.time()}
    lease = DynamoDbLease(dynamodb_client(config(moto_endpoint, table)), table, "web", "A", TTL)
    fence = LeaseFence(lease, TTL, MARGIN, monotonic=lambda: clock["mono"], wall=lambda: clock["wall"])
    fence.renew_now()
    assert fence.may_act() == "" and fence.epoch == 1
    clock["mono"] += TTL - MARGIN - 0.01
    clock["wall"] += TTL - MARGIN - 0.01
    assert fence.may_act() == ""
    clock["mono"] += 0.02
    clock["wall"] += 0.02
    assert fence.may_act() == "lease not renewed for 1.5 s: its renewals are late"
    # Either clock alone is enough: a VM paused whole may wake with its monotonic clock unmoved.
    clock["mono"] -= 1.0
    assert fence.may_act() != ""
    # Past its validity it does not extend the lease on the strength of a hold it lost track of
    # (its renewals may have gone unanswered, as when replies are lost): it stands by. The next
    # attempt finds the lease still its own (its nonce, the same epoch: nobody took it between)
    # and carries on under that epoch.
    fence.renew_now()
    assert fence.may_act() != "" and fence.epoch == 0 and lease.read().holder == "A"
    fence.renew_now()
    assert fence.may_act() == "" and fence.epoch == 1
    # Released, then taken again by the same manager: a new epoch (a standby may have acted between).
    lease.release()
    assert lease.read() == LeaseView("A", 1, 0.0, False)
    assert lease.try_acquire(time.time()).epoch == 2
    lease.release()


def test_a_holder_cut_off_from_the_store_stops_acting_within_ttl_minus_margin(moto_endpoint, fault_proxy, table):
    a = Manager(fault_proxy.url, table, "A")  # A reaches the store through the proxy
    b = Manager(moto_endpoint, table, "B")
    a.fence.start()
    b.fence.start()
    assert a.acting() and not b.acting()
    hung = threading.Event()
    try:
        # The store stops answering A: its requests hang (its client times out) until reconnected,
        # and then reach the store late (a late renewal of epoch 1 must change nothing).
        fault_proxy.rules.append(lambda action, params: None if hung.wait(10) else "lose")
        cut = time.monotonic()
        wait_for(lambda: not a.acting(), TTL, "the cut-off holder to stop acting")
        assert time.monotonic() - cut <= TTL - MARGIN + SLACK
        expires = b.lease.read().expires_at  # A's last renewal, as the store (and B) sees it
        assert b.lease.read().holder == "A" and time.time() < expires - MARGIN + SLACK
        assert a.fence.may_act().startswith("lease not renewed for ")
        wait_for(lambda: "the lease store is unreachable (" in a.fence.may_act(), TTL, "the reason")
        wait_for(b.acting, 3 * TTL, "the standby to take over")
        assert not a.acting() and b.fence.epoch == 2
        # Back in touch: A learns B leads.
        hung.set()
        fault_proxy.rules.clear()
        wait_for(lambda: a.fence.may_act() == "standby: manager B holds the lease (epoch 2)", 3 * TTL, "A to see B")
    finally:
        hung.set()
        fault_proxy.rules.clear()
        a.fence.stop()
        b.fence.stop()
    assert ("UpdateItem", "forwarded") in fault_proxy.seen


def test_a_holder_whose_replies_are_lost_lets_another_take_over(moto_endpoint, fault_proxy, table):
    """Found live: its renewals still reached the store and extended the lease, and it never heard
    back, so it could not act and nobody else could take over. Past its validity it no longer
    renews: the lease expires in the store and the standby takes it."""
    a = Manager(fault_proxy.url, table, "A")
    b = Manager(moto_endpoint, table, "B")
    a.fence.start()
    b.fence.start()
    assert a.acting() and not b.acting()
    try:
        fault_proxy.rules.append(lambda action, params: "drop")  # served, the reply never arrives
        wait_for(lambda: not a.acting(), TTL, "the holder to stop acting")
        wait_for(b.acting, 6 * TTL, "the standby to take over")
        assert b.fence.epoch == 2 and not a.acting()
    finally:
        fault_proxy.rules.clear()
        a.fence.stop()
        b.fence.stop()
    assert ("UpdateItem", "dropped") in fault_proxy.seen


def test_a_store_that_never_answered_leaves_a_standby(moto_endpoint, table):
    dead = Manager(f"http://127.0.0.1:{free_port()}", table, "A")
    dead.fence.start()  # no table check possible: a standby that keeps trying, not a crash
    try:
        reason = dead.fence.may_act()
        assert reason.startswith("standby: the lease store is unreachable (") and "\n" not in reason
        assert dead.fence.epoch == 0 and dead.changes == []
    finally:
        dead.fence.stop()


def test_the_table_is_created_on_first_use_only_when_allowed(moto_endpoint, monkeypatch):
    name = f"helix-new-{uuid.uuid4().hex[:8]}"
    cfg = config(moto_endpoint, name, HELIX_MANAGER_ID="m1")
    lease = make_lease(cfg)
    assert lease is not None and lease.holder == "m1" and lease.ttl == 3
    with pytest.raises(LeaseTableMissing) as refused:
        make_fence(cfg, lease).start()
    message = str(refused.value)
    assert message.startswith(f"HELIX_LEASE=dynamodb:{name}: the table does not exist")
    assert "HELIX_LEASE_CREATE_TABLE=1" in message and "\n" not in message

    allowed_cfg = config(moto_endpoint, name, HELIX_MANAGER_ID="m1", HELIX_LEASE_CREATE_TABLE="1")
    lease = make_lease(allowed_cfg)
    assert lease is not None
    fence = make_fence(allowed_cfg, lease)
    fence.start()
    try:
        assert fence.may_act() == "" and fence.epoch == 1
        desc = lease.client.describe_table(TableName=name)["Table"]
        assert desc["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
        assert desc["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"}]
        assert desc["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        item = lease.client.get_item(TableName=name, Key={"pk": {"S": f"lease#{cfg.group_name}"}})["Item"]
        assert item["holder"] == {"S": "m1"} and item["epoch"] == {"N": "1"}
        assert float(item["expires_at"]["N"]) - float(item["renewed_at"]["N"]) == pytest.approx(3, abs=0.01)
    finally:
        fence.stop()
    assert make_lease(load_config({"HELIX_ENV_FILE": ""})) is None

    # The endpoint: the setting when given, else boto3's own AWS_ENDPOINT_URL_DYNAMODB.
    assert lease.client.meta.endpoint_url == moto_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto_endpoint)
    by_boto = make_lease(config("", name, HELIX_MANAGER_ID="m2"))
    assert by_boto is not None and by_boto.client.meta.endpoint_url == moto_endpoint
    assert by_boto.read().holder == "m1"


def test_every_dynamodb_call_is_allowed_by_the_generated_policy(moto_endpoint):
    name = f"helix-iam-{uuid.uuid4().hex[:8]}"
    cfg = config(moto_endpoint, name, HELIX_AWS_REGION=REGION, HELIX_LEASE_CREATE_TABLE="1", HELIX_MANAGER_ID="a")
    calls: list[tuple[str, dict]] = []

    def record(model=None, params=None, **_):
        calls.append((model.name, dict(params or {})))

    lease = make_lease(cfg)
    assert lease is not None
    lease.client.meta.events.register("before-parameter-build.dynamodb", record)
    other = make_lease(config(moto_endpoint, name, HELIX_MANAGER_ID="b"))
    assert other is not None
    other.client.meta.events.register("before-parameter-build.dynamodb", record)
    fence, standby = make_fence(cfg, lease), LeaseFence(other, 3, 1)
    fence.start()  # creates the table, acquires
    standby.start()  # reads, stands by
    store = make_store(cfg, fence)
    assert isinstance(store, DynamoDbStore) and store.client is lease.client  # one client, one table
    store.save("state", json.dumps({"intents": []}), durable=True)
    store.save("history", "{}", durable=False)
    assert store.load("state") == '{"intents": []}' and store.load("nothing") is None
    fence.renew_now()  # a renewal
    with pytest.raises(StaleEpoch):
        make_store(cfg, standby).save("state", "{}", durable=True)  # holds no lease: refused before any call
    fence.stop(release=True)  # a release
    standby.renew_now()  # the standby takes over (a read, then an acquisition)
    assert standby.may_act() == "" and standby.epoch == 2
    make_store(cfg, standby).save("state", "{}", durable=True)
    with pytest.raises(StaleEpoch):  # the deposed leader's write: refused by the store
        DynamoDbStore(lease.client, name, cfg.group_name, lambda: 1).save("state", "{}", durable=True)
    standby.stop()

    operations = {op for op, _ in calls}
    assert operations <= set(OPERATIONS) | set(CREATE_OPERATIONS)
    assert set(OPERATIONS) | set(CREATE_OPERATIONS) <= operations  # every one is exercised here

    policy = policy_for(cfg, MOTO_ACCOUNT)
    table_arn = f"arn:aws:dynamodb:{REGION}:{MOTO_ACCOUNT}:table/{name}"

    def request(op: str, params: dict, arn: str = table_arn) -> Request:
        context: dict = {"aws:RequestedRegion": REGION}
        if "Key" in params or "Item" in params:
            context["dynamodb:LeadingKeys"] = ((params.get("Key") or params["Item"])["pk"]["S"],)
        return Request(f"dynamodb:{op}", arn, context)

    assert denied(policy, [request(op, params) for op, params in calls]) == []
    # Nothing else: another group's items, another table, another region, other operations.
    get = next(params for op, params in calls if op == "GetItem")
    group = cfg.group_name
    assert request("GetItem", {"Key": {"pk": {"S": f"state#{group}#anything"}}}) and group == "helix"
    for pk in ("lease#api", "state#api#state", f"lease#{group}2", f"state#{group}2#state", "other"):
        assert not allowed(policy, request("GetItem", {"Key": {"pk": {"S": pk}}})), pk
    assert not allowed(policy, request("GetItem", get, table_arn.replace(name, "other-table")))
    assert not allowed(policy, request("GetItem", get, table_arn.replace(REGION, "eu-west-1")))
    for op in ("DeleteTable", "Scan", "Query", "DeleteItem", "UpdateTable", "BatchWriteItem"):
        assert not allowed(policy, request(op, get)), op
    # Without HELIX_LEASE_CREATE_TABLE, no CreateTable.
    no_create = policy_for(config(moto_endpoint, name, HELIX_AWS_REGION=REGION), MOTO_ACCOUNT)
    assert not allowed(no_create, request("CreateTable", {}))
    assert allowed(no_create, request("DescribeTable", {}))
