"""helix-ctl (`python -m controller_asg.ctl`): steer a running ControllerASG.

It talks to the controller over its control socket (HELIX_CTL_SOCKET, default
`<HELIX_STATE_DIR>/controller/ctl.sock`; only the controller's user and root may). Every change is
one activity-log entry with who asked and --reason. Exit status: 0 done; 2 a bad argument (ours or
the controller's verdict); 1 the controller unreachable, or it refused or failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

from controller_asg.ctlserver import PROCESSES, CtlUnreachable, call
from shared.config import ConfigError, load_config

PROG = "helix-ctl"
CLIENT_TIMEOUT = 10.0  # seconds: the controller answers between two steps of its loop
EXIT_OK, EXIT_FAILED, EXIT_BAD_ARGUMENT = 0, 1, 2

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
DURATION_HELP = "90s, 30m, 2h, 1d, 1h30m or bare seconds"


class UsageError(Exception):
    """A bad argument: one line on stderr and exit 2."""


def parse_duration(text: str) -> float:
    """Seconds in `text`: bare seconds (`90`, `1.5`) or number-unit parts with s, m, h and d, largest
    first (`90s`, `30m`, `2h`, `1d`, `1h30m`). ValueError, saying what was expected, otherwise."""
    value = text.strip().lower()
    expected = f"invalid duration {text!r}: expected {DURATION_HELP}"
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    parts = _DURATION_PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(expected)
    units = [u for _, u in parts]
    order = "dhms"
    if len(set(units)) != len(units) or units != sorted(units, key=order.index):
        raise ValueError(expected)
    return sum(float(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """`1h30m`, `45s`, `2d3h`: the largest two units, for people."""
    # To the second, or to the minute from 10 minutes on: "in 25m", not "in 24m59s".
    seconds = round(abs(seconds)) if abs(seconds) < 600 else round(abs(seconds) / 60) * 60
    if seconds < 60:
        return f"{seconds}s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            count = int(seconds // size)
            out.append(f"{count}{unit}")
            seconds -= count * size
        if len(out) == 2:
            break
    return "".join(out)


def relative(at: float, now: float) -> str:
    delta = at - now
    if abs(delta) < 1:
        return "now"
    return f"in {format_duration(delta)}" if delta > 0 else f"{format_duration(delta)} ago"


def local_time(at: float, now: float) -> str:
    moment = datetime.fromtimestamp(at).astimezone()
    same_day = moment.date() == datetime.fromtimestamp(now).astimezone().date()
    return moment.strftime("%H:%M:%S %Z" if same_day else "%Y-%m-%d %H:%M:%S %Z")


# --- argument types (each raises argparse.ArgumentTypeError with one line) ----------------------


def _duration(positive: bool) -> Any:
    def parse(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if positive and seconds <= 0:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected more than 0 seconds")
        return seconds

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number from 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number from 0")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: expected a whole number from 1")
    return value


def _percent(lo: float, hi: float) -> Any:
    def parse(text: str) -> float:
        expected = f"invalid percentage {text!r}: expected a number from {lo:g} to {hi:g} (a trailing % is fine)"
        try:
            value = float(text.strip().removesuffix("%"))
        except ValueError:
            raise argparse.ArgumentTypeError(expected) from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(expected)
        return value

    return parse


def _checkpoints(text: str) -> list[float]:
    expected = f"invalid checkpoints {text!r}: expected increasing percentages above 0 up to 100, e.g. 50,100"
    try:
        values = [float(part.strip().removesuffix("%")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if any(not 0 < v <= 100 for v in values) or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise argparse.ArgumentTypeError(expected)
    return values


def _process(text: str) -> str:
    value = text.strip().lower()
    if value != "all" and value not in PROCESSES:
        raise argparse.ArgumentTypeError(f"invalid process {text!r}: expected one of {', '.join(PROCESSES)} or all")
    return value


def _since(text: str) -> float:
    """A duration back from now (`2h`), or an ISO 8601 time (local time when it has no offset)."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected a duration ({DURATION_HELP}) or an ISO 8601 time such as "
            "2024-05-01T14:00 or 2024-05-01T14:00:00+02:00"
        ) from None
    return moment.timestamp()  # naive: local time


