"""The simulator runs scheduled actions as the live controller does (controller_asg/bounds.py), at
trace time: a schedule that raises min at a time of day changes the simulated fleet then."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime

import numpy as np
import pytest

from controller_asg.sim.runner import compare, params_from
from shared.config import load_config
from shared.schedule import parse_schedule
from tests.test_simulate import run_cli

MONDAY_6H = datetime(2026, 3, 2, 6, tzinfo=UTC).timestamp()  # the trace's first second
HOUR = 3600


def at(hour: float) -> int:
    """The trace second of `hour` o'clock UTC on that Monday."""
    return int((hour - 6) * HOUR)


@pytest.fixture(scope="module")
def setup():
    cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_MIN_INSTANCES": "1", "HELIX_MAX_INSTANCES": "10"})
    demand = np.full(6 * HOUR, 10.0)  # 6:00 to 12:00, one instance's worth at the target
    p = params_from(cfg, capacity=25.0, boot_time=60.0)
    return cfg, demand, p


@pytest.mark.parametrize("policy", ["predictive", "target"])
def test_a_scheduled_min_raises_the_fleet_for_its_period(setup, policy):
    cfg, demand, p = setup
    schedule = parse_schedule("business cron='0 8 * * MON-FRI' for=2h min=4")
    [plain] = compare([policy], demand, p, cfg)
    [run] = compare([policy], demand, p, cfg, keep_reasons=True, schedule=schedule, epoch=MONDAY_6H)
    served = run.run.in_service
    # Before 8:00 the schedule changes nothing.
    assert np.array_equal(served[: at(8)], plain.run.in_service[: at(8)])
    assert served[at(7) : at(8)].max() <= 2
    # From 8:00 plus the boot time to 10:00, at least the scheduled min.
    assert served[at(8) + 61 : at(10)].min() >= 4
    assert plain.run.in_service[at(8) + 61 : at(10)].max() <= 2
    # Then the fleet goes back to what the load needs, within the scale-in window.
    assert served[at(10) + int(cfg.scale_in_window) + 120 :].max() <= 2
    whys = [why for _, _, _, why in run.run.reasons]
    assert any('min 4 set by scheduled action "business"' in why for why in whys), whys
    assert run.figures.instance_hours > plain.figures.instance_hours


def test_a_scheduled_desired_pins_the_fleet_and_a_weekend_does_not_fire(setup):
    cfg, demand, p = setup
    schedule = parse_schedule("pin cron='0 8 * * MON-FRI' for=1h desired=3")
    [run] = compare(["predictive"], demand, p, cfg, schedule=schedule, epoch=MONDAY_6H)
    served = run.run.in_service
    assert set(served[at(8) + 61 : at(9)].tolist()) == {3}
    assert served[at(9) + int(cfg.scale_in_window) + 120 :].max() <= 2
    # The same trace on a Saturday: no business hours.
    saturday = MONDAY_6H + 5 * 86400
    [weekend] = compare(["predictive"], demand, p, cfg, schedule=schedule, epoch=saturday)
    assert weekend.run.in_service[at(8) : at(9)].max() <= 2


def test_the_cli_takes_a_schedule_and_when_the_trace_starts(tmp_path):
    trace = tmp_path / "flat.txt.gz"
    with gzip.open(trace, "wt") as fh:
        fh.write("\n".join(["10"] * (4 * HOUR)))
    # 07:00 Paris is 06:00 UTC in March (CET): the trace starts at 06:00 Paris, the action at 07:00 Paris.
    schedule = "early cron='0 7 * * *' tz=Europe/Paris for=30m min=5"
    common = ["--trace", str(trace), "--capacity", "25", "--boot-time", "60", "--policy", "target", "--reasons"]
    r = run_cli(*common, "--trace-start", "2026-03-02T06:00+01:00", "--schedule", schedule)
    assert r.returncode == 0, r.stderr
    assert "scheduled actions at trace time" in r.stdout and "early (min=5)" in r.stdout
    launches = [line for line in r.stdout.splitlines() if 'min 5 set by scheduled action "early"' in line]
    assert launches and launches[0].startswith("target t=3600s "), r.stdout
    # By default HELIX_SCHEDULE (here through --set); the trace start as Unix seconds.
    start = datetime(2026, 3, 2, 5, tzinfo=UTC).timestamp()
    r = run_cli(*common, "--trace-start", f"{start:.0f}", "--set", f"HELIX_SCHEDULE={schedule}")
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("target t=3600s ") and "early" in line for line in r.stdout.splitlines())
    # --schedule '' turns it off.
    r = run_cli(*common, "--set", f"HELIX_SCHEDULE={schedule}", "--schedule", "")
    assert r.returncode == 0 and "scheduled action" not in r.stdout


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--schedule", "early cron='0 7 * * *' max=x"],
            "simulate: --schedule=early cron='0 7 * * *' max=x: expected max= an integer from 0 to 100000"
            ' in action "early" (got max=x)',
        ),
        (
            ["--trace-start", "yesterday"],
            "simulate: --trace-start=yesterday: expected Unix seconds or an ISO 8601 date-time such as"
            " 2026-03-02T00:00:00Z",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, line):
    trace = tmp_path / "t.txt"
    trace.write_text("1\n2\n")
    r = run_cli("--trace", str(trace), "--capacity", "1", *args)
    assert r.returncode == 2
    assert r.stderr.strip() == line
