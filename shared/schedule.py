"""Scheduled actions (HELIX_SCHEDULE): cron expressions in a time zone that set the fleet's
min/max/desired for a period.

Pure: no I/O and no clock. Every function takes the time (`now`, Unix seconds) it is asked about,
so the live controller, `ctl status` and the simulator (which passes trace time) agree.

Syntax, actions separated by `;` (shell-like quoting, `shlex`):

    NAME cron='MIN HOUR DOM MON DOW' [tz=Area/City] [for=DURATION] [min=N] [max=N] [desired=N]

- NAME: letters, digits, `.`, `_`, `-`, 1 to 64 characters, unique.
- cron: exactly 5 fields, as croniter reads them (names such as MON-FRI, steps, ranges, `L`);
  when both DOM and DOW are restricted, either matching fires (Vixie cron's rule). The hashed and
  random forms (`H`, `R`) are refused: a schedule must mean the same on every run. An expression
  that can never fire (`0 0 30 2 *`) is refused.
- tz: an IANA zone (default UTC); the cron fields are wall-clock times there.
- for: a duration (`90s`, `30m`, `10h`, `2d`, `1h30m`); default: until the next fire of ANY action.
- min, max, desired: integers 0..100000, at least one; min <= max when both are given, desired
  within whichever of them are given.

Which action is in force (`active`): each action's *period* starts at its most recent fire at or
before `now` and lasts `for` (or, without `for`, until the next fire of any action, itself
included). Of the actions whose period contains `now`, the one that fired most recently is in
force; on a tie (several fired at the same instant) the later one in the list wins. So a short
action layered on a long one (`for=10h` business hours, `for=30m` lunch peak) takes over for its
period and hands back to the long one; an action without `for` ends whenever any other fires.
Only each action's most recent fire matters (a later fire of the same action starts a period that
ends no earlier), found with one croniter `get_prev`, so a yearly action is found at once.

Daylight-saving time: fires are computed on timezone-aware datetimes in the action's zone, as
croniter does. A wall-clock time skipped in spring (02:30 in Europe/Paris on the last Sunday of
March) fires at the first instant after the gap (03:00 CEST); a time that happens twice in autumn
fires at both instants (re-applying the same values: only `since`, and with `for` the end, move).

What the action sets (`apply_bounds`): its explicit values replace the configured min/max for the
period, and the configured ones yield where they would contradict them (see there).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LIMIT = 100_000  # the largest min/max/desired (HELIX_MAX_INSTANCES's own bound)
MAX_DURATION = 3650 * 86400.0  # ten years: a longer `for` is surely a typo
DURATION_EXPECTED = "a duration like 90s, 30m, 2h or 1d"
FIELDS = ("cron", "tz", "for", "min", "max", "desired")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNITS = (86400, 3600, 60, 1)
# croniter's hashed (H) and random (R) forms: a lone letter, not part of a name such as MAR or THU.
_NONDETERMINISTIC = re.compile(r"(?<![A-Za-z])[HhRr](?![A-Za-z])")
# A fixed, clock-free reference to check that an expression fires at all (croniter searches 50 years).
_PROBE = datetime(2000, 1, 1, tzinfo=UTC)


class ScheduleError(ValueError):
    """A schedule that does not parse; the message completes 'expected …' (one line)."""


@dataclass(frozen=True)
class ScheduledAction:
    """One action of HELIX_SCHEDULE. `duration`: seconds, None for "until the next action fires";
    `min`/`max`/`desired`: None when the action does not set them (at least one is set)."""

    name: str
    cron: str
    tz: str = "UTC"
    duration: float | None = None
    min: int | None = None
    max: int | None = None
    desired: int | None = None

    def describe(self) -> str:
        """`night (min=1 max=2)`: the action as the logs and `ctl status` name it."""
        values = " ".join(
            f"{k}={v}" for k, v in (("min", self.min), ("max", self.max), ("desired", self.desired)) if v is not None
        )
        return f"{self.name} ({values})"


@dataclass(frozen=True)
class Active:
    """The action in force: since its fire at `since` (Unix seconds) until the end of its own period
    `until` (its `for`, or the next fire of any action; None only if no action ever fires again).
    Another action may take over before `until`: at `next_fire`, or when it is the shorter layer."""

    action: ScheduledAction
    since: float
    until: float | None


# --- parsing -------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `30m`, `10h`, `2d` or a combination in that order (`1h30m`, `1d12h`);
    more than 0 and at most ten years. Raises ScheduleError('a duration like …')."""
    value = text.strip().lower()
    found = _DURATION.fullmatch(value)
    if not value or len(value) > 32 or found is None:
        raise ScheduleError(DURATION_EXPECTED)
    seconds = float(sum(int(n) * unit for n, unit in zip(found.groups(), _UNITS, strict=True) if n is not None))
    if not 0 < seconds <= MAX_DURATION:
        raise ScheduleError(f"{DURATION_EXPECTED}, more than 0 and at most 3650d")
    return seconds


