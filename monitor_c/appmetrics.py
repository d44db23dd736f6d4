"""The app's own request rate: HELIX_APP_METRICS_NAME, a counter on the app's Prometheus text
endpoint HELIX_APP_METRICS_URL, read when the agent samples and reported as requests/s (`rps`).

When. A reading is taken as part of a GetMetrics call or a WatchMetrics tick (never on a timer of
its own: an agent nobody polls costs the app nothing), at most once per MIN_GAP seconds (and not
within MIN_GAP/2 of the previous answer), one at a time. The fetch and the parse run in a worker
thread, so the agent's event loop never blocks on the app; the poll waits for them only a short
share of its interval (WAIT_SHARE, at most WAIT_MAX s), so a slow endpoint never makes a poll slow:
that poll reports the last rate and the reading lands for the next one.

The rate rules (`RateTracker`):
  - rate = rise of the counter / time between the two readings (the agent's monotonic clock);
  - the first reading gives no rate yet: 0 is reported until the second;
  - a counter that went down (the app restarted) gives no rate: the last rate is reported again,
    and the new value is the base for the next one, so a rate is never negative;
  - a sampling without a good reading (the fetch failed, or the previous one still hangs) is a
    miss: the last rate is reported through the misses, and from the HOLD_MISSES-th in a row on 0,
    until a good reading.

The counter is summed over all its label sets; `name` and `name_total` both find it, and only a
counter counts (a gauge or untyped metric is refused: its rate would mean nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from shared.config import PORT_PLACEHOLDER

if TYPE_CHECKING:
    import http.client

MIN_GAP = 0.5  # seconds: at most one reading per this, however often the agent is polled
FETCH_TIMEOUT = 1.0  # seconds per socket operation of one fetch
HOLD_MISSES = 3  # samplings in a row without a reading after which the rate reads 0
MAX_BODY = 8 * 1024 * 1024  # bytes: an exposition larger than this is refused, not parsed
WAIT_SHARE, WAIT_MAX = 0.2, 0.2  # a poll waits for its reading this share of its interval, at most WAIT_MAX s


class MetricsError(Exception):
    """The endpoint answered, but not with a usable counter; the message is the log's detail."""


def counter_total(text: str, name: str) -> float:
    """The counter `name` in a Prometheus text exposition, summed over its label sets. Raises
    MetricsError when it is missing, not a counter or not a finite non-negative count, and
    ValueError when the text does not parse."""
    # Imported here: prometheus_client is heavy and the agent's import path stays light (only an
    # agent with HELIX_APP_METRICS_URL set ever needs it, and then in its worker thread).
    from prometheus_client.parser import text_string_to_metric_families

    base = name.removesuffix("_total")
    wanted = {base, base + "_total"}
    families = list(text_string_to_metric_families(text))
    counters = {f.name for f in families if f.type == "counter"}
    total, found, other = 0.0, False, ""
    for family in families:
        # The parser names a counter's family without `_total` and its samples with it. A `# TYPE x
        # counter` line over `x_total` samples (text format 0.0.4 wants the same name in both) leaves
        # the samples in an untyped family of their own: the TYPE line still says they count.
        if (family.type == "counter" and family.name == base) or (
            family.type == "unknown" and family.name == base + "_total" and base in counters
        ):
            found = True
            total += sum(s.value for s in family.samples if s.name in wanted)
        elif family.name in wanted:
            other = family.type
    if not found:
        if other:
            kind = "untyped" if other == "unknown" else f"a {other}"
            raise MetricsError(f"{name} is {kind}, expected a counter")
        raise MetricsError(f"no counter {name} in the exposition")
    if not (math.isfinite(total) and total >= 0):
        raise MetricsError(f"{name} = {total!r}, expected a finite count of 0 or more")
    return total


class RateTracker:
    """Readings and misses in, a rate out (the rules are in the module docstring)."""

    def __init__(self) -> None:
        self.rate = 0.0
        self.misses = 0
        self._last: tuple[float, float] | None = None  # (counter, monotonic time) of the last reading

    def reading(self, value: float, at: float) -> str:
        """Take a good reading; returns what it did: "first", "reset" or "rate"."""
        last, self._last = self._last, (value, at)
        self.misses = 0
        if last is None:
            return "first"
        if value < last[0] or at <= last[1]:
            return "reset"
        self.rate = (value - last[0]) / (at - last[1])
        return "rate"

    def miss(self) -> bool:
        """A sampling without a good reading; True when this one turns the rate to 0."""
        self.misses += 1
        if self.misses == HOLD_MISSES:
            self.rate = 0.0
            return True
        return False

    @property
    def last_value(self) -> float | None:
        return self._last[0] if self._last else None


