"""`python -m shared.inspect [--name NAME] [--dir DIR] [--json] [--watch SECONDS]`: dump the metrics table.

Read-only: it attaches, copies a consistent snapshot and detaches; it never writes, creates or
unlinks anything (a damaged table is described, not repaired: MonitorS repairs it when it starts).
With no table it prints one line and exits 1; with a table directory (HELIX_SHM_DIR) that is not
this user's alone, one line and exit 2, as MonitorS and ControllerASG (run it as the service user).
Numbers are as the snapshot vouches for them: bad
rows are left out and listed under problems, a bad header number reads as 0 ('never').
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from shared.config import EXIT_BAD_CONFIG, Invalid, load_or_exit, shm_directory
from shared.table import MetricsTable, NotPrivate, Snapshot, TableError

EXIT_NO_TABLE = 1
MAX_PROBLEM_LINES = 10  # the text view stays a screen; --json has every one


def _age(now: float, then: float) -> float | None:
    return round(now - then, 3) if then > 0 else None


def snapshot_dict(snap: Snapshot, now: float) -> dict[str, Any]:
    """The snapshot as plain JSON-ready data (the `--json` output)."""
    mon, ctl = snap.monitor, snap.controller
    monitor = {
        "pid": mon.pid,
        "alive": mon.alive(now),
        "heartbeat_age_s": _age(now, mon.heartbeat),
        "poll_interval_s": mon.poll_interval,
        "cycle_s": round(mon.cycle_seconds, 6),
        "registered": mon.registered,
        "started_at": mon.started_at,
    }
    controller_interval = max(mon.poll_interval, 1e-3)
    controller = {
        "pid": ctl.pid,
        "alive": ctl.heartbeat > 0 and now - ctl.heartbeat <= 3 * controller_interval + 2,
        "heartbeat_age_s": _age(now, ctl.heartbeat),
        "policy": ctl.policy,
        "desired": ctl.desired,
        "in_service": ctl.in_service,
        "pending": ctl.pending,
        "frozen": ctl.frozen,
        "dry_run": ctl.dry_run,
        "last_action": ctl.action,
        "last_reason": ctl.reason,
        "last_decision_age_s": _age(now, ctl.decision_at),
        "breaker": {"tripped": ctl.breaker, "failures": ctl.breaker_failures},
        "billable": ctl.billable,
        "max_instances": ctl.max_instances,
        "table_problems": ctl.table_problems,
    }
    instances = []
    for row in snap.instances():
        instances.append(
            {
                "instance_id": row.instance_id,
                "address": row.address,
                "zone": row.zone,
                "state": row.state.label,
                "cpu": round(row.cpu, 4),
                "mem": round(row.mem, 4),
                "disk": round(row.disk, 4),
                "load": [round(row.load1, 2), round(row.load5, 2), round(row.load15, 2)],
                "net_rx_bps": round(row.net_rx, 1),
                "net_tx_bps": round(row.net_tx, 1),
                "rps": round(row.rps, 2),  # the app's requests/s (agent's HELIX_APP_METRICS_URL); 0: not read
                "vcpus": row.vcpus,
                "app_live": row.app_live,
                "app_detail": row.app_detail,
                "app_port": row.app_port,
                "registered_age_s": _age(now, row.registered_at),
                "last_seen_age_s": _age(now, row.last_seen),
                "failures": row.failures,
                "app_down_polls": row.app_down_polls,
                "poll_latency_ms": round(row.poll_latency * 1000, 2),
                "agent_version": row.agent_version,
                # Between launch and terminate (the agent's hooks), and how the last hook ended.
                "lifecycle": row.lifecycle.label,
                "lifecycle_age_s": _age(now, row.lifecycle_at),
                "hook_result": row.hook_result.label,
                "hook_detail": row.hook_detail,
                # What EC2 announced to the instance (Spot); an interruption's time, when said.
                "notice": row.notice.label,
                "notice_at": row.notice_at or None,
                "notice_in_s": round(row.notice_at - now, 1) if row.notice_at > 0 else None,
            }
        )
    # The header's problems, then the left-out rows' (the clamped high-water mark is in both lists).
    problems = list(dict.fromkeys(snap.header_problems + snap.problems))
    return {
        "table": {"capacity": snap.capacity, "seq": snap.seq},
        "monitor": monitor,
        "controller": controller,
        "instances": instances,
        "problems": problems,
    }


def _fmt_age(age: float | None) -> str:
    return "never" if age is None else f"{age:.1f}s"


def _hook_and_notice(r: dict[str, Any]) -> str:
    """The end of an instance's line: how its last hook ended, and an EC2 notice, when there are."""
    out = ""
    if r["hook_result"] != "none":
        out += f"; hook {r['hook_result']}" + (f" ({r['hook_detail']})" if r["hook_detail"] else "")
    if r["notice"] != "none":
        out += f"; NOTICE {r['notice']}"
        if r["notice_in_s"] is not None:
            out += f" in {r['notice_in_s']:.0f}s"
    return out