def parse_schedule(raw: str) -> tuple[ScheduledAction, ...]:
    """HELIX_SCHEDULE's actions, in order; () for an empty value. Raises ScheduleError with one
    line naming the action and the field (reading after 'expected')."""
    try:
        lexer = shlex.shlex(raw, posix=True, punctuation_chars=";")
        lexer.whitespace_split = True
        lexer.commenters = ""  # a '#' is cron's (1#2: the second Monday), never a comment hiding actions
        tokens = list(lexer)
    except ValueError:
        raise ScheduleError("`;`-separated actions with balanced quotes (a quote is not closed)") from None
    entries: list[list[str]] = [[]]
    for token in tokens:
        if token and set(token) == {";"}:
            entries.append([])
        else:
            entries[-1].append(token)
    actions: list[ScheduledAction] = []
    seen: set[str] = set()
    for number, words in enumerate((e for e in entries if e), start=1):
        action = _parse_action(number, words)
        if action.name in seen:
            raise ScheduleError(f'unique action names ("{action.name}" is given twice)')
        seen.add(action.name)
        actions.append(action)
    return tuple(actions)


def _parse_action(number: int, words: list[str]) -> ScheduledAction:
    name = words[0]
    if "=" in name or not _NAME.fullmatch(name):
        raise ScheduleError(
            f"action {number} to start with its name: letters, digits, '.', '_' or '-', at most 64 (got {_show(name)})"
        )
    where = f'in action "{name}"'
    given: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in FIELDS:
            raise ScheduleError(f"one of {', '.join(f + '=' for f in FIELDS)} {where} (got {_show(word)})")
        if key in given:
            raise ScheduleError(f"each field once {where} ({key}= is given twice)")
        given[key] = value
    if "cron" not in given:
        raise ScheduleError(f"a cron='MIN HOUR DOM MON DOW' {where}")
    cron = _cron(given["cron"], where)
    tz = given.get("tz", "UTC")
    if "tz" in given and not _zone_ok(tz):
        raise ScheduleError(f"tz= an IANA time zone such as Europe/Paris {where} (got {_show(tz, 'tz')})")
    if not _fires(cron, tz):
        raise ScheduleError(f"cron= an expression that fires {where} ({_show(cron, 'cron')} never does)")
    duration = None
    if "for" in given:
        try:
            duration = parse_duration(given["for"])
        except ScheduleError as exc:
            raise ScheduleError(f"for= {exc} {where} (got {_show(given['for'], 'for')})") from None
    bounds: dict[str, int] = {}
    for key in ("min", "max", "desired"):
        if key in given:
            text = given[key].strip()
            if not (text.isascii() and text.isdigit()) or int(text) > LIMIT:
                raise ScheduleError(f"{key}= an integer from 0 to {LIMIT} {where} (got {_show(given[key], key)})")
            bounds[key] = int(text)
    if not bounds:
        raise ScheduleError(f"at least one of min=, max=, desired= {where}")
    lo, hi, want = bounds.get("min"), bounds.get("max"), bounds.get("desired")
    if lo is not None and hi is not None and lo > hi:
        raise ScheduleError(f"min= at most max= {where} (got min={lo} max={hi})")
    if want is not None and ((lo is not None and want < lo) or (hi is not None and want > hi)):
        got = " ".join(f"{k}={v}" for k, v in (("min", lo), ("max", hi), ("desired", want)) if v is not None)
        raise ScheduleError(f"desired= within min= and max= {where} (got {got})")
    return ScheduledAction(name, cron, tz, duration, lo, hi, want)


def _cron(value: str, where: str) -> str:
    fields = value.split()
    cron = " ".join(fields)
    from croniter import croniter  # here, not at the top: every process imports shared.config, few need it

    if len(fields) != 5 or _NONDETERMINISTIC.search(cron) or not croniter.is_valid(cron):
        raise ScheduleError(
            f"cron= 5 fields MIN HOUR DOM MON DOW, e.g. '0 8 * * MON-FRI' (no H or R) {where} (got {_show(value, 'cron')})"
        )
    return cron


def _zone_ok(tz: str) -> bool:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):  # unknown, or not a key at all ('/etc/passwd', '../x')
        return False
    return True


