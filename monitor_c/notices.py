"""What EC2 announces to this instance through its metadata (Spot): an interruption (the
`spot/instance-action` document: terminate, stop or hibernate at a given time) or a rebalance
recommendation (`events/recommendations/rebalance`). Both answer 404 until there is something to say.

Only on EC2: the agent polls every POLL_SECONDS when HELIX_IMDS_URL is set and its identity came
from IMDS. The latest notice goes into every Metrics message (`notice`, `notice_at`), so MonitorS
and the controller see it within a poll. An interruption wins over a rebalance recommendation.
IMDS not answering never breaks polling: the last known notice stays, and the failure is logged
once per change (and once when IMDS answers again).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from monitor_c.identity import IMDS_TIMEOUT, TOKEN_TTL

if TYPE_CHECKING:
    import http.client

POLL_SECONDS = 5.0
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_PATH = "/latest/api/token"
# A token is used until shortly before it expires, then fetched again (or at once after a 401).
_TOKEN_REUSE = float(TOKEN_TTL) - 60.0


class Notice(enum.IntEnum):
    """As the Notice enum in protos/helix.proto (same values)."""

    NONE = 0
    REBALANCE = 1
    INTERRUPTION = 2


@dataclass(frozen=True)
class NoticeState:
    notice: Notice = Notice.NONE
    at: float = 0.0  # INTERRUPTION: when it is due (seconds since the epoch); 0 otherwise or when not said
    detail: str = ""  # for the log: what EC2 said


class ImdsError(Exception):
    """IMDS did not answer, or answered something other than 200 or 404."""


class ImdsClient:
    """IMDSv2 GETs that tell "not there" (404: None) from "not answering" (ImdsError), with the
    session token kept for its life. monitor_c.identity.imds_lookup asks once at start and folds
    every failure into "no answer"; polling needs the difference, and one token for many polls."""

    def __init__(self, base_url: str, timeout: float = IMDS_TIMEOUT):
        url = urlsplit(base_url)
        if not url.hostname:
            raise ValueError(f"HELIX_IMDS_URL={base_url}: expected http://host[:port]")
        self.host, self.port = url.hostname, url.port or 80
        self.timeout = timeout
        self._token = ""
        self._token_at = 0.0

    def get_many(self, paths: list[str], stop_at_first: bool = False) -> dict[str, str | None]:
        """Each path's body (None for 404), over one connection; `stop_at_first`: stop after the
        first path that is there."""
        import http.client  # only on EC2: it drags in the email package

        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        out: dict[str, str | None] = {}
        try:
            for path in paths:
                out[path] = self._get(conn, path)
                if stop_at_first and out[path] is not None:
                    break
        except (OSError, http.client.HTTPException) as exc:
            raise ImdsError(f"{type(exc).__name__}: {exc}"[:120]) from None
        finally:
            conn.close()
        return out

    def _get(self, conn: http.client.HTTPConnection, path: str) -> str | None:
        status, body = self._request(conn, "GET", path, {"X-aws-ec2-metadata-token": self._session_token(conn)})
        if status == 401:  # the token expired (or IMDS restarted): once more with a new one
            self._token = ""
            status, body = self._request(conn, "GET", path, {"X-aws-ec2-metadata-token": self._session_token(conn)})
        if status == 200:
            return body
        if status == 404:
            return None
        raise ImdsError(f"GET {path}: HTTP {status}")

    def _session_token(self, conn: http.client.HTTPConnection) -> str:
        if self._token and time.monotonic() - self._token_at < _TOKEN_REUSE:
            return self._token
        status, body = self._request(conn, "PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL})
        if status != 200 or not body.strip():
            raise ImdsError(f"PUT {TOKEN_PATH}: HTTP {status}")
        self._token, self._token_at = body.strip(), time.monotonic()
        return self._token

    @staticmethod
    def _request(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")


def _epoch(text: object) -> float:
    """An ISO 8601 time ("2026-11-30T05:10:00Z") as seconds since the epoch; 0 when it is not one."""
    if not isinstance(text, str):
        return 0.0
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # IMDS speaks UTC
    return when.timestamp()


def _document(body: str) -> dict:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def parse_notice(action_body: str | None, rebalance_body: str | None) -> NoticeState:
    """The notice the two documents make (None: that one answered 404). A document that is there
    but unreadable still counts: EC2 said something, just not when."""
    if action_body is not None:
        doc = _document(action_body)
        action = str(doc.get("action", "?"))[:16]
        at = _epoch(doc.get("time"))
        when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at else "an unknown time"
        return NoticeState(Notice.INTERRUPTION, at, f"{action} at {when}")
    if rebalance_body is not None:
        notice_time = str(_document(rebalance_body).get("noticeTime", "?"))[:32]
        return NoticeState(Notice.REBALANCE, 0.0, f"rebalance recommended at {notice_time}")
    return NoticeState()


class NoticeWatcher:
    """Polls IMDS for notices; `current` is the latest one known (NONE until one is seen)."""

    def __init__(self, imds_url: str, log: logging.Logger, interval: float = POLL_SECONDS):
        self.client = ImdsClient(imds_url)
        self.log = log
        self.interval = interval
        self.current = NoticeState()
        self._error = ""  # the IMDS failure last logged; "" while IMDS answers

    def read(self) -> NoticeState:
        """One look at IMDS (blocking: run it in a thread); ImdsError when it does not answer."""
        # Interruption first: when there is one, the rebalance document does not matter.
        bodies = self.client.get_many([ACTION_PATH, REBALANCE_PATH], stop_at_first=True)
        return parse_notice(bodies.get(ACTION_PATH), bodies.get(REBALANCE_PATH))

    def apply(self, found: NoticeState | ImdsError) -> None:
        """Take one look's outcome: a new notice is logged once, a failure once per change."""
        if isinstance(found, ImdsError):
            if str(found) != self._error:
                self._error = str(found)
                self.log.warning(
                    "EC2 notices: IMDS did not answer (%s); keeping the last known notice, %s",
                    found,
                    self.current.notice.name,
                )
            return
        if self._error:
            self._error = ""
            self.log.info("EC2 notices: IMDS answers again")
        if found == self.current:
            return
        if found.notice == Notice.NONE:
            self.log.info("EC2 notice cleared (was %s: %s)", self.current.notice.name, self.current.detail)
        else:
            due = f", due in {found.at - time.time():.0f}s" if found.at else ""
            self.log.warning("EC2 notice: %s (%s%s)", found.notice.name, found.detail, due)
        self.current = found

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            try:
                found: NoticeState | ImdsError = await asyncio.to_thread(self.read)
            except ImdsError as exc:
                found = exc
            self.apply(found)
            await asyncio.sleep(self.interval)


__all__ = ["POLL_SECONDS", "ImdsClient", "ImdsError", "Notice", "NoticeState", "NoticeWatcher", "parse_notice"]
