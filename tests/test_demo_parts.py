"""The demo's pieces that need no processes: tuning, the environment check, the view, the summary
and the plot."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from deploy.local import demo as demo_mod
from deploy.local.plot import Sample, direction, summarize, write_plot
from deploy.local.view import Action, Frame, View, plain_line, render
from shared.table import ControllerStatus, InstanceRow, State


def test_tuning_sizes_instances_at_the_allotment_and_the_peak_at_about_four():
    t = demo_mod.tune(180, 10.0, None)
    # Whatever the allotment's form, an instance at its target uses ALLOTMENT_CORES x 0.5 cores.
    assert t.cpu_target * float(t.vcpus) == pytest.approx(demo_mod.ALLOTMENT_CORES * 0.5)
    per_instance = t.cpu_target * float(t.vcpus) / 0.010
    assert 3 <= t.peak_rps / per_instance <= 4
    assert t.tuned["HELIX_LOCAL_VCPUS"] == t.vcpus and t.tuned["HELIX_CPU_TARGET"] == f"{t.cpu_target:g}"
    assert demo_mod.tune(60, 10.0, None).tuned["HELIX_SCALE_IN_WINDOW"] == "5"
    assert demo_mod.tune(60, 10.0, 12.5).peak_rps == 12.5


def test_environment_check_names_bad_keys_and_ignores_the_demos_own():
    t = demo_mod.tune(60, 10.0, None)
    assert demo_mod.check_environment(t, {"HELIX_SHM_NAME": "a/b", "HELIX_PROVIDER": "ec2", "HELIX_TOKEN": "x"}) == []
    errors = demo_mod.check_environment(t, {"HELIX_MAX_INSTANCES": "lots", "HELIX_POLL_INTERVL": "1"})
    assert any(e.startswith("HELIX_MAX_INSTANCES=lots: expected an integer") for e in errors)
    assert any(
        "HELIX_POLL_INTERVL=<hidden, 1 characters>: expected a known HELIX_ setting (did you mean HELIX_POLL_INTERVAL?)"
        in e
        for e in errors
    )


def frame() -> Frame:
    now = time.time()
    rows = [
        InstanceRow(
            "local-a1", "127.0.0.1:1", State.HEALTHY, zone="za", cpu=0.9, app_port=8001, registered_at=now - 30
        ),
        InstanceRow("local-b2", "127.0.0.1:2", State.REGISTERING, zone="zb", registered_at=now - 2),
    ]
    ctl = ControllerStatus(
        desired=3, in_service=1, pending=2, action="launch", reason="mean CPU 0.90 over 1", policy="target"
    )
    return Frame(
        elapsed=42.0,
        duration=60,
        demand=33.3,
        served=30,
        failed=1,
        served_total=900,
        failed_total=2,
        instances=rows,
        controller=ctl,
        mean_cpu=0.9,
        cpu_target=0.125,
    )


def test_live_view_and_plain_lines_show_the_same_facts():
    f = frame()
    action = Action(
        at=41.0,
        action="launch",
        count=2,
        reason="mean CPU 0.90 over 1 in-service instance",
        instance_ids=("local-b2", "local-c3"),
    )
    console = Console(record=True, width=160, force_terminal=False)
    console.print(render(f, [action], ["HELIX_POLL_INTERVAL=1"]))
    text = console.export_text()
    for fact in (
        "demand 33.3 req/s",
        "failed 1/s (2 total)",
        "desired 3",
        "in service 1",
        "pending 2",
        "local-a1",
        "healthy",
        "registering",
        "0.90",
        "8001",
        "launch 2 [local-b2, local-c3]: mean CPU 0.90",
        "HELIX_POLL_INTERVAL=1",
        "instances (1 healthy)",
        "last decision: launch: mean CPU 0.90 over 1",
    ):
        assert fact in text, fact
    line = plain_line(f)
    assert line.startswith("t= 42.0s running: demand  33.3 rps, served 30/s failed 1/s, healthy 1/2, mean CPU 0.90")
    assert "desired 3 in-service 1 pending 2" in line
    # Without a terminal: a progress line at most every `every` seconds, every action at once.
    out = Console(record=True, width=300, force_terminal=False)
    with View(out, live=False, settings=[], every=5) as view:
        view.update(f)
        view.update(Frame(elapsed=43.0, duration=60))
        view.action(action)
    lines = out.export_text().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("scaling: t= 41.0s launch 2 [local-b2, local-c3]: mean CPU 0.90")  # not eaten as markup


def test_summary_and_plot(tmp_path):
    samples = [
        Sample(
            t=i,
            demand=10 + i,
            served=10 + i,
            failed=0,
            healthy=h,
            registered=h,
            desired=h,
            mean_cpu=None if i == 0 else 0.1,
        )
        for i, h in enumerate([1, 1, 2, 4, 4, 3, 2])
    ]
    actions = [
        Action(1.5, "launch", 1, "r"),
        Action(2.5, "launch", 2, "r"),
        Action(4.5, "terminate", 1, "r"),
        Action(5.5, "terminate", 1, "r"),
        Action(3.0, "replace", 1, "dead"),
    ]
    s = summarize(samples, actions, served=990, failed=10, duration=60)
    assert (s.peak_instances, s.final_instances, s.scale_outs, s.scale_ins, s.actions) == (4, 2, 2, 2, 5)
    assert s.mean_cpu == pytest.approx(0.1) and s.failed_fraction == pytest.approx(0.01)
    assert [direction(a) for a in ("launch", "terminate", "replace", "scale-out", "scale-in", "freeze")] == [
        "out",
        "in",
        "",
        "out",
        "in",
        "",
    ]
    assert any("4 healthy (at the end: 2)" in x for x in s.lines())
    path = write_plot(str(tmp_path / "p.png"), samples, actions, 0.125, "test")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