def _fires(cron: str, tz: str) -> bool:
    from croniter import CroniterError, croniter

    try:
        croniter(cron, _PROBE.astimezone(ZoneInfo(tz))).get_next(datetime)
    except CroniterError:
        return False
    return True


def _show(text: str, key: str = "") -> str:
    """`key=value` (or the value alone) for a one-line message: quoted as the shell would, unprintable
    characters escaped, at most 60 characters of the value shown."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{key}={shlex.quote(text)}" if key else shlex.quote(text)


# --- when ----------------------------------------------------------------------------------------


def _at(action: ScheduledAction, now: float) -> datetime:
    return datetime.fromtimestamp(now, ZoneInfo(action.tz))


def last_fire(action: ScheduledAction, now: float) -> float | None:
    """The most recent fire of `action` at or before `now` (None: none in croniter's 50-year reach)."""
    from croniter import CroniterError, croniter

    try:
        prev: float = croniter(action.cron, _at(action, now)).get_prev(datetime).timestamp()
        # get_prev is strictly before its start: a fire exactly at `now` is the one after `prev`.
        after: float = croniter(action.cron, _at(action, prev)).get_next(datetime).timestamp()
    except CroniterError:
        return None
    return after if after <= now else prev


def fire_after(action: ScheduledAction, now: float) -> float | None:
    """The first fire of `action` strictly after `now` (None: none in croniter's 50-year reach)."""
    from croniter import CroniterError, croniter

    try:
        at: float = croniter(action.cron, _at(action, now)).get_next(datetime).timestamp()
    except CroniterError:
        return None
    return at


def next_fire(actions: tuple[ScheduledAction, ...], now: float) -> tuple[ScheduledAction, float] | None:
    """The next fire of any action strictly after `now` and its action (for `ctl status`); on a tie
    the later one in the list, as it is the one that will be in force. None for no actions."""
    best: tuple[ScheduledAction, float] | None = None
    for action in actions:
        at = fire_after(action, now)
        if at is not None and (best is None or at <= best[1]):
            best = (action, at)
    return best


def active(actions: tuple[ScheduledAction, ...], now: float) -> Active | None:
    """The action in force at `now` (see the module's doc), or None when none is: the configured
    bounds apply. A fire exactly at `now` is in force at `now`."""
    fired = [(at, i, a) for i, a in enumerate(actions) if (at := last_fire(a, now)) is not None]
    # Most recent first, the later in the list first on a tie.
    fired.sort(key=lambda f: (f[0], f[1]), reverse=True)
    upcoming: float | None = None
    for since, _, action in fired:
        if action.duration is not None:
            until: float | None = since + action.duration
        else:
            # The next fire of any action after `since`. Any action fired after `since` ends this
            # period before `now`, so only the most recent fires can still be in force this way;
            # for them the next fire after `since` is the next one after `now`.
            if since < fired[0][0]:
                continue
            if upcoming is None:
                found = next_fire(actions, now)
                upcoming = found[1] if found is not None else float("inf")
            until = None if upcoming == float("inf") else upcoming
        if until is None or now < until:
            return Active(action, since, until)
    return None


def next_change(actions: tuple[ScheduledAction, ...], now: float) -> float | None:
    """The earliest instant after `now` at which `active` may answer differently: the next fire of
    any action, or the end of the period in force, whichever is first (None: never). Between the
    two a caller can keep the answer it has (the simulator evaluates only at these instants)."""
    found = next_fire(actions, now)
    ends = [found[1]] if found is not None else []
    current = active(actions, now)
    if current is not None and current.until is not None:
        ends.append(current.until)
    return min(ends) if ends else None


def apply_bounds(cfg_min: int, cfg_max: int, current: Active | None) -> tuple[int, int, int | None]:
    """(min, max, desired) for the fleet: the configured `cfg_min`/`cfg_max` with no action in force;
    else what the action states replaces them, even past the configuration (a max above
    HELIX_MAX_INSTANCES is the operator's to write), and a configured value yields where it would
    contradict the action's:
    - only `min` given, above the configured max: max is raised to it;
    - only `max` given, below the configured min: min is lowered to it;
    - `desired` outside the resulting bounds (only possible against a configured one): that bound
      moves to it.
    (Both given in the action are checked at parse time: min <= desired <= max.) `desired` is None
    when the action does not pin it."""
    if current is None:
        return cfg_min, cfg_max, None
    a = current.action
    lo = a.min if a.min is not None else cfg_min
    hi = a.max if a.max is not None else cfg_max
    if lo > hi:
        if a.min is not None:
            hi = lo
        else:
            lo = hi
    if a.desired is not None:
        lo, hi = min(lo, a.desired), max(hi, a.desired)
    return lo, hi, a.desired
