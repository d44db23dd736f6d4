"""Where the controller keeps what must survive it (and, with HELIX_LEASE, move with the leader).

Two texts today, by name: "state" (state.json's JSON: launch intents, overrides, suspended
processes, refresh progress, the breaker, ...) and "history" (the policy's learned history).

  * FileStore: files on this host, as before the lease: `<state_dir>/controller/state.json` and the
    history file (HELIX_HISTORY_FILE, default `<state_dir>/history.json`); other names
    `<state_dir>/controller/<name>.json`. Written by `write_json`: write-then-rename, mode 0600,
    never through a symlink, fsync'd (file and directory) when durable.
  * DynamoDbStore: the lease's table, one item per text:
        pk        S  `state#<group>#<name>`
        data      B  the text, UTF-8, zlib-compressed (an item holds at most 400 KB: a text over
                     MAX_COMPRESSED bytes compressed is refused with one line, never truncated)
        epoch     N  the lease epoch of the manager that wrote it
        size      N  the text's length uncompressed (for operators)
        saved_at  N  wall-clock epoch seconds
    `save` is conditional on `attribute_not_exists(pk) OR epoch <= :epoch` (the writer's current
    lease epoch): a deposed leader can never overwrite what a newer leader saved (StaleEpoch). A
    manager holding no lease saves nothing (StaleEpoch too). Every acknowledged write is durable,
    so `durable` changes nothing there. `load` is a strongly consistent GetItem.

Any failure raises StoreError, an OSError (so a caller handling a file's OSError handles the store's
errors the same way): the controller must not launch when a durable save failed.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from controller_asg.lease import CONDITION_FAILED, LeaseError, LeaseFence, call, dynamodb_client
from shared.config import Config

NAMES = ("state", "history")
MAX_COMPRESSED = 350_000  # bytes: DynamoDB's item limit is 400 KB, key and attributes included
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class StoreError(OSError):
    """The store could not load or save (one line)."""


class StaleEpoch(StoreError):
    """A save refused: the stored text was written under a newer lease epoch than the writer's
    (another manager leads now), or the writer holds no lease."""


class StateStore(Protocol):
    def load(self, name: str) -> str | None:
        """The text saved under `name`, None if nothing was. Raises StoreError when unreadable."""
        ...

    def save(self, name: str, text: str, *, durable: bool) -> None:
        """Save `text` under `name`; raises (an OSError) on failure. `durable`: on stable storage
        before returning (a launch intent)."""
        ...


def _checked_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"state name {name!r}: expected a lower-case word")
    return name


def write_json(path: str, text: str, sync: bool = True) -> None:
    """Write-then-rename, so a crash mid-write leaves the old file, never half a new one. Mode 0600
    (the controller refuses state files others may read or write), never through a symlink; with
    `sync`, the file and then its directory are fsync'd before returning."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temporary file keeps its mode through O_TRUNC
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync:  # the rename itself survives a crash only once the directory is on disk
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class FileStore:
    """Today's files on this host (no lease)."""

    def __init__(self, state_dir: str, history_path: str = ""):
        self.state_dir = state_dir
        self.history_path = history_path or os.path.join(state_dir, "history.json")

    def path(self, name: str) -> str:
        if name == "history":
            return self.history_path
        return os.path.join(self.state_dir, "controller", f"{_checked_name(name)}.json")

    def load(self, name: str) -> str | None:
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as fh:
                return fh.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None

    def save(self, name: str, text: str, *, durable: bool) -> None:
        write_json(self.path(name), text, sync=durable)


class DynamoDbStore:
    """The texts in the lease's DynamoDB table, fenced by the writer's lease epoch."""

    def __init__(self, client: Any, table: str, group: str, epoch: Callable[[], int], *, limit: int = MAX_COMPRESSED):
        self.client = client
        self.table = table
        self.group = group
        self.epoch = epoch
        self.limit = limit

    def key(self, name: str) -> dict[str, dict[str, str]]:
        return {"pk": {"S": f"state#{self.group}#{_checked_name(name)}"}}

    def load(self, name: str) -> str | None:
        try:
            reply = call(self.client, "GetItem", TableName=self.table, Key=self.key(name), ConsistentRead=True)
        except LeaseError as exc:
            raise StoreError(f"cannot load the {name} from the DynamoDB table {self.table}: {exc}") from None
        item = reply.get("Item")
        if not item:
            return None
        try:
            return zlib.decompress(item["data"]["B"]).decode("utf-8")
        except (KeyError, TypeError, zlib.error, UnicodeDecodeError) as exc:
            raise StoreError(f"the {name} in the DynamoDB table {self.table} is unreadable ({exc})") from None

    def save(self, name: str, text: str, *, durable: bool) -> None:
        epoch = self.epoch()
        if epoch <= 0:
            raise StaleEpoch(f"not saving the {name} to the DynamoDB table {self.table}: this manager holds no lease")
        raw = text.encode("utf-8")
        data = zlib.compress(raw, 6)
        if len(data) > self.limit:
            raise StoreError(
                f"cannot save the {name} to the DynamoDB table {self.table}: {len(data)} bytes compressed "
                f"({len(raw)} raw), over the {self.limit} a DynamoDB item may hold here (400 KB at most)"
            )
        try:
            call(
                self.client,
                "PutItem",
                TableName=self.table,
                Item={
                    **self.key(name),
                    "data": {"B": data},
                    "epoch": {"N": str(epoch)},
                    "size": {"N": str(len(raw))},
                    "saved_at": {"N": repr(round(time.time(), 3))},
                },
                ConditionExpression="attribute_not_exists(pk) OR #e <= :epoch",
                ExpressionAttributeNames={"#e": "epoch"},
                ExpressionAttributeValues={":epoch": {"N": str(epoch)}},
            )
        except LeaseError as exc:
            if exc.code == CONDITION_FAILED:
                theirs = self._stored_epoch(name)
                raise StaleEpoch(
                    f"refused to save the {name}: the store holds one written under lease epoch {theirs}, "
                    f"this manager's is {epoch} (another manager leads now)"
                ) from None
            raise StoreError(f"cannot save the {name} to the DynamoDB table {self.table}: {exc}") from None

    def _stored_epoch(self, name: str) -> str:
        try:
            reply = call(
                self.client,
                "GetItem",
                TableName=self.table,
                Key=self.key(name),
                ConsistentRead=True,
                ProjectionExpression="#e",
                ExpressionAttributeNames={"#e": "epoch"},
            )
            return str(reply.get("Item", {}).get("epoch", {}).get("N", "?"))
        except LeaseError:
            return "?"


def make_store(cfg: Config, fence: LeaseFence | None = None) -> StateStore:
    """FileStore without HELIX_LEASE; with it, the lease's table (its client when `fence` is over a
    DynamoDbLease), fenced by `fence.epoch`."""
    if not cfg.lease:
        return FileStore(cfg.state_dir, cfg.history_file)
    if fence is None:
        raise ValueError("HELIX_LEASE is set: the state store needs the lease's fence (its epoch)")
    client = getattr(fence.lease, "client", None) or dynamodb_client(cfg)
    return DynamoDbStore(client, cfg.lease_table, cfg.group_name, lambda: fence.epoch)
