"""The leader lease (HELIX_LEASE=dynamodb:<table>): at most one manager acts for a group at a time.

Managers compete for one item per group in a DynamoDB table with conditional writes; the holder
renews it every quarter of HELIX_LEASE_TTL, the others are warm standbys that take it once it has
expired (or at once when the holder released it on a clean shutdown).

The item (key `pk`, a string, the table's HASH key):
    pk          S  `lease#<group>`
    holder      S  the holder's manager id (HELIX_MANAGER_ID, default the host name)
    epoch       N  +1 on every change of holder (a takeover, or a re-acquisition after a release
                   or an expiry); a renewal keeps it; it never decreases (the item is never deleted)
    expires_at  N  wall-clock epoch seconds, by the writer's clock: renewal time + TTL (0: released)
    renewed_at  N  when it was last written
    nonce       S  this process's random id: an acquisition whose reply was lost is recognised as
                   ours on the next attempt (two processes sharing a manager id are never confused);
                   removed on release, so taking the lease again after a release is a new epoch

Acquire: UpdateItem on `attribute_not_exists(pk) OR expires_at < :now`, epoch = old + 1 (a
standby reads first and tries only when the lease is free or expired: a read costs a fifth of a
write). Renew: UpdateItem on `holder = :me AND epoch = :epoch`. Release: expires_at = 0 on the same
condition (the item stays: its epoch must never go back). A ConditionalCheckFailedException means
another manager holds it: an answer, not an error.

Fencing (`LeaseFence.may_act`): a holder acts only while BOTH its monotonic clock and its wall
clock are below (the time the last successful renewal request was SENT) + TTL - HELIX_LEASE_CLOCK_MARGIN.
Counting from the send (not the reply) means a slow or lost reply never extends the lease; the
margin covers the clock drift between the holder and the manager that compares `expires_at` with
its own wall clock to take over; the monotonic check stops a process paused past its lease
(SIGSTOP) the moment it wakes, and the wall-clock check covers a whole VM paused (whose monotonic
clock may not advance). So a holder cut off from the store stops acting before the lease can be
taken elsewhere. What the holder saves in the store is fenced too (controller_asg/statestore.py):
a write under an older epoch than the stored one is refused.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.config import Config, ConfigError

log = logging.getLogger("controller_asg.lease")

# Every DynamoDB operation this module and controller_asg/statestore.py call; the policy
# controller_asg/iam.py generates allows exactly these (CreateTable only with HELIX_LEASE_CREATE_TABLE).
OPERATIONS = ("DescribeTable", "GetItem", "PutItem", "UpdateItem")
CREATE_OPERATIONS = ("CreateTable",)
CONDITION_FAILED = "ConditionalCheckFailedException"
# A call to the store never takes more than a fraction of the TTL: connect and read timeouts of at
# most 2 s and 3 s, and TTL / 5 each with a short TTL; one attempt per call (the fence tries again
# every TTL / 4; the controller's next step retries a failed save). Validity is counted from when a
# renewal was sent, so a slow call is never unsafe, at worst a missed renewal.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
ATTEMPTS = 1
TABLE_ACTIVE_TIMEOUT = 120.0  # a new on-demand table is ACTIVE within seconds on AWS


class LeaseError(Exception):
    """The store could not answer (unreachable, throttled, refused): one line; `code` is AWS's error
    code when there was one."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class LeaseTableMissing(LeaseError):
    """The table does not exist and may not be created: a configuration error (one line)."""


@dataclass(frozen=True)
class LeaseView:
    holder: str  # '' when nobody ever held it
    epoch: int
    expires_at: float  # the store's wall-clock epoch seconds (0: released)
    mine: bool


NOBODY = LeaseView("", 0, 0.0, False)


class Lease(Protocol):
    """A lease backend (DynamoDB today; etcd or Consul could follow)."""

    @property
    def holder(self) -> str:
        """This manager's name in the lease."""
        ...

    def try_acquire(self, now: float, renew: bool = True) -> LeaseView:
        """Take the lease when free or expired at `now` (wall-clock epoch seconds), or renew it when
        held by us (unless `renew` is False: then only take it anew); never overwrites another live
        holder. Raises LeaseError when the store cannot answer."""
        ...

    def release(self) -> None:
        """Give the lease up if it is ours (a clean shutdown hands over at once)."""
        ...

    def read(self) -> LeaseView:
        """Who holds it (strongly consistent)."""
        ...