class AppMetrics:
    """The agent's reader of one counter on one endpoint; `rate` is what Metrics.rps reports."""

    def __init__(self, url: str, name: str, log: logging.Logger):
        if PORT_PLACEHOLDER in url:
            raise ValueError(
                f"HELIX_APP_METRICS_URL={url}: expected the instance's own URL; {PORT_PLACEHOLDER} is filled "
                "in by the manager's local provider, not by the agent"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HELIX_APP_METRICS_URL={url}: expected an http(s)://host[:port]/path URL")
        self.url, self.name, self.log = url, name, log
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.tracker = RateTracker()
        self._task: asyncio.Task | None = None
        self._due_at = 0.0  # monotonic time before which no new sampling starts
        self._error = ""  # the current failure, logged once per change ("" while readings are good)

    @property
    def rate(self) -> float:
        return self.tracker.rate

    async def sample(self, interval: float) -> float:
        """One sampling, as a poll with the given interval takes it: start a reading if one is due
        and wait for it a short share of the interval; returns the rate to report."""
        now = time.monotonic()
        if now < self._due_at:
            return self.rate
        self._due_at = now + MIN_GAP
        if self._task is not None and not self._task.done():
            # The previous reading still hangs: this sampling got none. Not logged by itself (a
            # slow endpoint would flap the log); its timeout is, and so is the rate turning 0.
            self._missed(None)
            return self.rate
        self._task = asyncio.create_task(self._read())
        # shield: a poll that stops waiting leaves the reading running, for the next poll.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), min(WAIT_SHARE * interval, WAIT_MAX))
        return self.rate

    async def _read(self) -> None:
        try:
            value, at = await asyncio.to_thread(self._fetch)
        except MetricsError as exc:
            self._missed(str(exc))
        except Exception as exc:  # noqa: BLE001 - the network, TLS, HTTP or a parser that chokes: all a failed reading
            self._missed(_describe(exc))
        else:
            self._good(value, at)
        finally:
            # Nor within MIN_GAP/2 of this answer: after a slow answer, a fast one right behind it
            # would rate the counter over a few milliseconds.
            self._due_at = max(self._due_at, time.monotonic() + MIN_GAP / 2)

    def _fetch(self) -> tuple[float, float]:
        """Blocking (the worker thread): GET the exposition and sum the counter; returns it and the
        monotonic time the answer arrived."""
        import http.client  # only with HELIX_APP_METRICS_URL set: it drags in the email package

        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(self._host, self._port, timeout=FETCH_TIMEOUT)
            if self._tls
            else http.client.HTTPConnection(self._host, self._port, timeout=FETCH_TIMEOUT)
        )
        try:
            # The classic text format: an endpoint that also speaks OpenMetrics answers in this one.
            conn.request("GET", self._path, headers={"Accept": "text/plain;version=0.0.4", "User-Agent": "helix-agent"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise MetricsError(f"HTTP {resp.status}")
            body = resp.read(MAX_BODY + 1)
            at = time.monotonic()
        finally:
            conn.close()
        if len(body) > MAX_BODY:
            raise MetricsError(f"exposition larger than {MAX_BODY // (1024 * 1024)} MiB")
        return counter_total(body.decode("utf-8", "replace"), self.name), at

    def _good(self, value: float, at: float) -> None:
        before = self.tracker.last_value
        outcome = self.tracker.reading(value, at)
        if self._error:
            self._error = ""
            self.log.info("app metrics: %s answers again (%s = %g)", self.url, self.name, value)
        elif outcome == "reset":
            self.log.info(
                "app metrics: %s went down from %g to %g (app restarted?): reporting the last rate, %.3g/s",
                self.name,
                before,
                value,
                self.rate,
            )

    def _missed(self, detail: str | None) -> None:
        """A sampling without a reading: `detail` says why (None: the previous reading still runs)."""
        zeroed = self.tracker.miss()
        if detail is not None and detail != self._error:
            self._error = detail
            self.log.warning(
                "app metrics: %s: %s; %s",
                self.url,
                detail,
                "reporting 0 requests/s"
                if self.tracker.misses >= HOLD_MISSES
                else f"reporting the last rate ({self.rate:.3g}/s) for at most {HOLD_MISSES} intervals",
            )
        elif zeroed:
            self._error = self._error or "no reading"  # so that the next good reading is logged
            self.log.warning(
                "app metrics: %s: no reading for %d intervals: reporting 0 requests/s", self.url, HOLD_MISSES
            )

    async def close(self) -> None:
        """Stop following a reading in flight (its thread ends at its own timeout)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _describe(exc: BaseException) -> str:
    """A failed fetch in a few stable words (the log line repeats only when they change)."""
    if isinstance(exc, TimeoutError):
        return f"timeout after {FETCH_TIMEOUT:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"{type(exc).__name__}: {exc}"[:160]


__all__ = ["AppMetrics", "MetricsError", "RateTracker", "counter_total"]
