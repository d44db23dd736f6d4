"""Where the controller keeps what must survive it (controller_asg/statestore.py): files on this host
(FileStore, write_json) and, with HELIX_LEASE, the lease's DynamoDB table (DynamoDbStore, against
moto's server over HTTP), fenced by the writer's lease epoch."""

from __future__ import annotations

import base64
import json
import math
import os
import random
import stat
import uuid
import zlib

import pytest

from controller_asg.lease import DynamoDbLease, LeaseFence, dynamodb_client, ensure_table
from controller_asg.policy.predictive import SeasonalMemory
from controller_asg.statestore import (
    MAX_COMPRESSED,
    DynamoDbStore,
    FileStore,
    StaleEpoch,
    StoreError,
    make_store,
    write_json,
)
from shared.config import load_config
from tests.moto_server import CREDENTIALS
from tests.procs import free_port


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- files --------------------------------------------------------------------------------------


def test_file_store_round_trip_paths_and_modes(tmp_path):
    store = FileStore(str(tmp_path))
    assert store.load("state") is None and store.load("history") is None
    store.save("state", '{"intents": []}', durable=True)
    store.save("history", '{"h": [1, 2]}', durable=False)
    assert store.path("state") == str(tmp_path / "controller" / "state.json")
    assert store.path("history") == str(tmp_path / "history.json")
    assert store.load("state") == '{"intents": []}' and store.load("history") == '{"h": [1, 2]}'
    assert mode(tmp_path / "controller" / "state.json") == mode(tmp_path / "history.json") == 0o600
    store.save("state", "é" * 3, durable=True)  # replaced whole, UTF-8
    assert store.load("state") == "ééé"
    assert sorted(os.listdir(tmp_path / "controller")) == ["state.json"]  # no temporary file left

    # HELIX_HISTORY_FILE: the history where it says.
    elsewhere = FileStore(str(tmp_path), str(tmp_path / "learned" / "h.json"))
    elsewhere.save("history", "{}", durable=True)
    assert (tmp_path / "learned" / "h.json").read_text() == "{}"
    with pytest.raises(ValueError):
        store.path("../escape")


def test_write_json_never_follows_a_symlink_and_fixes_a_leftover_mode(tmp_path):
    path = str(tmp_path / "state.json")
    target = tmp_path / "victim"
    target.write_text("untouched")
    # A symlink where the temporary file goes: refused, the target untouched.
    os.symlink(target, f"{path}.tmp-{os.getpid()}")
    with pytest.raises(OSError):
        write_json(path, "{}", sync=True)
    assert target.read_text() == "untouched" and not os.path.exists(path)
    os.unlink(f"{path}.tmp-{os.getpid()}")
    # A leftover temporary file others could read: the written file is 0600 all the same.
    leftover = f"{path}.tmp-{os.getpid()}"
    with open(leftover, "w") as fh:
        fh.write("old")
    os.chmod(leftover, 0o644)
    write_json(path, "{}", sync=False)
    assert mode(path) == 0o600 and open(path).read() == "{}"
    # Loading through a symlink is refused too (a StoreError, an OSError).
    store = FileStore(str(tmp_path))
    os.makedirs(tmp_path / "controller")
    os.symlink(target, tmp_path / "controller" / "state.json")
    with pytest.raises(StoreError, match="cannot read"):
        store.load("state")


def test_without_a_lease_the_store_is_the_files(tmp_path):
    cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_STATE_DIR": str(tmp_path)})
    store = make_store(cfg)
    assert isinstance(store, FileStore) and store.path("state") == str(tmp_path / "controller" / "state.json")


# --- DynamoDB -----------------------------------------------------------------------------------


@pytest.fixture
def dynamo(moto_endpoint):
    table = f"helix-state-{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        {
            "HELIX_ENV_FILE": "",
            **CREDENTIALS,
            "HELIX_LEASE": f"dynamodb:{table}",
            "HELIX_DYNAMODB_ENDPOINT_URL": moto_endpoint,
            "HELIX_LEASE_CREATE_TABLE": "1",
            "HELIX_MANAGER_ID": "m1",
        }
    )
    client = dynamodb_client(cfg)
    ensure_table(client, table, create=True)
    return cfg, client, table


def test_dynamodb_store_round_trip(dynamo):
    cfg, client, table = dynamo
    store = DynamoDbStore(client, table, "web", lambda: 3)
    assert store.load("state") is None
    state = json.dumps({"intents": [{"token": "t-1", "count": 2}], "suspended": ["Launch"]})
    store.save("state", state, durable=True)
    store.save("history", "{}", durable=False)
    assert store.load("state") == state and store.load("history") == "{}"
    item = client.get_item(TableName=table, Key={"pk": {"S": "state#web#state"}}, ConsistentRead=True)["Item"]
    assert item["epoch"] == {"N": "3"} and item["size"] == {"N": str(len(state))}
    assert zlib.decompress(item["data"]["B"]).decode() == state
    # Another group's texts are another item.
    assert DynamoDbStore(client, table, "api", lambda: 3).load("state") is None