def call(client: Any, operation: str, **params: Any) -> dict:
    """One DynamoDB call; any botocore error becomes a one-line LeaseError (code: AWS's)."""
    from botocore import xform_name
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        reply: dict = getattr(client, xform_name(operation))(**params)
        return reply
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "") or "Unknown")
        message = " ".join(str(error.get("Message", "")).split())[:300]
        raise LeaseError(f"{operation}: {code}: {message}", code) from None
    except BotoCoreError as exc:  # no connection, a timeout: the class says what
        raise LeaseError(f"{operation}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def store_timeouts(ttl: float) -> tuple[float, float]:
    """(connect, read) timeouts for a store whose lease lasts `ttl` seconds."""
    return min(CONNECT_TIMEOUT, ttl / 5), min(READ_TIMEOUT, ttl / 5)


def dynamodb_client(cfg: Config) -> Any:
    """A DynamoDB client from Helix's one boto3 session (controller_asg/providers/aws.py), at
    HELIX_DYNAMODB_ENDPOINT_URL when set (else boto3's own AWS_ENDPOINT_URL_DYNAMODB, else AWS),
    with short timeouts and no retry of its own (see ATTEMPTS)."""
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import NoRegionError

    from controller_asg.providers.aws import aws_session

    connect, read = store_timeouts(cfg.lease_ttl)
    extra: dict[str, Any] = {}
    if cfg.dynamodb_endpoint_url:  # only then: boto3 reads AWS_ENDPOINT_URL_DYNAMODB itself
        extra["endpoint_url"] = cfg.dynamodb_endpoint_url
    try:
        return aws_session(cfg).client(
            "dynamodb",
            config=BotoConfig(
                connect_timeout=connect,
                read_timeout=read,
                retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
                user_agent_extra="helix-controller",
            ),
            **extra,
        )
    except NoRegionError:
        raise ConfigError(
            [f"HELIX_AWS_REGION=: expected the region of the lease table in HELIX_LEASE={cfg.lease}"]
        ) from None


def ensure_table(client: Any, table: str, create: bool) -> None:
    """The table exists with key `pk` (S, HASH), created (on demand billing) when missing and
    `create`; else LeaseTableMissing, one line naming the settings."""
    spec = f"HELIX_LEASE=dynamodb:{table}"
    try:
        desc = call(client, "DescribeTable", TableName=table)["Table"]
    except LeaseError as exc:
        if exc.code != "ResourceNotFoundException":
            raise
        if not create:
            raise LeaseTableMissing(
                f"{spec}: the table does not exist; create it (key pk, a string, HASH) "
                "or set HELIX_LEASE_CREATE_TABLE=1 to let Helix create it",
                exc.code,
            ) from None
        try:
            call(
                client,
                "CreateTable",
                TableName=table,
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
            log.info("lease: created the DynamoDB table %s", table)
        except LeaseError as created:
            if created.code != "ResourceInUseException":  # another manager is creating it
                raise
        desc = _wait_active(client, table)
    key = [(k.get("AttributeName"), k.get("KeyType")) for k in desc.get("KeySchema", [])]
    types = {a.get("AttributeName"): a.get("AttributeType") for a in desc.get("AttributeDefinitions", [])}
    if key != [("pk", "HASH")] or types.get("pk") != "S":
        raise LeaseTableMissing(f"{spec}: expected the table's key to be pk (a string, HASH), found {key}")
    if desc.get("TableStatus") not in ("ACTIVE", "UPDATING"):
        _wait_active(client, table)


def _wait_active(client: Any, table: str) -> dict:
    deadline = time.monotonic() + TABLE_ACTIVE_TIMEOUT
    while True:
        desc: dict = call(client, "DescribeTable", TableName=table)["Table"]
        if desc.get("TableStatus") == "ACTIVE":
            return desc
        if time.monotonic() > deadline:
            raise LeaseError(f"DescribeTable: the table {table} is still {desc.get('TableStatus')}")
        time.sleep(0.5)


def _num(value: float) -> dict[str, str]:
    return {"N": repr(round(value, 3))}


class _Taken(Exception):
    """A conditional write was refused: someone else holds the lease."""


class DynamoDbLease:
    """The lease as one item of a DynamoDB table (see the module's docstring). Thread-safe."""

    def __init__(self, client: Any, table: str, group: str, holder: str, ttl: float, *, create_table: bool = False):
        if not holder:
            raise ValueError("a lease holder needs a name")
        self.client = client
        self.table = table
        self.group = group
        self._holder = holder
        self.ttl = ttl
        self.create_table = create_table
        self.key = {"pk": {"S": f"lease#{group}"}}
        self.nonce = uuid.uuid4().hex
        self._epoch = 0  # the epoch we hold (0: none)
        self._ready = False
        self._lock = threading.Lock()

    @property
    def holder(self) -> str:
        return self._holder

    def ensure_table(self) -> None:
        """Check (once) that the table exists, creating it when allowed (LeaseTableMissing if not)."""
        if not self._ready:
            ensure_table(self.client, self.table, self.create_table)
            self._ready = True

    def try_acquire(self, now: float, renew: bool = True) -> LeaseView:
        """`renew` False: the caller no longer trusts its hold (its renewals went unanswered past
        its validity): never extend the lease then, only take it anew (a new epoch) once expired.
        Otherwise a holder whose replies are lost would extend, forever, a lease it cannot use."""
        with self._lock:
            self.ensure_table()
            if self._epoch and not renew:
                self._epoch = 0
            if self._epoch:
                try:
                    return self._renew(now)
                except _Taken:
                    self._epoch = 0  # another manager changed the holder since
            item = self._get()
            view = self._view(item)
            if renew and item and view.holder == self._holder and _s(item, "nonce") == self.nonce:
                # Ours: an acquisition whose reply was lost (or retried). Renew it to learn when.
                self._epoch = view.epoch
                try:
                    return self._renew(now)
                except _Taken:
                    self._epoch = 0
                    view = self._view(self._get())
            if view.holder and view.expires_at >= now:
                return view  # a live holder: never overwritten
            try:
                return self._acquire(now)
            except _Taken:  # another standby was quicker
                return self._view(self._get())

    def release(self) -> None:
        with self._lock:
            if not self._epoch:
                return
            epoch, self._epoch = self._epoch, 0
            try:
                self._update(
                    "SET #x = :zero REMOVE #n",  # no nonce: taking it again is a new epoch
                    "#h = :me AND #e = :epoch",
                    {":zero": {"N": "0"}, ":me": {"S": self._holder}, ":epoch": {"N": str(epoch)}},
                )
            except _Taken:
                pass  # no longer ours: nothing to give up

    def read(self) -> LeaseView:
        with self._lock:
            self.ensure_table()
            return self._view(self._get())

    # -- the calls -------------------------------------------------------------------------------

    def _renew(self, now: float) -> LeaseView:
        expires = now + self.ttl
        self._update(
            "SET #x = :exp, #r = :now",
            "#h = :me AND #e = :epoch",
            {
                ":exp": _num(expires),
                ":now": _num(now),
                ":me": {"S": self._holder},
                ":epoch": {"N": str(self._epoch)},
            },
        )
        return LeaseView(self._holder, self._epoch, round(expires, 3), True)

    def _acquire(self, now: float) -> LeaseView:
        item = self._update(
            "SET #h = :me, #n = :nonce, #e = if_not_exists(#e, :zero) + :one, #x = :exp, #r = :now",
            "attribute_not_exists(pk) OR #x < :now",
            {
                ":me": {"S": self._holder},
                ":nonce": {"S": self.nonce},
                ":zero": {"N": "0"},
                ":one": {"N": "1"},
                ":exp": _num(now + self.ttl),
                ":now": _num(now),
            },
        )
        self._epoch = int(_n(item, "epoch"))
        return self._view(item)

    def _update(self, update: str, condition: str, values: dict[str, Any]) -> dict:
        names = {"#h": "holder", "#e": "epoch", "#x": "expires_at", "#r": "renewed_at", "#n": "nonce"}
        used = {k: v for k, v in names.items() if k in update or k in condition}
        try:
            reply = call(
                self.client,
                "UpdateItem",
                TableName=self.table,
                Key=self.key,
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=used,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except LeaseError as exc:
            if exc.code == CONDITION_FAILED:
                raise _Taken from None
            raise _missing(exc, self.table) from None
        attributes: dict = reply.get("Attributes", {})
        return attributes

    def _get(self) -> dict | None:
        try:
            reply = call(self.client, "GetItem", TableName=self.table, Key=self.key, ConsistentRead=True)
        except LeaseError as exc:
            raise _missing(exc, self.table) from None
        item: dict | None = reply.get("Item")
        return item

    def _view(self, item: dict | None) -> LeaseView:
        if not item:
            return NOBODY
        holder, epoch = _s(item, "holder"), int(_n(item, "epoch"))
        return LeaseView(holder, epoch, _n(item, "expires_at"), holder == self._holder and epoch == self._epoch > 0)


def _s(item: dict, name: str) -> str:
    return str(item.get(name, {}).get("S", ""))


def _n(item: dict, name: str) -> float:
    try:
        return float(item.get(name, {}).get("N", "0"))
    except ValueError:
        return 0.0


def _missing(exc: LeaseError, table: str) -> LeaseError:
    """The table deleted under a running manager: the same one line as at start."""
    if exc.code == "ResourceNotFoundException":
        return LeaseTableMissing(
            f"HELIX_LEASE=dynamodb:{table}: the table does not exist (any more); recreate it "
            "or set HELIX_LEASE_CREATE_TABLE=1",
            exc.code,
        )
    return exc


# -- the fence -----------------------------------------------------------------------------------


class LeaseFence:
    """hostlock.Fence over a Lease: a daemon thread renews (or tries to take) the lease every
    `period` (default TTL / 4, and once synchronously in `start`); `may_act()` is '' only while we
    hold it and it is valid by both clocks (see the module's docstring). Thread-safe.

    `on_change(view)` is called (from the fence's thread, or `stop`'s caller) whenever this manager
    becomes leader (view.mine: reload the store's state then) or stops being one (view.mine False):
    a lost lease, a lapsed one (store unreachable), a stop. `leader_changes` counts those calls.
    `renew_paused` is a test hook: while set, the thread makes no attempt (a frozen process)."""

    def __init__(
        self,
        lease: Lease,
        ttl: float,
        clock_margin: float,
        *,
        on_change: Callable[[LeaseView], None] | None = None,
        period: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        if not (ttl > 0 and 0 <= clock_margin < ttl / 2):
            raise ValueError(f"lease TTL {ttl:g} s and clock margin {clock_margin:g} s: expected margin < TTL / 2")
        written = getattr(lease, "ttl", ttl)  # what the lease writes: the fence may not count on more
        if ttl > written:
            raise ValueError(f"lease TTL {ttl:g} s: expected at most the {written:g} s the lease writes")
        self.lease = lease
        self.ttl = ttl
        self.margin = clock_margin
        self.period = ttl / 4 if period is None else period
        self.on_change = on_change
        self.renew_paused = threading.Event()
        self.leader_changes = 0
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._attempting = threading.Lock()  # one attempt at a time, its result applied in order
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._view: LeaseView | None = None
        self._epoch = 0
        self._valid_until = -math.inf  # monotonic
        self._valid_until_wall = -math.inf
        self._renewed_sent = -math.inf  # monotonic time the last successful renewal was sent
        self._error = ""
        self._leading = 0  # the epoch we act under as last reported (0: not leading)
        self._logged: tuple = ()  # the last state logged
        self._last_exc: Exception | None = None  # what the last attempt raised

    # -- what the controller asks ---------------------------------------------------------------

    def may_act(self) -> str:
        with self._lock:
            if self._acting():
                return ""
            if self._stopped:
                return "lease: stopped"
            if self._epoch:
                late = self._monotonic() - self._renewed_sent
                cause = self._trouble() if self._error else "its renewals are late"
                return f"lease not renewed for {late:.1f} s: {cause}"
            if self._error:
                return f"standby: {self._trouble()}"
            view = self._view
            if view is None:
                return "standby: no answer from the lease store yet"
            if view.holder and view.expires_at >= self._wall():
                return f"standby: manager {view.holder} holds the lease (epoch {view.epoch})"
            return "standby: the lease is free (taking it at the next attempt)"

    @property
    def epoch(self) -> int:
        """The epoch we hold (0 if none): what our store writes are fenced with."""
        with self._lock:
            return self._epoch

    @property
    def view(self) -> LeaseView | None:
        """The lease as last seen (None before the first answer)."""
        with self._lock:
            return self._view

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        """One attempt now (a missing table raises LeaseTableMissing: fatal), then the thread."""
        if self._thread is not None:
            return
        self.renew_now()
        with self._lock:
            if isinstance(self._last_exc, LeaseTableMissing):
                raise self._last_exc
        self._thread = threading.Thread(target=self._run, name="helix-lease", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop renewing; stop acting at once; with `release`, hand the lease over (a clean
        shutdown: a standby takes it at its next attempt instead of after the TTL)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * sum(store_timeouts(self.ttl)) * ATTEMPTS + 1)
        with self._lock:
            self._stopped = True
            epoch = self._epoch
            self._epoch = 0
        changed = self._check()
        if release and epoch:
            try:
                self.lease.release()
                log.info("lease: released (epoch %d): a standby may take it now", epoch)
            except LeaseError as exc:
                log.warning("lease: could not release it (%s): a standby takes it when it expires", exc)
        self._notify(changed)

    def renew_now(self) -> None:
        """One attempt to take or renew the lease (what the thread does every period)."""
        with self._attempting:
            self._attempt()

    def _attempt(self) -> None:
        sent, sent_wall = self._monotonic(), self._wall()
        view: LeaseView | None = None
        error = ""
        exc: Exception | None = None
        with self._lock:
            # Renew only while the last answered renewal still holds: see DynamoDbLease.try_acquire.
            renew = self._epoch == 0 or self._acting()
        try:
            view = self.lease.try_acquire(sent_wall, renew=renew)
        except LeaseError as failed:
            error, exc = str(failed), failed
        except Exception as failed:  # a bug must not kill the fence's thread: logged, retried
            log.exception("lease: unexpected error")
            error, exc = f"{type(failed).__name__}: {failed}", failed
        with self._lock:
            self._last_exc = exc
            if self._stopped:
                return
            if view is None:
                self._error = error
            else:
                self._error = ""
                self._view = view
                if view.mine:
                    self._epoch = view.epoch
                    self._renewed_sent = sent
                    self._valid_until = sent + self.ttl - self.margin
                    self._valid_until_wall = sent_wall + self.ttl - self.margin
                else:
                    self._epoch = 0
                    self._valid_until = self._valid_until_wall = -math.inf
        self._notify(self._check())

    def _run(self) -> None:
        next_at = self._monotonic() + self.period
        while not self._halt.is_set():
            now = self._monotonic()
            if now >= next_at:
                next_at = now + self.period
                if not self.renew_paused.is_set():
                    self.renew_now()
                    continue
            self._notify(self._check())  # a lapse is noticed (and logged) when it happens
            with self._lock:
                wake = next_at
                if self._acting():
                    wake = min(wake, self._valid_until)
            self._halt.wait(max(0.01, wake - self._monotonic()))

    # -- bookkeeping -----------------------------------------------------------------------------

    def _trouble(self) -> str:
        if isinstance(self._last_exc, LeaseTableMissing):
            return self._error  # a configuration error says it all
        return f"the lease store is unreachable ({self._error})"

    def _acting(self) -> bool:
        return (
            not self._stopped
            and self._epoch > 0
            and self._monotonic() < self._valid_until
            and self._wall() < self._valid_until_wall
        )

    def _check(self) -> LeaseView | None:
        """Log a change of leadership (once), and return the view to report when we became or
        stopped being the leader (else None)."""
        with self._lock:
            leading = self._epoch if self._acting() else 0
            view = self._view or NOBODY
            me = self.lease.holder
            if leading:
                state: tuple = ("leader", leading)
                line = f"lease: {me} acquired it, epoch {leading}: acting"
            elif self._stopped:
                state, line = ("stopped",), ""
            elif self._epoch or self._error:
                state = ("unreachable",)
                line = f"lease: {self._trouble() if self._error else 'renewals are late'}: " + (
                    "not acting" if self._leading or self._epoch else "standing by"
                )
            elif view.holder:
                state = ("standby", view.holder, view.epoch)
                line = (
                    f"lease: lost to {view.holder} (epoch {view.epoch}): standing by"
                    if self._leading
                    else f"lease: {view.holder} holds it (epoch {view.epoch}): standing by"
                )
            else:
                state, line = ("free",), ""
            if state != self._logged:
                self._logged = state
                if line:
                    (log.info if leading or state[0] != "unreachable" else log.warning)("%s", line)
            if leading == self._leading:
                return None
            self._leading = leading
            self.leader_changes += 1
            if leading:
                return view
            return LeaseView(view.holder, view.epoch, view.expires_at, False)

    def _notify(self, view: LeaseView | None) -> None:
        if view is not None and self.on_change is not None:
            try:
                self.on_change(view)
            except Exception:  # the controller's bug must not stop the renewals
                log.exception("lease: on_change failed")


def make_lease(cfg: Config) -> DynamoDbLease | None:
    """The lease HELIX_LEASE names (None without one). Makes no call: `LeaseFence.start` (or
    `ensure_table`) checks the table."""
    if not cfg.lease:
        return None
    return DynamoDbLease(
        dynamodb_client(cfg),
        cfg.lease_table,
        cfg.group_name,
        cfg.effective_manager_id,
        cfg.lease_ttl,
        create_table=cfg.lease_create_table,
    )


def make_fence(cfg: Config, lease: Lease, on_change: Callable[[LeaseView], None] | None = None) -> LeaseFence:
    """The fence over `lease` with HELIX_LEASE_TTL and HELIX_LEASE_CLOCK_MARGIN (not started)."""
    return LeaseFence(lease, cfg.lease_ttl, cfg.lease_clock_margin, on_change=on_change)
