"""Events: one JSON POST per activity to HELIX_WEBHOOK_URL, from a bounded queue by one sender thread.

`emit` never blocks and never raises: it puts the event on the queue (the oldest is dropped, and
counted, when the queue is full) and returns. The sender POSTs the events in order; a failure (no
connection, no answer within HELIX_WEBHOOK_TIMEOUT, a status other than 2xx) is retried with
exponential back-off and jitter (1 s doubling up to 60 s) while the event stays at the head of
the queue: delivery is in order and at least once. Each body carries the event plus `group`, a
`sequence` number (a gap means events were dropped) and an `id` (the same on every retry, for the
receiver to deduplicate), signed with HELIX_WEBHOOK_SECRET as
`X-Helix-Signature: sha256=<hex HMAC-SHA256 of the body>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.client
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from controller_asg.activity import Activity
from shared.config import Config

log = logging.getLogger("controller_asg")

RETRY_FIRST = 1.0  # seconds before the first retry; doubled after each failure ...
RETRY_MAX = 60.0  # ... up to this
MAX_RESPONSE = 64 * 1024  # bytes of an answer read (and ignored): the status is what counts


@dataclasses.dataclass(eq=False)
class _Pending:
    sequence: int
    body: bytes
    orphaned: bool = False  # pushed out of a full queue while in flight: dropped unless that POST succeeds


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: urllib would follow a 302 to a POST with a GET without the body."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookSink:
    def __init__(
        self,
        url: str,
        *,
        secret: str = "",
        queue_size: int = 1000,
        timeout: float = 5.0,
        group: str = "helix",
        clock: Callable[[], float] = time.time,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
        logger: logging.Logger | None = None,
    ):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size}: expected 1 or more")
        self.url = url
        self.queue_size = queue_size
        self.timeout = timeout
        self.group = group
        self.clock = clock
        self.retry_first = retry_first
        self.retry_max = retry_max
        self.log = logger or log
        self._secret = secret.encode("utf-8")
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._rng = random.Random()
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._sequence = 0
        self._sent = 0
        self._failed_attempts = 0
        self._dropped = 0
        self._closing = False
        self._abandoned = False  # close() gave up waiting: the sender stops at its next step
        self._deadline = math.inf  # time.monotonic() past which a closing sender gives up
        self._thread: threading.Thread | None = None
        self._inflight: _Pending | None = None
        self._emit_failed = False

    # -- counters -----------------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Events delivered (a 2xx answer)."""
        with self._cond:
            return self._sent

    @property
    def failed_attempts(self) -> int:
        """POSTs that failed (each retry counts)."""
        with self._cond:
            return self._failed_attempts

    @property
    def dropped(self) -> int:
        """Events given up on: pushed out of a full queue (the one in flight then, if its POST
        fails), emitted after close, or not encodable."""
        with self._cond:
            return self._dropped

    @property
    def queued(self) -> int:
        """Events waiting, the one being sent included."""
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> bool:
        """The sender thread is alive (after close() gave up, until its last POST returns)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- the caller's side --------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (once; again is a no-op)."""
        with self._cond:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
            self._thread.start()

    def emit(self, event: Mapping[str, Any]) -> None:
        """Queue `event` for delivery. Never blocks on the network, never raises."""
        try:
            with self._cond:
                self._sequence += 1
                if self._closing:
                    self._dropped += 1
                    return
                body = {**event, "group": self.group, "sequence": self._sequence, "id": str(uuid.uuid4())}
                item = _Pending(self._sequence, json.dumps(body, separators=(",", ":"), default=str).encode())
                if len(self._queue) >= self.queue_size:
                    oldest = self._queue.popleft()
                    if oldest is self._inflight:
                        oldest.orphaned = True  # counted once its POST ends, as sent or dropped
                    else:
                        self._dropped += 1
                self._queue.append(item)
                self._cond.notify_all()
        except Exception:
            with self._cond:
                self._dropped += 1
            if not self._emit_failed:
                self._emit_failed = True
                self.log.exception("webhook: an event could not be queued, dropped (logged once)")

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the sender: it tries to deliver what is queued for up to `timeout` seconds (a
        back-off in progress is cut short), then gives up. True if nothing was left undelivered."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout))
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()
            left, dropped = len(self._queue), self._dropped
        if left:
            self.log.warning("webhook: closing with %d events undelivered (%d dropped in all)", left, dropped)
        return left == 0

    # -- the sender thread --------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        failing_since: float | None = None
        dropped_before = 0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._abandoned or time.monotonic() >= self._deadline:
                    return
                item = self._inflight = self._queue[0]
                timeout = min(self.timeout, max(0.1, self._deadline - time.monotonic()))
            ok, reason = self._post(item, timeout)
            with self._cond:
                self._inflight = None
                if ok:
                    self._sent += 1
                    if not item.orphaned:
                        self._queue.popleft()  # still the head: only the sender takes the head off
                else:
                    self._failed_attempts += 1
                    if item.orphaned:
                        self._dropped += 1
                waiting, dropped = len(self._queue), self._dropped
            if ok:
                if failing_since is not None:
                    self.log.warning(
                        "webhook: delivering again after %.0f s of failures: %d events delivered late, "
                        "%d dropped meanwhile",
                        max(0.0, self.clock() - failing_since),
                        waiting + 1,
                        dropped - dropped_before,
                    )
                    failing_since = None
                attempt = 0
                continue
            if failing_since is None:
                failing_since, dropped_before = self.clock(), dropped
                self.log.warning(
                    "webhook: delivery failing (%s); retrying with back-off, events wait in the queue (at most %d)",
                    reason,
                    self.queue_size,
                )
            delay = min(self.retry_max, self.retry_first * 2**attempt) * self._rng.uniform(0.5, 1.0)
            attempt = min(attempt + 1, 32)
            with self._cond:
                if self._closing:  # flushing: keep trying until the deadline, never past it
                    delay = min(delay, self._deadline - time.monotonic())
                    if delay > 0:
                        self._cond.wait_for(lambda: self._abandoned, delay)
                else:  # close() cuts the back-off short: one more try at once, then its deadline
                    self._cond.wait_for(lambda: self._closing, delay)

    def _post(self, item: _Pending, timeout: float) -> tuple[bool, str]:
        """One POST of `item`: (delivered, why not)."""
        headers = {"Content-Type": "application/json", "User-Agent": "helix-controller"}
        if self._secret:
            digest = hmac.new(self._secret, item.body, hashlib.sha256).hexdigest()
            headers["X-Helix-Signature"] = f"sha256={digest}"
        request = urllib.request.Request(self.url, data=item.body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as resp:
                resp.read(MAX_RESPONSE)
            return True, ""
        except urllib.error.HTTPError as exc:
            exc.close()
            return False, f"HTTP {exc.code} {exc.reason}".rstrip()
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                return False, f"no answer within {timeout:g} s"
            return False, str(exc.reason)
        except TimeoutError:
            return False, f"no answer within {timeout:g} s"
        except (OSError, http.client.HTTPException) as exc:
            return False, str(exc) or type(exc).__name__
        except Exception as exc:  # the sender thread must never die
            self.log.debug("webhook: POST failed unexpectedly", exc_info=True)
            return False, repr(exc)


def event_from_activity(activity: Activity) -> dict[str, Any]:
    """The webhook event for an activity: its fields, `action` as `type`, its time as ISO 8601 UTC
    (`time`) and epoch seconds (`epoch`); fields added to Activity later come along as they are."""
    fields = dataclasses.asdict(activity)
    fields.pop("action")
    epoch = float(fields.pop("time"))
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"type": activity.action, "time": stamp, "epoch": epoch, **fields}


def activity_listener(sink: WebhookSink) -> Callable[[Activity], None]:
    """For ActivityLog.add_listener: every recorded activity becomes one webhook event."""

    def listen(activity: Activity) -> None:
        sink.emit(event_from_activity(activity))

    return listen


def make_sink(cfg: Config) -> WebhookSink | None:
    """The webhook sink HELIX_WEBHOOK_* configure, started; None when HELIX_WEBHOOK_URL is empty."""
    if not cfg.webhook_url:
        return None
    sink = WebhookSink(
        cfg.webhook_url,
        secret=cfg.webhook_secret,
        queue_size=cfg.webhook_queue,
        timeout=cfg.webhook_timeout,
        group=cfg.group_name,
    )
    sink.start()
    return sink
