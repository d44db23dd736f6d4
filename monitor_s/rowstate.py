"""A row's health after one poll of its agent. Pure: the row's health and the poll's outcome go in.

Rules (MonitorS applies them to every poll result, in either poll mode):
- An answer resets the failure streak (`failures` 0), whatever the state: an UNHEALTHY agent that
  answers again is judged on that answer like any other.
- An answer with the app live makes the row HEALTHY (from REGISTERING, HEALTHY, UNHEALTHY or
  APP_DOWN alike) and resets `app_down_polls` to 0.
- An answer with the app down makes the row APP_DOWN and counts it in `app_down_polls`. The count
  runs from the last answer with the app live: failed polls in between neither count nor reset it
  (ControllerASG replaces after HELIX_APP_DOWN_AFTER of them).
- A failed poll (error, deadline, or in stream mode a broken or silent stream) adds one to
  `failures` and leaves the state and `app_down_polls` alone, until `failures` reaches
  HELIX_UNHEALTHY_AFTER: from then on the row is UNHEALTHY. A REGISTERING row that never answered
  goes UNHEALTHY the same way; until then it stays REGISTERING.

When an agent has been silent for HELIX_FORGET_AFTER its row is freed: that rule needs the clock,
so it stays in `monitor_s/fleet.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from shared.table import State


class Poll(Enum):
    """What one poll of an agent came to."""

    APP_LIVE = "answered, app live"
    APP_DOWN = "answered, app down"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RowHealth:
    """The part of a row that polls decide."""

    state: State
    failures: int = 0  # consecutive failed polls
    app_down_polls: int = 0  # answers with the app down since the last one with the app live


def next_health(health: RowHealth, poll: Poll, unhealthy_after: int) -> RowHealth:
    """The row's health after `poll`; `unhealthy_after` is HELIX_UNHEALTHY_AFTER (>= 1)."""
    if poll is Poll.APP_LIVE:
        return RowHealth(State.HEALTHY, 0, 0)
    if poll is Poll.APP_DOWN:
        return RowHealth(State.APP_DOWN, 0, health.app_down_polls + 1)
    failures = health.failures + 1
    state = State.UNHEALTHY if failures >= unhealthy_after else health.state
    return RowHealth(state, failures, health.app_down_polls)