def test_a_large_history_is_compressed(dynamo):
    _, client, table = dynamo
    store = DynamoDbStore(client, table, "web", lambda: 1)
    # Sixty days of the predictive policy's per-minute memory: 600 KB of JSON, over an item's 400 KB.
    memory, rng = SeasonalMemory(60), random.Random(14)
    for t in range(0, 60 * 86400, 60):
        memory.remember(t, 6 + 4 * math.sin(t / 86400 * 2 * math.pi) + rng.gauss(0, 0.3))
    history = json.dumps(memory.export())
    assert len(history) > 500_000
    store.save("history", history, durable=True)
    assert store.load("history") == history
    item = client.get_item(TableName=table, Key={"pk": {"S": "state#web#history"}})["Item"]
    assert len(item["data"]["B"]) <= MAX_COMPRESSED < len(history)


def test_an_oversize_text_is_refused_in_one_line_and_nothing_is_written(dynamo):
    _, client, table = dynamo
    store = DynamoDbStore(client, table, "web", lambda: 1)
    store.save("history", "{}", durable=True)
    noise = base64.b64encode(random.Random(7).randbytes(400_000)).decode()  # does not compress
    with pytest.raises(StoreError) as refused:
        store.save("history", json.dumps({"noise": noise}), durable=True)
    assert not isinstance(refused.value, StaleEpoch)
    message = str(refused.value)
    assert "history" in message and f"over the {MAX_COMPRESSED}" in message and "400 KB" in message
    assert "\n" not in message
    assert store.load("history") == "{}"


def test_a_stale_epoch_never_overwrites_a_newer_leaders_state(dynamo):
    _, client, table = dynamo
    epochs = {"old": 4, "new": 5}
    old = DynamoDbStore(client, table, "web", lambda: epochs["old"])
    new = DynamoDbStore(client, table, "web", lambda: epochs["new"])
    old.save("state", '{"by": "old"}', durable=True)  # nothing stored yet: any epoch writes
    new.save("state", '{"by": "new"}', durable=True)  # a newer epoch overwrites
    with pytest.raises(StaleEpoch) as refused:
        old.save("state", '{"by": "old, deposed"}', durable=True)
    assert str(refused.value) == (
        "refused to save the state: the store holds one written under lease epoch 5, "
        "this manager's is 4 (another manager leads now)"
    )
    assert isinstance(refused.value, StoreError) and isinstance(refused.value, OSError)
    assert new.load("state") == '{"by": "new"}'
    new.save("state", '{"by": "new", "again": 1}', durable=False)  # the same epoch: its own renewals
    epochs["old"] = 6  # the old manager leads again, under a newer epoch
    old.save("state", '{"by": "old, leader again"}', durable=True)
    assert new.load("state") == '{"by": "old, leader again"}'
    # A manager holding no lease saves nothing, not even where nothing is stored.
    with pytest.raises(StaleEpoch, match="holds no lease"):
        DynamoDbStore(client, table, "web", lambda: 0).save("history", "{}", durable=True)
    assert new.load("history") is None


def test_the_store_follows_the_fence_epoch_and_reports_an_unreachable_store(dynamo):
    cfg, client, table = dynamo
    lease = DynamoDbLease(client, table, cfg.group_name, "m1", cfg.lease_ttl)
    fence = LeaseFence(lease, cfg.lease_ttl, cfg.lease_clock_margin)
    store = make_store(cfg, fence)
    assert isinstance(store, DynamoDbStore) and store.client is client
    with pytest.raises(StaleEpoch):  # not started: no lease
        store.save("state", "{}", durable=True)
    fence.renew_now()
    assert fence.may_act() == "" and fence.epoch == 1
    store.save("state", "{}", durable=True)
    fence.stop(release=True)
    with pytest.raises(ValueError, match="fence"):
        make_store(cfg)

    nowhere = {
        **CREDENTIALS,
        "HELIX_LEASE": cfg.lease,
        "HELIX_DYNAMODB_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    }
    dead = DynamoDbStore(dynamodb_client(load_config({"HELIX_ENV_FILE": "", **nowhere})), table, "web", lambda: 1)
    for attempt in (lambda: dead.load("state"), lambda: dead.save("state", "{}", durable=True)):
        with pytest.raises(StoreError) as failed:
            attempt()
        assert not isinstance(failed.value, StaleEpoch) and "\n" not in str(failed.value)
