"""The row state machine (monitor_s/rowstate.py): every transition, and the failure threshold at,
one below and one above HELIX_UNHEALTHY_AFTER."""

from __future__ import annotations

import pytest

from monitor_s.rowstate import Poll, RowHealth, next_health
from shared.table import State

R, H, U, D = State.REGISTERING, State.HEALTHY, State.UNHEALTHY, State.APP_DOWN
LIVE, DOWN, FAILED = Poll.APP_LIVE, Poll.APP_DOWN, Poll.FAILED

# (state, failures, app_down_polls) before, the poll, (state, failures, app_down_polls) after;
# HELIX_UNHEALTHY_AFTER is 3 throughout.
TRANSITIONS = [
    # an answer with the app live: HEALTHY from anywhere, both counts reset
    ((R, 0, 0), LIVE, (H, 0, 0)),
    ((R, 2, 0), LIVE, (H, 0, 0)),
    ((H, 0, 0), LIVE, (H, 0, 0)),
    ((H, 2, 0), LIVE, (H, 0, 0)),
    ((U, 7, 0), LIVE, (H, 0, 0)),
    ((U, 7, 4), LIVE, (H, 0, 0)),
    ((D, 0, 5), LIVE, (H, 0, 0)),
    ((D, 1, 5), LIVE, (H, 0, 0)),
    # an answer with the app down: APP_DOWN from anywhere, failures reset, one more down poll
    ((R, 0, 0), DOWN, (D, 0, 1)),
    ((R, 2, 0), DOWN, (D, 0, 1)),
    ((H, 0, 0), DOWN, (D, 0, 1)),
    ((H, 1, 0), DOWN, (D, 0, 1)),
    ((D, 0, 1), DOWN, (D, 0, 2)),
    ((D, 2, 6), DOWN, (D, 0, 7)),  # failed polls in between did not break the count
    ((U, 5, 0), DOWN, (D, 0, 1)),
    ((U, 5, 3), DOWN, (D, 0, 4)),  # nor did a spell of UNHEALTHY
    # a failed poll below the threshold: one more failure, state and down count kept
    ((R, 0, 0), FAILED, (R, 1, 0)),
    ((R, 1, 0), FAILED, (R, 2, 0)),
    ((H, 0, 0), FAILED, (H, 1, 0)),
    ((H, 1, 0), FAILED, (H, 2, 0)),
    ((D, 0, 4), FAILED, (D, 1, 4)),
    ((D, 1, 4), FAILED, (D, 2, 4)),
    # the failed poll that reaches the threshold: UNHEALTHY, whatever the state was
    ((R, 2, 0), FAILED, (U, 3, 0)),
    ((H, 2, 0), FAILED, (U, 3, 0)),
    ((D, 2, 4), FAILED, (U, 3, 4)),
    # past the threshold: stays UNHEALTHY, failures keep counting
    ((U, 3, 0), FAILED, (U, 4, 0)),
    ((U, 3, 4), FAILED, (U, 4, 4)),
    ((U, 999, 0), FAILED, (U, 1000, 0)),
]


@pytest.mark.parametrize(("before", "poll", "after"), TRANSITIONS)
def test_transition(before, poll, after):
    assert next_health(RowHealth(*before), poll, unhealthy_after=3) == RowHealth(*after)


def test_every_state_and_outcome_is_covered():
    assert {(b[0], p) for b, p, _ in TRANSITIONS} == {(s, p) for s in (R, H, U, D) for p in Poll}


@pytest.mark.parametrize("unhealthy_after", [1, 2, 3, 1000])
@pytest.mark.parametrize("start", [R, H, D])
def test_threshold_at_and_around_unhealthy_after(unhealthy_after, start):
    """Failure number unhealthy_after - 1 leaves the state alone, number unhealthy_after makes it
    UNHEALTHY, and number unhealthy_after + 1 keeps it so."""
    below = RowHealth(start, unhealthy_after - 2, 0) if unhealthy_after >= 2 else None
    if below is not None:
        assert next_health(below, FAILED, unhealthy_after) == RowHealth(start, unhealthy_after - 1, 0)
    at = next_health(RowHealth(start, unhealthy_after - 1, 0), FAILED, unhealthy_after)
    assert at == RowHealth(U, unhealthy_after, 0)
    assert next_health(at, FAILED, unhealthy_after) == RowHealth(U, unhealthy_after + 1, 0)


@pytest.mark.parametrize("unhealthy_after", [1, 2, 3, 1000])
def test_a_streak_from_registration(unhealthy_after):
    """Counted from a fresh row, poll by poll: the row turns UNHEALTHY on exactly the
    unhealthy_after-th failure in a row, and an answer in between starts the count again."""
    health = RowHealth(R)
    states = []
    for _ in range(unhealthy_after + 1):
        health = next_health(health, FAILED, unhealthy_after)
        states.append(health.state)
    assert states == [R] * (unhealthy_after - 1) + [U, U]
    assert health.failures == unhealthy_after + 1

    health = RowHealth(H)
    for _ in range(unhealthy_after - 1):
        health = next_health(health, FAILED, unhealthy_after)
    health = next_health(health, LIVE, unhealthy_after)
    assert health == RowHealth(H)
    health = next_health(health, FAILED, unhealthy_after)
    assert health.state == (U if unhealthy_after == 1 else H)


def test_app_down_polls_run_from_the_last_live_answer():
    health = RowHealth(H)
    seen = []
    for poll in (DOWN, DOWN, FAILED, DOWN, LIVE, DOWN):
        health = next_health(health, poll, unhealthy_after=3)
        seen.append((health.state, health.app_down_polls))
    assert seen == [(D, 1), (D, 2), (D, 2), (D, 3), (H, 0), (D, 1)]
