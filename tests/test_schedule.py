"""Scheduled actions (shared/schedule.py): parsing, durations, which action is in force, the next
fire, daylight-saving time, the bounds they give, and their errors through the config loader."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from shared.config import ConfigError, load_config
from shared.schedule import (
    Active,
    ScheduledAction,
    ScheduleError,
    active,
    apply_bounds,
    next_change,
    next_fire,
    parse_duration,
    parse_schedule,
)
from tests.procs import base_env

PARIS = ZoneInfo("Europe/Paris")
H = 3600.0


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=PARIS).timestamp()


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def act(name: str, cron: str, **kw) -> ScheduledAction:
    return ScheduledAction(name, cron, **kw)


# --- parsing -------------------------------------------------------------------------------------


def test_parses_every_field_and_the_readme_example():
    got = parse_schedule(
        "business cron='0 8 * * MON-FRI' tz=Europe/Paris for=10h min=4; "
        'night cron="0 22 * * *" tz=Europe/Paris for=8h max=2;'
        "pin.1_x-y cron='*/15 * * * *' for=1h30m min=1 max=5 desired=3"
    )
    assert got == (
        ScheduledAction("business", "0 8 * * MON-FRI", "Europe/Paris", 36000.0, 4, None, None),
        ScheduledAction("night", "0 22 * * *", "Europe/Paris", 28800.0, None, 2, None),
        ScheduledAction("pin.1_x-y", "*/15 * * * *", "UTC", 5400.0, 1, 5, 3),
    )


@pytest.mark.parametrize("raw", ["", "   ", ";", " ; ;; "])
def test_an_empty_schedule_has_no_actions(raw):
    assert parse_schedule(raw) == ()


def test_defaults_and_spacing():
    [a] = parse_schedule("  a   cron='0  8 *  * *'   desired=0 ; ")
    assert (a.tz, a.duration, a.min, a.max, a.desired) == ("UTC", None, None, None, 0)
    assert a.cron == "0 8 * * *"  # the fields, single-spaced
    assert a.describe() == "a (desired=0)"


def test_a_hash_is_no_comment():
    with pytest.raises(ScheduleError, match=r'one of cron=, .* in action "b" \(got \'#x\'\)'):
        parse_schedule("a cron='0 8 * * 1#2' min=1; b cron='0 8 * * *' min=1 #x; c cron='0 9 * * *' min=2")
    [a] = parse_schedule("a cron='0 8 * * 1#2' min=1")
    assert a.cron == "0 8 * * 1#2"


def test_importing_the_config_does_not_import_croniter():
    code = "import sys, shared.config; print('croniter' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=base_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_a_quoted_semicolon_does_not_split_actions():
    # No valid field holds a ';', but the error names the field instead of a broken second action.
    with pytest.raises(ScheduleError, match=r'^cron= 5 fields .* in action "a"'):
        parse_schedule("a cron='0 8 * * 1;2' min=1")


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("30m", 1800), ("10h", 36000), ("2d", 172800), ("1h30m", 5400), ("1d2h3m4s", 93784), (" 5M ", 300)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "1.5h", "1y", "30m1h", "0s", "0d0h", "-5m", "1 h", "3651d", "9" * 40 + "d"])
def test_bad_durations(text):
    with pytest.raises(ScheduleError, match=r"^a duration like 90s, 30m, 2h or 1d"):
        parse_duration(text)
    with pytest.raises(ValueError):  # what a CLI catches
        parse_duration(text)


BAD = [
    ("night cron='0 22 * * *' max=abc", 'max= an integer from 0 to 100000 in action "night" (got max=abc)'),
    ("night cron='0 22 * * *' min=-1", 'min= an integer from 0 to 100000 in action "night" (got min=-1)'),
    ("night cron='0 22 * * *' desired=100001", 'desired= an integer from 0 to 100000 in action "night"'),
    ("night cron='0 22 * * *' min=", "min= an integer from 0 to 100000 in action \"night\" (got min='')"),
    ("night cron='0 22 * * *' for=1y min=1", 'for= a duration like 90s, 30m, 2h or 1d in action "night" (got for=1y)'),
    ("night cron='0 22 * * *' tz=Mars/Olympus min=1", 'tz= an IANA time zone such as Europe/Paris in action "night"'),
    (
        "night cron='0 22 * * *' tz=../../etc/passwd min=1",
        'tz= an IANA time zone such as Europe/Paris in action "night"',
    ),
    ("night cron='0 22 * * *' tz= min=1", 'tz= an IANA time zone such as Europe/Paris in action "night"'),
    (
        "night cron='61 22 * * *' min=1",
        "cron= 5 fields MIN HOUR DOM MON DOW, e.g. '0 8 * * MON-FRI' (no H or R) in action \"night\" (got cron='61 22 * * *')",
    ),
    ("night cron='0 22 * *' min=1", "cron= 5 fields MIN HOUR DOM MON DOW"),
    ("night cron='0 0 22 * * *' min=1", "cron= 5 fields MIN HOUR DOM MON DOW"),
    ("night cron=@daily min=1", "cron= 5 fields MIN HOUR DOM MON DOW"),
    ("night cron='H 22 * * *' min=1", "cron= 5 fields MIN HOUR DOM MON DOW"),
    ("night cron='R 22 * * *' min=1", "cron= 5 fields MIN HOUR DOM MON DOW"),
    (
        "night cron='0 0 30 2 *' min=1",
        "cron= an expression that fires in action \"night\" (cron='0 0 30 2 *' never does)",
    ),
    ("night max=2", "a cron='MIN HOUR DOM MON DOW' in action \"night\""),
    ("night cron='0 22 * * *'", 'at least one of min=, max=, desired= in action "night"'),
    ("night cron='0 22 * * *' min=3 max=2", 'min= at most max= in action "night" (got min=3 max=2)'),
    (
        "night cron='0 22 * * *' max=2 desired=3",
        'desired= within min= and max= in action "night" (got max=2 desired=3)',
    ),
    (
        "night cron='0 22 * * *' min=2 desired=1",
        'desired= within min= and max= in action "night" (got min=2 desired=1)',
    ),
    ("night cron='0 22 * * *' size=2", 'one of cron=, tz=, for=, min=, max=, desired= in action "night" (got size=2)'),
    ("night cron='0 22 * * *' 2", 'one of cron=, tz=, for=, min=, max=, desired= in action "night" (got 2)'),
    ("night cron='0 22 * * *' max=2 max=3", 'each field once in action "night" (max= is given twice)'),
    ("a cron='0 8 * * *' min=1; a cron='0 9 * * *' min=2", 'unique action names ("a" is given twice)'),
    ("a cron='0 8 * * *' min=1; cron='0 9 * * *' min=2", "action 2 to start with its name"),
    (
        "n/a cron='0 8 * * *' min=1",
        "action 1 to start with its name: letters, digits, '.', '_' or '-', at most 64 (got n/a)",
    ),
    ("x" * 65 + " cron='0 8 * * *' min=1", "action 1 to start with its name"),
    ("night cron='0 22 * * * min=1", "`;`-separated actions with balanced quotes (a quote is not closed)"),
    (
        "night cron='0 22 * * *' max=\x1b[31m",
        "max= an integer from 0 to 100000 in action \"night\" (got max='\\x1b[31m')",
    ),
]


@pytest.mark.parametrize("raw, message", BAD)
def test_errors_are_one_line_naming_the_action_and_the_field(raw, message):
    with pytest.raises(ScheduleError) as info:
        parse_schedule(raw)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text and text.isprintable()


def test_config_errors_are_one_line():
    raw = "night cron='0 22 * * *' max=abc"
    with pytest.raises(ConfigError) as info:
        load_config({"HELIX_ENV_FILE": "", "HELIX_SCHEDULE": raw})
    assert info.value.errors == [
        f'HELIX_SCHEDULE={raw}: expected max= an integer from 0 to 100000 in action "night" (got max=abc)'
    ]


def test_config_parses_a_schedule():
    cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_SCHEDULE": "night cron='0 22 * * *' tz=Europe/Paris max=2"})
    assert cfg.schedule == (ScheduledAction("night", "0 22 * * *", "Europe/Paris", None, None, 2, None),)
    assert load_config({"HELIX_ENV_FILE": ""}).schedule == ()


# --- which action is in force --------------------------------------------------------------------

BUSINESS = act("business", "0 8 * * MON-FRI", tz="Europe/Paris", duration=10 * H, min=4)
LUNCH = act("lunch", "0 12 * * MON-FRI", tz="Europe/Paris", duration=0.5 * H, desired=6)
NIGHT = act("night", "0 22 * * *", tz="Europe/Paris", duration=8 * H, max=2)


def test_layered_actions_hand_back_to_the_longer_one():
    actions = (BUSINESS, LUNCH, NIGHT)
    # Tuesday 3 March 2026, Paris (CET, UTC+1).
    assert active(actions, paris(2026, 3, 3, 7, 59)) is None
    assert active(actions, paris(2026, 3, 3, 8, 0)) == Active(BUSINESS, paris(2026, 3, 3, 8), paris(2026, 3, 3, 18))
    assert active(actions, paris(2026, 3, 3, 12, 10)) == Active(LUNCH, paris(2026, 3, 3, 12), paris(2026, 3, 3, 12, 30))
    assert active(actions, paris(2026, 3, 3, 12, 30)).action == BUSINESS  # the period is [since, until)
    assert active(actions, paris(2026, 3, 3, 17, 59, 59)).action == BUSINESS
    assert active(actions, paris(2026, 3, 3, 18, 0)) is None
    assert active(actions, paris(2026, 3, 3, 23)) == Active(NIGHT, paris(2026, 3, 3, 22), paris(2026, 3, 4, 6))
    assert active(actions, paris(2026, 3, 4, 6)) is None
    # Saturday: no business hours, the night still.
    assert active(actions, paris(2026, 3, 7, 10)) is None
    assert active(actions, paris(2026, 3, 8, 3)).action == NIGHT


def test_without_for_an_action_lasts_until_any_action_fires():
    day = act("day", "0 8 * * *", min=4)
    evening = act("evening", "0 20 * * *", max=2)
    peak = act("peak", "0 12 * * *", duration=1800, desired=6)
    actions = (day, evening)
    assert active(actions, utc(2026, 3, 3, 10)) == Active(day, utc(2026, 3, 3, 8), utc(2026, 3, 3, 20))
    assert active(actions, utc(2026, 3, 3, 21)) == Active(evening, utc(2026, 3, 3, 20), utc(2026, 3, 4, 8))
    assert active(actions, utc(2026, 3, 3, 7, 59)) == Active(evening, utc(2026, 3, 2, 20), utc(2026, 3, 3, 8))
    # Any fire ends it, a short one's too: after the peak nothing is in force until 20:00.
    actions = (day, peak, evening)
    assert active(actions, utc(2026, 3, 3, 11)) == Active(day, utc(2026, 3, 3, 8), utc(2026, 3, 3, 12))
    assert active(actions, utc(2026, 3, 3, 12, 10)).action == peak
    assert active(actions, utc(2026, 3, 3, 13)) is None
    # An action alone: until its own next fire.
    assert active((day,), utc(2026, 3, 3, 7)) == Active(day, utc(2026, 3, 2, 8), utc(2026, 3, 3, 8))


def test_ties_go_to_the_later_action_in_the_list():
    a = act("a", "0 8 * * *", min=2)
    b = act("b", "0 8 * * *", duration=H, min=5)
    assert active((a, b), utc(2026, 3, 3, 8)).action == b
    assert active((b, a), utc(2026, 3, 3, 8)).action == a
    # b's hour over: a (until the next fire) is still in force, having fired at the same time.
    assert active((a, b), utc(2026, 3, 3, 9, 30)) == Active(a, utc(2026, 3, 3, 8), utc(2026, 3, 4, 8))
    assert next_fire((a, b), utc(2026, 3, 3, 9)) == (b, utc(2026, 3, 4, 8))
    assert next_fire((b, a), utc(2026, 3, 3, 9)) == (a, utc(2026, 3, 4, 8))


def test_a_yearly_action_is_found_without_walking_the_year():
    new_year = act("new-year", "0 0 1 1 *", tz="Europe/Paris", duration=31 * 86400, min=8)
    assert active((new_year,), paris(2026, 1, 20)) == Active(new_year, paris(2026, 1, 1), paris(2026, 2, 1))
    assert active((new_year,), paris(2026, 2, 1)) is None
    once = act("once-a-year", "0 0 1 1 *", max=3)  # until its own next fire: all year
    assert active((once,), utc(2026, 12, 31, 23)) == Active(once, utc(2026, 1, 1), utc(2027, 1, 1))
    leap = act("leap", "0 0 29 2 *", max=3)
    assert active((leap,), utc(2027, 6, 1)) == Active(leap, utc(2024, 2, 29), utc(2028, 2, 29))


def test_time_zones():
    ny = act("ny", "0 9 * * *", tz="America/New_York", duration=H, min=3)
    tokyo = act("tokyo", "0 9 * * *", tz="Asia/Tokyo", duration=H, min=5)
    # 9:00 in New York: 14:00 UTC in EST, 13:00 UTC from the US change on 8 March (EDT).
    assert active((ny,), utc(2026, 3, 3, 14, 30)).action == ny
    assert active((ny,), utc(2026, 3, 10, 13, 30)).action == ny
    assert active((ny,), utc(2026, 3, 10, 14, 30)) is None
    assert active((ny, tokyo), utc(2026, 3, 3, 0, 30)).action == tokyo
    assert next_fire((ny, tokyo), utc(2026, 3, 3, 1)) == (ny, utc(2026, 3, 3, 14))


def test_daylight_saving_time_in_paris():
    early = act("early", "30 2 * * *", tz="Europe/Paris", duration=H, min=3)
    # Spring forward, Sunday 29 March 2026: 02:00 CET jumps to 03:00 CEST, so 02:30 never happens
    # that day; the action fires at the first instant after the gap, 03:00 CEST (01:00 UTC).
    assert next_fire((early,), paris(2026, 3, 29, 0)) == (early, utc(2026, 3, 29, 1))
    assert active((early,), utc(2026, 3, 29, 1, 30)) == Active(early, utc(2026, 3, 29, 1), utc(2026, 3, 29, 2))
    # The days around it: 02:30 CET (01:30 UTC) before, 02:30 CEST (00:30 UTC) after.
    assert active((early,), utc(2026, 3, 28, 1, 45)).since == utc(2026, 3, 28, 1, 30)
    assert next_fire((early,), utc(2026, 3, 29, 2)) == (early, utc(2026, 3, 30, 0, 30))
    # Fall back, Sunday 25 October 2026: 02:30 happens twice (CEST, then CET): both fire.
    assert next_fire((early,), utc(2026, 10, 25, 0)) == (early, utc(2026, 10, 25, 0, 30))
    assert next_fire((early,), utc(2026, 10, 25, 0, 30)) == (early, utc(2026, 10, 25, 1, 30))
    assert active((early,), utc(2026, 10, 25, 2)).since == utc(2026, 10, 25, 1, 30)


def test_next_fire_and_next_change():
    actions = (BUSINESS, LUNCH, NIGHT)
    assert next_fire((), 0.0) is None
    assert next_change((), 0.0) is None
    assert active((), 0.0) is None
    assert next_fire(actions, paris(2026, 3, 3, 7)) == (BUSINESS, paris(2026, 3, 3, 8))
    assert next_fire(actions, paris(2026, 3, 3, 8)) == (LUNCH, paris(2026, 3, 3, 12))  # strictly after
    assert next_change(actions, paris(2026, 3, 3, 9)) == paris(2026, 3, 3, 12)
    assert next_change(actions, paris(2026, 3, 3, 12, 5)) == paris(2026, 3, 3, 12, 30)  # lunch ends
    assert next_change(actions, paris(2026, 3, 3, 13)) == paris(2026, 3, 3, 18)  # business ends
    assert next_change(actions, paris(2026, 3, 3, 19)) == paris(2026, 3, 3, 22)
    assert next_change(actions, paris(2026, 3, 6, 23)) == paris(2026, 3, 7, 6)  # Friday night, then Saturday


def test_active_is_constant_between_changes():
    actions = (BUSINESS, LUNCH, NIGHT, act("pulse", "*/20 9-10 * * *", duration=300, desired=1))
    t = paris(2026, 3, 2, 0)
    end = paris(2026, 3, 4, 0)
    while t < end:
        change = next_change(actions, t)
        assert change is not None and change > t
        here = active(actions, t)
        for probe in (t + 1, (t + change) / 2, change - 1):
            if probe < change:
                assert active(actions, probe) == here
        t = change


# --- the bounds they give ------------------------------------------------------------------------


def at(action: ScheduledAction) -> Active:
    return Active(action, 0.0, None)


@pytest.mark.parametrize(
    "action, expected",
    [
        (None, (1, 10, None)),
        (act("a", "0 8 * * *", min=4), (4, 10, None)),
        (act("a", "0 8 * * *", min=12), (12, 12, None)),  # only min, above the configured max: max raised
        (act("a", "0 8 * * *", max=20), (1, 20, None)),  # above HELIX_MAX_INSTANCES: the operator wrote it
        (act("a", "0 8 * * *", max=0), (0, 0, None)),  # only max, below the configured min: min lowered
        (act("a", "0 8 * * *", min=0, max=3), (0, 3, None)),
        (act("a", "0 8 * * *", desired=6), (1, 10, 6)),
        (act("a", "0 8 * * *", desired=15), (1, 15, 15)),  # desired alone past the configured max
        (act("a", "0 8 * * *", desired=0), (0, 10, 0)),
        (act("a", "0 8 * * *", min=2, max=8, desired=5), (2, 8, 5)),
    ],
)
def test_apply_bounds(action, expected):
    assert apply_bounds(1, 10, at(action) if action else None) == expected
