"""`python -m controller_asg.simulate`: what would this policy have done to my traffic, and at what cost?

Runs the very policy classes the live controller runs, fed simulated time and observations,
against a simulated fleet (see controller_asg/sim/fleet.py for the model), and compares it with
the oracle that knows the future.

    python -m controller_asg.simulate --trace rates.txt.gz --capacity 50 --days 7 --plot run.png
    python -m controller_asg.simulate --trace t.gz --peak-instances 20 --smooth 60 --policy k8s-hpa
    python -m controller_asg.simulate --trace t.gz --peak-instances 20 --warm-pool 4 --warm-start 15
    python -m controller_asg.simulate --trace t.gz --capacity 50 --trace-start 2026-03-02T00:00Z \
        --schedule "business cron='0 8 * * MON-FRI' tz=Europe/Paris for=10h min=4"

Settings are the live controller's (`HELIX_…` from the environment or `.env`), overridden by
`--set HELIX_KEY=VALUE` flags. Scheduled actions (`--schedule`, default HELIX_SCHEDULE) run as
live, at trace time: the trace's first second is `--trace-start` (default 0, i.e.
1970-01-01T00:00:00Z, a Thursday), and `--start`/`--history-days` move along it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

from controller_asg.policy import BASELINES, LIVE_POLICIES
from controller_asg.sim.runner import capacity_for_peak, compare, params_from
from controller_asg.sim.trace import TraceError, load_columns, smooth
from shared.config import ConfigError, load_config
from shared.schedule import ScheduleError, parse_schedule

DAY = 86400
COLUMNS = [
    ("instance_hours", "inst-h", "{:.0f}"),
    ("cost_vs_oracle", "cost/oracle", "{:.3f}"),
    ("lost_pct", "lost %", "{:.3f}"),
    ("hot_pct", ">90% CPU %", "{:.2f}"),
    ("theta_u", "θU %", "{:.2f}"),
    ("theta_o", "θO %", "{:.1f}"),
    ("tau_u", "τU %", "{:.2f}"),
    ("tau_o", "τO %", "{:.1f}"),
    ("actions", "actions", "{:d}"),
]


def table(rows: list[tuple[str, dict]]) -> str:
    head = ["policy"] + [c[1] for c in COLUMNS]
    body = [[name] + [fmt.format(fig[key]) for key, _, fmt in COLUMNS] for name, fig in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    for r in body:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m controller_asg.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trace", required=True, help="rates, one per line (per second or per --step s), .gz ok, or CSV timestamp,rate"
    )
    ap.add_argument("--step", type=float, default=1.0, help="seconds per trace line (default 1)")
    ap.add_argument(
        "--policy",
        default="",
        help=f"policy to run (default HELIX_POLICY); one of {', '.join(LIVE_POLICIES + BASELINES)}, oracle; comma-separated for several",
    )
    cap = ap.add_mutually_exclusive_group(required=True)
    cap.add_argument("--capacity", type=float, help="requests/s one instance serves at 100%% CPU")
    cap.add_argument(
        "--peak-instances",
        type=float,
        help="instead of --capacity: scale so the busiest second of the (smoothed) slice needs this many instances at the target",
    )
    ap.add_argument("--boot-time", type=float, default=90.0, help="seconds from launch to in service (default 90)")
    # Taken as text and checked in main(), so a bad value is one line on stderr like every other.
    ap.add_argument(
        "--warm-pool",
        metavar="N",
        help="keep N instances launched, prepared and stopped; a scale-out starts them first"
        " (default HELIX_WARM_POOL_SIZE, 0: none; HELIX_WARM_POOL_MAX_PREPARED caps it as live)",
    )
    ap.add_argument(
        "--warm-start",
        default="10",
        metavar="SECONDS",
        help="seconds from starting a stopped warm-pool instance to in service, at most --boot-time (default 10)",
    )
    ap.add_argument(
        "--stopped-cost",
        default="0.1",
        metavar="FRACTION",
        help="what a stopped warm-pool instance is billed, as a fraction of a running one: its disk (default 0.1)",
    )
    ap.add_argument("--days", type=float, default=0.0, help="days of trace to simulate (default: all)")
    ap.add_argument("--start", type=float, default=0.0, help="day of the trace to start at (default 0)")
    ap.add_argument(
        "--history-days",
        type=float,
        default=0.0,
        help="days before --start the policy learns from first (not measured)",
    )
    ap.add_argument(
        "--smooth", type=int, default=0, help="moving average of the demand over this many seconds (default: none)"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="HELIX_KEY=VALUE", help="override a setting (repeatable)"
    )
    ap.add_argument(
        "--schedule",
        metavar="ACTIONS",
        help="scheduled actions in HELIX_SCHEDULE's syntax, evaluated at trace time (default HELIX_SCHEDULE;"
        " '' for none)",
    )
    ap.add_argument(
        "--trace-start",
        default="0",
        metavar="WHEN",
        help="when the trace's first second is, for --schedule: Unix seconds or an ISO 8601 date-time"
        " (UTC unless it says; default 0, 1970-01-01T00:00:00Z)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-' for stdout)")
    ap.add_argument("--plot", metavar="FILE.png", help="plot demand, fleet and CPU")
    ap.add_argument("--reasons", action="store_true", help="print every scaling action with its reason")
    return ap.parse_args(argv)


def warm_pool_params(args: argparse.Namespace, prog: str, default_size: int) -> tuple[int, float, float] | None:
    """(--warm-pool, --warm-start, --stopped-cost), or None after printing why one is bad."""
    raw = str(default_size) if args.warm_pool is None else args.warm_pool
    try:
        size = int(raw)
        if size < 0:
            raise ValueError
    except ValueError:
        print(f"{prog}: --warm-pool={raw}: expected a whole number of instances, 0 or more", file=sys.stderr)
        return None
    try:
        start = float(args.warm_start)
        # Bounded by the boot time only with a pool: the default must not refuse a short --boot-time.
        if not 0 <= start < float("inf") or (size and not start <= args.boot_time):
            raise ValueError
    except ValueError:
        print(
            f"{prog}: --warm-start={args.warm_start}: expected seconds from 0 to --boot-time ({args.boot_time:g}):"
            " a stopped instance starts no slower than a new one boots",
            file=sys.stderr,
        )
        return None
    try:
        cost = float(args.stopped_cost)
        if not 0 <= cost <= 1:
            raise ValueError
    except ValueError:
        print(
            f"{prog}: --stopped-cost={args.stopped_cost}: expected a fraction from 0 to 1 of a running instance's bill",
            file=sys.stderr,
        )
        return None
    return size, start, cost


def trace_start(raw: str) -> float | None:
    """--trace-start as Unix seconds: a number, or an ISO 8601 date(-time), naive meaning UTC."""
    try:
        value = float(raw)
    except ValueError:
        try:
            when = datetime.fromisoformat(raw.strip())
        except ValueError:
            return None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return value if value == value and abs(value) < 1e11 else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prog = "simulate"
    environ = dict(__import__("os").environ)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("HELIX_"):
            print(f"{prog}: --set={item}: expected HELIX_KEY=VALUE", file=sys.stderr)
            return 2
        environ[key] = value
    try:
        cfg = load_config(environ)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{prog}: bad configuration: {line}", file=sys.stderr)
        return 2
    names = [n.strip() for n in (args.policy or cfg.policy).split(",") if n.strip()]
    for n in names:
        if n not in LIVE_POLICIES + BASELINES + ("oracle",):
            print(
                f"{prog}: --policy={n}: expected one of {', '.join(LIVE_POLICIES + BASELINES + ('oracle',))}",
                file=sys.stderr,
            )
            return 2
    for flag, value in (
        ("--boot-time", args.boot_time),
        ("--capacity", args.capacity),
        ("--peak-instances", args.peak_instances),
    ):
        if value is not None and not value > 0 and not (flag == "--boot-time" and value == 0):
            print(f"{prog}: {flag}={value}: expected a positive number", file=sys.stderr)
            return 2
    pool = warm_pool_params(args, prog, cfg.warm_pool_size)
    if pool is None:
        return 2
    warm_pool, warm_start, stopped_cost = pool
    schedule = cfg.schedule
    if args.schedule is not None:
        try:
            schedule = parse_schedule(args.schedule)
        except ScheduleError as exc:
            print(f"{prog}: --schedule={args.schedule}: expected {exc}", file=sys.stderr)
            return 2
    epoch = trace_start(args.trace_start)
    if epoch is None:
        print(
            f"{prog}: --trace-start={args.trace_start}: expected Unix seconds or an ISO 8601 date-time"
            " such as 2026-03-02T00:00:00Z",
            file=sys.stderr,
        )
        return 2
    try:
        columns = load_columns(args.trace, args.step)
    except TraceError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    demand = columns["rate"]
    # A `backlog` column is the external metric (HELIX_EXTERNAL_TARGET sizes the fleet to it).
    backlog = columns.get("backlog")
    if backlog is not None and cfg.external_target <= 0:
        print(
            f"{prog}: --trace={args.trace}: has a backlog column: expected HELIX_EXTERNAL_TARGET > 0 "
            "(--set HELIX_EXTERNAL_TARGET=…, the backlog per instance)",
            file=sys.stderr,
        )
        return 2
    begin = int(args.start * DAY)
    history = min(begin, int(args.history_days * DAY))
    end = begin + int(args.days * DAY) if args.days > 0 else len(demand)
    if begin >= len(demand) or end <= begin:
        print(
            f"{prog}: --start={args.start:g}: expected a day within the trace's {len(demand) / DAY:.2f} days",
            file=sys.stderr,
        )
        return 2
    demand = smooth(demand[begin - history : end], args.smooth)
    if backlog is not None:
        backlog = backlog[begin - history : end]
    capacity = args.capacity or capacity_for_peak(demand[history:], args.peak_instances, cfg.cpu_target)
    p = params_from(cfg, capacity, args.boot_time, warm_pool, warm_start, stopped_cost, cfg.warm_pool_max_prepared)
    started = time.monotonic()
    # Schedules run at trace time: demand[0] of this slice is the trace's second `begin - history`.
    slice_epoch = epoch + (begin - history)
    outcomes = compare(
        names,
        demand,
        p,
        cfg,
        measure_from=history,
        keep_reasons=args.reasons,
        backlog=backlog,
        schedule=schedule,
        epoch=slice_epoch,
    )
    elapsed = time.monotonic() - started
    simulated = (len(demand) - history) / DAY
    print(
        f"{simulated:.2f} days from day {args.start:g} of {args.trace}"
        + (f" (after {history / DAY:g} days of history)" if history else "")
        + f"; capacity {capacity:.4g} req/s per instance; boot {args.boot_time:g} s; target {cfg.cpu_target:g};"
        f" min {cfg.min_instances}, max {cfg.max_instances}; simulated in {elapsed:.1f} s"
    )
    print(table([(o.name, o.figures.as_dict()) for o in outcomes]))
    if schedule:
        first = datetime.fromtimestamp(slice_epoch + history, UTC).isoformat(timespec="seconds")
        print(
            f"scheduled actions at trace time (the measured part starts {first}; the oracle has none): "
            + "; ".join(f"{a.describe()} at '{a.cron}' {a.tz}" for a in schedule)
        )
    if warm_pool:
        print(
            f"warm pool {warm_pool} (in service {warm_start:g} s after a start, stopped billed at {stopped_cost:g};"
            + (f" at most {cfg.warm_pool_max_prepared} running and stopped;" if cfg.warm_pool_max_prepared else "")
            + " the oracle has none): "
            + "; ".join(
                f"{o.name} {o.figures.stopped_hours:.0f} stopped inst-h, {o.figures.warm_starts} warm starts,"
                f" {o.figures.pool_launches} refills"
                for o in outcomes
                if o.name != "oracle"
            )
        )
    if args.reasons:
        for o in outcomes:
            for t, a, b, why in o.run.reasons:
                if t >= history:
                    print(f"{o.name} t={t - history:.0f}s {a}->{b}: {why}")
    if args.json:
        doc = {
            "trace": args.trace,
            "start_day": args.start,
            "days": simulated,
            "capacity": capacity,
            "boot_time": args.boot_time,
            "warm_pool": warm_pool,
            "warm_start": warm_start,
            "stopped_cost": stopped_cost,
            "warm_max_prepared": cfg.warm_pool_max_prepared,
            "target": cfg.cpu_target,
            "min": cfg.min_instances,
            "max": cfg.max_instances,
            "trace_start": epoch,
            "schedule": [a.name for a in schedule],
            "policies": {o.name: o.figures.as_dict() for o in outcomes},
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
    if args.plot:
        from controller_asg.sim.plot import plot

        plot(args.plot, outcomes, p, title=f"{', '.join(names)} on {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
