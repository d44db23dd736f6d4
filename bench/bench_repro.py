"""`make bench BENCH_ARGS=repro`: the cost-safety issue's reproductions, as figures, through the
fault-injection harness (tests/faultsim.py). Run against an older checkout (with its harness
adapted), the same scenarios give the "before" column of that issue's closing note."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from shared.table import MetricsTable
from tests.faultsim import Harness, quiet_logs, unique_table_name


def _run(title: str, scenario: Callable[[Harness], str], **config: str | int) -> None:
    name = unique_table_name()
    with tempfile.TemporaryDirectory(prefix="helix-bench-repro-") as state:
        h = Harness(name, state, 0, **config)
        try:
            print(f"{title}: {scenario(h)}", flush=True)
        finally:
            h.close()
            MetricsTable.remove(name)


def _terminate_fails_forever(h: Harness) -> str:
    h.monitor.load = 1.2
    h.run_until(120)
    sick = next(i for i in h.cloud.owned() if i.state == "running")
    sick.unterminatable = sick.agent_dead = True
    before = h.cloud.launches
    h.run_until(120 + 3600)
    return f"launches in 1 h {h.cloud.launches - before}, billable at the end {len(h.cloud.billable())}"


def _lost_replies_and_lag(h: Harness) -> str:
    h.monitor.load = 1.0
    h.run_until(60)
    h.cloud.pending_launch_faults += ["lost_reply"] * 3
    h.cloud.lag_until, h.cloud.lag = 10_000.0, 60.0
    h.monitor.load = 20.0
    h.run_until(400)
    return f"peak billable {h.cfg.max_instances + h.cloud.worst_overshoot} (max {h.cfg.max_instances})"


def _broken_image(h: Harness) -> str:
    h.cloud.broken_image = True
    h.run_until(3600)
    return (
        f"launches in 1 h {h.cloud.launches}, unhealthy instance-hours {h.report.instance_seconds_unhealthy / 3600:.2f}"
    )


def _slow_app(h: Harness) -> str:
    h.run_until(10)
    for inst in h.cloud.owned():
        inst.app_at = (inst.agent_at or 0) + 20
    h.run_until(3600)
    return f"launches in 1 h {h.cloud.launches} (2 needed)"


def _replacement_while_terminating(h: Harness) -> str:
    h.run_until(60)
    next(i for i in h.cloud.owned() if i.state == "running").agent_dead = True
    h.run_until(200)
    return f"peak billable {h.cfg.max_instances + h.cloud.worst_overshoot} (max {h.cfg.max_instances})"


def main() -> None:
    quiet_logs()
    _run(
        "terminate fails forever (min 5, max 10)",
        _terminate_fails_forever,
        HELIX_MIN_INSTANCES=5,
        HELIX_MAX_INSTANCES=10,
    )
    _run(
        "lost replies + listing lag (max 10)",
        _lost_replies_and_lag,
        HELIX_MIN_INSTANCES=5,
        HELIX_MAX_INSTANCES=10,
        HELIX_POLICY="target",
    )
    _run(
        "broken image (min 2, max 10, grace 30)",
        _broken_image,
        HELIX_MIN_INSTANCES=2,
        HELIX_MAX_INSTANCES=10,
        HELIX_HEALTH_GRACE=30,
    )
    _run("app needs 20 s (grace 40)", _slow_app, HELIX_MIN_INSTANCES=2, HELIX_MAX_INSTANCES=4, HELIX_HEALTH_GRACE=40)
    _run(
        "replacement while one terminates (min = max = 4)",
        _replacement_while_terminating,
        HELIX_MIN_INSTANCES=4,
        HELIX_MAX_INSTANCES=4,
    )


if __name__ == "__main__":
    main()