def render_text(name: str, data: dict[str, Any]) -> str:
    mon, ctl, rows = data["monitor"], data["controller"], data["instances"]
    lines = [f"table {name}: {len(rows)} of {data['table']['capacity']} rows in use, seq {data['table']['seq']}"]
    if mon["pid"]:
        state = "alive" if mon["alive"] else "NOT RESPONDING"
        lines.append(
            f"monitor: pid {mon['pid']} {state}, heartbeat {_fmt_age(mon['heartbeat_age_s'])} ago, "
            f"poll every {mon['poll_interval_s']:g}s, last cycle {mon['cycle_s'] * 1000:.1f} ms"
        )
    else:
        lines.append("monitor: has not written a heartbeat yet")
    if ctl["pid"]:
        flags = "".join([" FROZEN (fail static)" if ctl["frozen"] else "", " dry-run" if ctl["dry_run"] else ""])
        state = "alive" if ctl["alive"] else "NOT RESPONDING"
        lines.append(
            f"controller: pid {ctl['pid']} {state}, heartbeat {_fmt_age(ctl['heartbeat_age_s'])} ago, "
            f"policy {ctl['policy'] or '?'}; desired {ctl['desired']}, in service {ctl['in_service']}, "
            f"pending {ctl['pending']}{flags}"
        )
        if ctl["max_instances"]:  # 0: a controller from before these fields
            lines.append(f"  billable {ctl['billable']} of max {ctl['max_instances']} instances")
        if ctl["breaker"]["tripped"]:
            failures = ctl["breaker"]["failures"]
            lines.append(f"  breaker: TRIPPED after {failures} failed launch{'' if failures == 1 else 'es'}")
        if ctl["table_problems"]:
            lines.append(f"  its last snapshot left out {ctl['table_problems']} bad row(s)")
        if ctl["last_action"] or ctl["last_reason"]:
            lines.append(
                f"  last decision {_fmt_age(ctl['last_decision_age_s'])} ago: "
                f"{ctl['last_action'] or '-'}: {ctl['last_reason']}"
            )
    else:
        lines.append("controller: not running (no heartbeat)")
    problems = data["problems"]
    if problems:
        lines.append(f"table problems ({len(problems)}; bad rows are left out below):")
        lines += [f"  {p}" for p in problems[:MAX_PROBLEM_LINES]]
        if len(problems) > MAX_PROBLEM_LINES:
            lines.append(f"  ... and {len(problems) - MAX_PROBLEM_LINES} more (--json lists them all)")
    header = (
        f"{'INSTANCE':<22} {'ADDRESS':<22} {'ZONE':<12} {'STATE':<12} {'LIFECYCLE':<11} "
        f"{'CPU%':>6} {'MEM%':>6} {'RPS':>8} {'SEEN':>7} {'FAIL':>4}  APP"
    )
    lines.append(header)
    for r in rows:
        app = "live" if r["app_live"] else "down"
        if r["app_detail"]:
            app += f" ({r['app_detail']})"
        lines.append(
            f"{r['instance_id']:<22} {r['address']:<22} {r['zone']:<12} {r['state']:<12} {r['lifecycle']:<11} "
            f"{r['cpu'] * 100:6.1f} {r['mem'] * 100:6.1f} {r['rps']:8.1f} {_fmt_age(r['last_seen_age_s']):>7} "
            f"{r['failures']:>4}  {app}{_hook_and_notice(r)}"
        )
    return "\n".join(lines)


def read_once(name: str, directory: str = "") -> dict[str, Any]:
    # A read-only look: any readable table, though only in a directory that is ours alone.
    table = MetricsTable.attach(name, private=False, directory=directory)
    try:
        snap = table.snapshot()
    finally:
        table.close()
    return snapshot_dict(snap, time.time())


def _directory(raw: str) -> str:
    """--dir as the loader takes HELIX_SHM_DIR, with its 'expected …' on a bad one."""
    try:
        return shm_directory(raw)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected {exc}") from None


def _where(name: str | None, directory: str | None) -> tuple[str, str]:
    """The table's name and directory: as given, else the configuration's (loaded only if needed)."""
    if name and directory is not None:
        return name, directory
    cfg = load_or_exit(prog="inspect")
    return name or cfg.shm_name, cfg.shm_dir if directory is None else directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="segment name (default: HELIX_SHM_NAME)")
    parser.add_argument("--dir", type=_directory, help="table directory (default: HELIX_SHM_DIR; empty: /dev/shm)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C")
    args = parser.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        parser.error(f"--watch={args.watch}: expected a number of seconds greater than 0")
    name, directory = _where(args.name, args.dir)

    try:
        while True:
            try:
                data = read_once(name, directory)
            except TableError as exc:
                print(f"inspect: {exc}", file=sys.stderr)
                return EXIT_BAD_CONFIG if isinstance(exc, NotPrivate) else EXIT_NO_TABLE
            if args.json:
                print(json.dumps(data), flush=True)
            else:
                if args.watch is not None and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")
                print(render_text(name, data), flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
