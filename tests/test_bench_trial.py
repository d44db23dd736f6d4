"""`make bench BENCH_ARGS=bursty`'s trial mode (BENCH_PREDICTIVE, BENCH_ONLY): what it accepts,
what it refuses in one line, and that the settings it names reach the policy it runs."""

from __future__ import annotations

import pytest

from bench import bench_bursty

KEYS = ["nasa", "short-bursts/s1"]


def test_settings_and_scenarios_are_parsed(monkeypatch):
    monkeypatch.setenv("BENCH_PREDICTIVE", "in_margin=0.05, hold_leads=4")
    monkeypatch.setenv("BENCH_ONLY", "nasa@20,short-bursts/s1")
    assert bench_bursty.trial_settings() == {"in_margin": 0.05, "hold_leads": 4.0}
    assert bench_bursty.trial_tasks(KEYS) == [("nasa", 20.0)] + [("short-bursts/s1", b) for b in bench_bursty.BOOTS]
    monkeypatch.delenv("BENCH_ONLY")
    assert len(bench_bursty.trial_tasks(KEYS)) == len(KEYS) * len(bench_bursty.BOOTS)


@pytest.mark.parametrize(
    "env, value, message",
    [
        (
            "BENCH_PREDICTIVE",
            "in_margn=0.1",
            "'in_margn': expected one of burst_headroom, burst_margin, burst_size, cpu_target,",
        ),
        ("BENCH_PREDICTIVE", "in_margin=lots", "in_margin=lots: expected a number"),
        ("BENCH_PREDICTIVE", "metric=1", "'metric': expected one of"),
        ("BENCH_ONLY", "nasa@21", "'nasa@21': expected a member of nasa, short-bursts/s1, @ one of"),
        ("BENCH_ONLY", "nope", "'nope': expected a member of"),
    ],
)
def test_bad_values_stop_with_one_line(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as stop:
        bench_bursty.trial_settings() if env == "BENCH_PREDICTIVE" else bench_bursty.trial_tasks(KEYS)
    assert message in str(stop.value) and "\n" not in str(stop.value)


def test_the_trial_settings_reach_the_policy(monkeypatch):
    monkeypatch.delenv("BENCH_PREDICTIVE", raising=False)
    _, _, default = bench_bursty.run_one(("short-bursts/s1", 20.0))
    monkeypatch.setenv("BENCH_PREDICTIVE", "in_margin=0.5")
    _, _, trial = bench_bursty.run_one(("short-bursts/s1", 20.0))
    assert trial["k8s-hpa"] == default["k8s-hpa"] and trial["oracle"] == default["oracle"]
    assert trial["predictive"]["cost_vs_oracle"] > default["predictive"]["cost_vs_oracle"]