# --- the parser -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (`helix-ctl: …`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Durations: {DURATION_HELP}. `{PROG} COMMAND --help` for a command's options.",
    )
    common = _Parser(add_help=False)
    common.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the controller's control socket (default: from the configuration, HELIX_CTL_SOCKET or "
        "<HELIX_STATE_DIR>/controller/ctl.sock)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the raw result as JSON")
    parser.add_argument("--socket", metavar="PATH", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", default=False, help=argparse.SUPPRESS)
    changing = _Parser(add_help=False)
    changing.add_argument("--reason", metavar="TEXT", default="", help="why, for the activity log")

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "status",
        parents=[common],
        help="desired, in service, bounds, override, suspended processes, breaker, refresh, next scheduled action",
        description="What the controller is doing: counts, bounds and where they come from, the override, "
        "suspended processes, the breaker, a refresh in progress and the next scheduled action.",
    )

    cap = commands.add_parser(
        "set-capacity",
        parents=[common, changing],
        help="override min/max/desired at run time (persisted across restarts)",
        description="Override the fleet's bounds at run time, for a while (--for) or until cleared; bounded by "
        "the configured max unless --max raises it. --clear removes the override.",
    )
    cap.add_argument("--min", type=_count, metavar="N", help="minimum instances")
    cap.add_argument("--max", type=_count, metavar="N", help="maximum instances")
    cap.add_argument(
        "--desired", type=_count, metavar="N", help="desired instances (the policy still acts within bounds)"
    )
    cap.add_argument("--for", dest="duration", type=_duration(True), metavar="DURATION", help="expire after this long")
    cap.add_argument("--clear", action="store_true", help="remove the override (back to the configured bounds)")

    for name, verb in (("suspend", "Stop"), ("resume", "Restart")):
        sub = commands.add_parser(
            name,
            parents=[common, changing],
            help=f"{name} processes: {', '.join(PROCESSES)} or all",
            description=f"{verb} some of the controller's processes (as AWS's {name}-processes): "
            f"{', '.join(PROCESSES)}, or all.",
        )
        sub.add_argument("processes", nargs="+", type=_process, metavar="PROCESS")

    refresh = commands.add_parser(
        "refresh",
        parents=[common],
        help="instance refresh: start, status, cancel, rollback",
        description="Replace every instance whose launch configuration differs from the current one, in batches.",
    )
    actions = refresh.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = actions.add_parser(
        "start",
        parents=[common, changing],
        help="start a refresh",
        description="Start an instance refresh: replace, batch by batch, every instance whose launch "
        "configuration differs from the current one.",
        epilog=f"Durations: {DURATION_HELP}.",
    )
    start.add_argument(
        "--min-healthy",
        type=_percent(0, 100),
        metavar="PCT",
        help="percent of desired kept in service throughout (controller's default: 90)",
    )
    start.add_argument(
        "--max-healthy",
        type=_percent(100, 200),
        metavar="PCT",
        help="percent of desired the fleet may surge to while replacing (100 to 200)",
    )
    start.add_argument("--warmup", type=_duration(False), metavar="DURATION", help="warm-up of each new batch")
    start.add_argument(
        "--checkpoints", type=_checkpoints, metavar="PCT,PCT", help="pause at these percentages replaced, e.g. 50,100"
    )
    start.add_argument(
        "--checkpoint-delay", type=_duration(False), metavar="DURATION", help="how long each checkpoint pauses"
    )
    start.add_argument(
        "--no-skip-matching",
        dest="skip_matching",
        action="store_false",
        help="replace instances already on the current configuration too",
    )
    start.add_argument(
        "--no-auto-rollback",
        dest="auto_rollback",
        action="store_false",
        help="do not roll back when new instances fail their health checks",
    )
    start.add_argument(
        "--allow-above-max", action="store_true", help="let a surge go above the maximum (never, by default)"
    )
    actions.add_parser("status", parents=[common], help="the refresh's progress", description="A refresh's progress.")
    actions.add_parser(
        "cancel", parents=[common, changing], help="stop the refresh where it is", description="Stop a refresh."
    )
    actions.add_parser(
        "rollback",
        parents=[common, changing],
        help="put back the previous configuration",
        description="Stop a refresh and replace the instances it launched with the previous configuration.",
    )

    sched = commands.add_parser(
        "schedule",
        parents=[common],
        help="scheduled actions set from here (besides HELIX_SCHEDULE): add, remove, list",
        description="Scheduled actions kept by the controller across restarts, in HELIX_SCHEDULE's syntax.",
    )
    sched_actions = sched.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sched_actions.add_parser(
        "add",
        parents=[common, changing],
        help="add one scheduled action",
        description="Add one scheduled action, e.g. \"night cron='0 22 * * *' tz=Europe/Paris for=8h max=2\".",
    )
    add.add_argument(
        "spec", metavar="ACTION", help="NAME cron='MIN HOUR DOM MON DOW' [tz=…] [for=…] [min=N] [max=N] [desired=N]"
    )
    remove = sched_actions.add_parser(
        "remove", parents=[common, changing], help="remove one added here", description="Remove a scheduled action."
    )
    remove.add_argument("name", metavar="NAME")
    sched_actions.add_parser(
        "list", parents=[common], help="every scheduled action", description="Every scheduled action and its next fire."
    )

    history = commands.add_parser(
        "history",
        parents=[common],
        help="the activity log: launches, terminations, overrides, …",
        description="Entries of the controller's activity log (HELIX_ACTIVITY_LOG), oldest first.",
    )
    history.add_argument(
        "--since", type=_since, metavar="WHEN", help=f"a duration back from now ({DURATION_HELP}) or an ISO 8601 time"
    )
    history.add_argument("--action", metavar="ACTION", help="only this action (launch, terminate, override, …)")
    history.add_argument("--limit", type=_limit, default=50, metavar="N", help="at most N entries (default 50)")
    return parser


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any], str]:
    """(op, args, reason) for the controller from the parsed command line."""
    reason = getattr(args, "reason", "")
    if args.command == "status":
        return "status", {}, reason
    if args.command == "set-capacity":
        if args.clear and (args.min is not None or args.max is not None or args.desired is not None or args.duration):
            raise UsageError("--clear removes the override: give it without --min, --max, --desired or --for")
        if not args.clear and args.min is None and args.max is None and args.desired is None:
            raise UsageError("set-capacity: expected at least one of --min, --max and --desired, or --clear")
        if args.min is not None and args.max is not None and args.min > args.max:
            raise UsageError(f"--min {args.min} is above --max {args.max}")
        values = {"min": args.min, "max": args.max, "desired": args.desired, "for": args.duration, "clear": args.clear}
        return "set-capacity", values, reason
    if args.command in ("suspend", "resume"):
        return args.command, {"processes": list(dict.fromkeys(args.processes))}, reason
    if args.command == "refresh":
        if args.action != "start":
            return "refresh", {"action": args.action}, reason
        if args.min_healthy is not None and args.max_healthy is not None and args.min_healthy > args.max_healthy:
            raise UsageError(f"--min-healthy {args.min_healthy:g} is above --max-healthy {args.max_healthy:g}")
        return (
            "refresh",
            {
                "action": "start",
                "min_healthy": args.min_healthy,
                "max_healthy": args.max_healthy,
                "warmup": args.warmup,
                "checkpoints": args.checkpoints or [],
                "checkpoint_delay": args.checkpoint_delay,
                "skip_matching": args.skip_matching,
                "auto_rollback": args.auto_rollback,
                "allow_above_max": args.allow_above_max,
            },
            reason,
        )
    if args.command == "schedule":
        if args.action == "add":
            return "schedule", {"action": "add", "spec": args.spec}, reason
        if args.action == "remove":
            return "schedule", {"action": "remove", "name": args.name}, reason
        return "schedule", {"action": "list"}, reason
    if args.command == "history":
        return "history", {"since": args.since, "action": args.action, "limit": args.limit}, reason
    raise UsageError(f"unknown command {args.command!r}")  # argparse refuses it first


