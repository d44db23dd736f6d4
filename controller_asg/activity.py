"""The activity history: one log line per action with its cause, and one JSON line in
HELIX_ACTIVITY_LOG when set (like AWS Auto Scaling's activity history)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

log = logging.getLogger("controller_asg")


@dataclass(frozen=True)
class Activity:
    time: float
    action: str  # launch | terminate | replace | drained | freeze | resume | adopt | launch-failed | breaker-*
    count: int
    reason: str
    instance_ids: list[str] = field(default_factory=list)
    desired: int = 0
    capacity: int = 0
    dry_run: bool = False

    def message(self) -> str:
        verb = {"launch": "launching", "terminate": "terminating", "replace": "replacing"}.get(self.action, self.action)
        ids = f" ({', '.join(self.instance_ids)})" if self.instance_ids else ""
        prefix = "dry run, would be " if self.dry_run else ""
        if self.action in ("launch", "terminate", "replace"):
            return f"{prefix}{verb} {self.count}{ids}: {self.reason}"
        return f"{prefix}{verb}{ids}: {self.reason}"


class ActivityLog:
    """Records activities; listeners (the webhook, the metrics) hear of each after it is written."""

    def __init__(self, path: str, listeners: Iterable[Callable[[Activity], None]] = ()):
        self.path = path
        self.listeners: list[Callable[[Activity], None]] = list(listeners)
        self._failed: set[int] = set()  # listeners whose failure was logged (once each)

    def add_listener(self, fn: Callable[[Activity], None]) -> None:
        self.listeners.append(fn)

    def record(self, activity: Activity) -> None:
        try:
            self._write(activity)
        finally:
            for fn in self.listeners:
                try:
                    fn(activity)
                except Exception:  # a listener never breaks the record (logged below, with its traceback)
                    if id(fn) not in self._failed:
                        self._failed.add(id(fn))
                        log.exception("activity listener %r failed (logged once; it is still called)", fn)

    def _write(self, activity: Activity) -> None:
        log.warning(activity.message()) if activity.action in ("freeze", "replace") else log.info(activity.message())
        if not self.path:
            return
        entry = asdict(activity)
        entry["at"] = datetime.fromtimestamp(activity.time, UTC).isoformat(timespec="milliseconds")
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        # One write of one line in append mode: concurrent readers never see half a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
