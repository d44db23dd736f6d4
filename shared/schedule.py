"""Scheduled actions (HELIX_SCHEDULE). Placeholder: being written."""

from __future__ import annotations


class ScheduleError(ValueError):
    """A schedule that does not parse; the message completes 'expected …'."""


def parse_schedule(raw: str) -> tuple:
    if raw.strip():
        raise ScheduleError("scheduled actions (not supported yet)")
    return ()