# --- human output -----------------------------------------------------------------------------


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _bounds_text(values: dict[str, Any]) -> str:
    parts = [f"{key} {_num(values.get(key))}" for key in ("min", "max", "desired") if values.get(key) is not None]
    return ", ".join(parts) or "none"


def refresh_line(refresh: dict[str, Any], now: float) -> str:
    text = (
        f"{refresh.get('id', '?')} {refresh.get('state', '?')}, {float(refresh.get('percent') or 0):.0f}% "
        f"({refresh.get('replaced', 0)}/{refresh.get('to_replace', 0)} replaced), "
        f"healthy {_num(refresh.get('min_healthy'))}%..{_num(refresh.get('max_healthy'))}%"
    )
    if refresh.get("started_at"):
        text += f", started {relative(float(refresh['started_at']), now)}"
    if refresh.get("checkpoint"):
        text += f", checkpoint {refresh['checkpoint']}"
    if refresh.get("detail"):
        text += f": {refresh['detail']}"
    return text


def format_status(result: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    flags = [word for key, word in (("frozen", "FROZEN"), ("dry_run", "dry run")) if result.get(key)]
    lines = [
        f"instances:   {_num(result.get('desired'))} desired, {_num(result.get('in_service'))} in service, "
        f"{_num(result.get('pending'))} pending, {_num(result.get('draining'))} draining "
        f"(capacity {_num(result.get('capacity'))})" + (f"  [{', '.join(flags)}]" if flags else ""),
    ]
    bounds = result.get("bounds") or {}
    lines.append(f"bounds:      {_bounds_text(bounds)} (from {bounds.get('source', '?')})")
    override = result.get("override")
    if override:
        text = _bounds_text(override)
        until = override.get("until")
        text += f", until {local_time(until, now)} ({relative(until, now)})" if until else ", until cleared"
        who = override.get("who") or "?"
        text += f", set by {who}"
        if override.get("set_at"):
            text += f" {relative(float(override['set_at']), now)}"
        if override.get("reason"):
            text += f": {override['reason']}"
        lines.append(f"override:    {text}")
    else:
        lines.append("override:    none")
    suspended = result.get("suspended") or []
    lines.append(f"suspended:   {', '.join(suspended) if suspended else 'none'}")
    breaker = result.get("breaker") or {}
    word = "TRIPPED" if breaker.get("tripped") else "closed"
    lines.append(f"breaker:     {word}, {_num(breaker.get('failures', 0))} failed launch(es) in a row")
    refresh = result.get("refresh")
    lines.append(f"refresh:     {refresh_line(refresh, now) if refresh else 'none'}")
    scheduled = result.get("next_scheduled")
    if scheduled:
        at = float(scheduled.get("at") or 0)
        lines.append(
            f"scheduled:   {scheduled.get('name', '?')} at {local_time(at, now)} ({relative(at, now)}): "
            f"{_bounds_text(scheduled)}"
        )
    else:
        lines.append("scheduled:   none")
    lifetime = result.get("lifetime")
    lines.append(
        f"lifetime:    {format_duration(float(lifetime)) if lifetime else 'unlimited'} (max instance lifetime)"
    )
    if result.get("policy"):
        lines.append(f"policy:      {result['policy']}")
    return "\n".join(lines)


def format_history(entries: list[dict[str, Any]]) -> str:
    lines = []
    for entry in entries:
        try:
            when = datetime.fromtimestamp(float(entry.get("time", 0))).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        except (TypeError, ValueError, OverflowError, OSError):
            when = str(entry.get("at", "?"))
        ids = entry.get("instance_ids") or []
        who = f" [{entry['who']}]" if entry.get("who") else ""
        dry = " (dry run)" if entry.get("dry_run") else ""
        lines.append(
            f"{when}  {str(entry.get('action', '?')):<14} {_num(entry.get('count', 0)):>3}  "
            f"{','.join(map(str, ids)) or '-'}  {entry.get('reason', '')}{who}{dry}"
        )
    return "\n".join(lines) if lines else "no activity"


def format_result(op: str, args: dict[str, Any], result: dict[str, Any]) -> str:
    """What a changing command prints: the controller's own message when it sends one."""
    now = time.time()
    if isinstance(result.get("message"), str):
        return result["message"]
    if op == "schedule" and isinstance(result.get("actions"), list):
        rows = [
            f"{a.get('name', '?'):<16} {a.get('source', '?'):<8} next {local_time(float(a['next']), now) if a.get('next') else 'never'}"
            f"  {a.get('spec', '')}"
            for a in result["actions"]
        ]
        return "\n".join(rows) if rows else "no scheduled actions"
    if op == "refresh" and isinstance(result.get("refresh"), dict):
        return f"refresh: {refresh_line(result['refresh'], now)}"
    if op == "refresh" and args.get("action") == "status" and not result.get("refresh"):
        return "refresh: none"
    if op in ("suspend", "resume") and isinstance(result.get("suspended"), list):
        return f"suspended: {', '.join(result['suspended']) or 'none'}"
    if op == "set-capacity" and isinstance(result.get("bounds"), dict):
        return f"bounds: {_bounds_text(result['bounds'])} (from {result['bounds'].get('source', '?')})"
    return f"{op}: done" + (f" {json.dumps(result, sort_keys=True)}" if result else "")


# --- main -------------------------------------------------------------------------------------


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    try:
        cfg = load_config()
    except ConfigError as exc:
        more = f" (and {len(exc.errors) - 1} more: python -m shared.config lists them)" if len(exc.errors) > 1 else ""
        raise UsageError(f"bad configuration: {exc.errors[0]}{more}") from None
    return os.path.abspath(cfg.effective_ctl_socket)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        op, op_args, reason = request_of(args)
        path = socket_path(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_BAD_ARGUMENT)
    try:
        response = call(path, op, op_args, reason, timeout=CLIENT_TIMEOUT)
    except CtlUnreachable as exc:
        return _fail(f"{exc}; the controller may not be running", EXIT_FAILED)
    if not response.get("ok"):
        code = response.get("code")
        return _fail(str(response.get("error") or "the controller refused"), 2 if code == "bad-request" else 1)
    result = response.get("result")
    if not isinstance(result, dict):
        return _fail(f"the controller at {path} answered without a result", EXIT_FAILED)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif op == "status":
        print(format_status(result))
    elif op == "history":
        entries = result.get("entries") or []
        print(format_history([e for e in entries if isinstance(e, dict)]))
    else:
        print(format_result(op, op_args, result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
