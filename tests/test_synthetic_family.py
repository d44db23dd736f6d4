"""The synthetic family (controller_asg/sim/synthetic.py, issue 12 §4): reproducible per seed, sane
values, and each shape has the property its description claims, on every seed the bench reports
and one more."""

from __future__ import annotations

import numpy as np
import pytest

from controller_asg.sim import synthetic
from controller_asg.sim.synthetic import DAY, HOUR

SEEDS = (*synthetic.FAMILY_SEEDS, 4)


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of True in `mask`."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return starts, ends - starts


def baseline(x: np.ndarray, block: int) -> np.ndarray:
    """The median of the surrounding three blocks, held over each block: the load under its bursts."""
    out = np.empty(len(x))
    for i in range(0, len(x), block):
        out[i : i + block] = np.median(x[max(0, i - block) : i + 2 * block])
    return out


def test_the_family_has_every_shape_on_at_least_three_seeds():
    assert len(synthetic.FAMILY_SEEDS) >= 3
    names = [m.name for seed in synthetic.FAMILY_SEEDS for m in synthetic.family(seed)]
    assert len(names) == len(set(names)) == len(synthetic.SHAPES) * len(synthetic.FAMILY_SEEDS)
    wanted = {"short-bursts", "recurring-spikes", "recurring-bursts", "weekly", "ramps", "heavy-tail", "outage"}
    wanted |= {"mixed-bursts"}
    assert wanted <= set(synthetic.SHAPES)
    with pytest.raises(ValueError, match="shape=nope: expected one of"):
        synthetic.member("nope", 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_members_are_deterministic_per_seed_finite_and_non_negative(seed):
    first, again, other = synthetic.family(seed), synthetic.family(seed), synthetic.family(seed + 10)
    for a, b, c in zip(first, again, other, strict=True):
        assert a.demand.tobytes() == b.demand.tobytes(), a.name
        assert a.demand.tobytes() != c.demand.tobytes(), a.name
        assert np.all(np.isfinite(a.demand)) and a.demand.min() >= 0, a.name
        assert 0 <= a.history < len(a.demand) and a.description, a.name
        # history where it matters (seasonal shapes): 1 to 7 days; hours of measured demand at least
        assert a.history in (0, DAY, 7 * DAY) and len(a.demand) - a.history >= 6 * HOUR, a.name
        assert a.shape in synthetic.SHAPES and a.name == f"{a.shape}/s{seed}"


@pytest.mark.parametrize("seed", SEEDS)
def test_short_bursts_are_shorter_than_a_boot_and_random(seed):
    d = synthetic.member("short-bursts", seed).demand
    starts, lengths = runs(d > 1.5 * baseline(d, 600))
    assert len(starts) >= 10  # 4-10 an hour for 6 hours; the weakest may stay under 1.5x
    assert lengths.max() <= 80 < 90
    gaps = np.diff(starts)
    assert gaps.min() >= 120 and gaps.std() > 0.3 * gaps.mean()  # irregular, not a metronome


@pytest.mark.parametrize("seed", SEEDS)
def test_recurring_spikes_and_bursts_come_back_at_about_the_same_time_every_day(seed):
    for shape, block, longest, slack in (
        ("recurring-spikes", 600, 80, 2 * 90),
        ("recurring-bursts", 3600, 1200, 2 * 300),
    ):
        m = synthetic.member(shape, seed)
        assert m.history == DAY
        starts, lengths = runs(m.demand > 1.5 * baseline(m.demand, block))
        assert lengths.max() <= longest
        if shape == "recurring-bursts":
            assert lengths.min() >= 120  # minutes, not seconds
        days = starts // DAY
        assert set(days.tolist()) == {0, 1, 2}
        first = np.sort(starts[days == 0] % DAY)
        assert 4 <= len(first) <= 7
        for day in (1, 2):
            later = np.sort(starts[days == day] % DAY)
            assert len(later) == len(first)
            assert np.abs(later - first).max() <= slack + 60  # ± jitter each day, plus the rise


@pytest.mark.parametrize("seed", SEEDS)
def test_weekly_has_a_daily_cycle_and_quieter_weekends(seed):
    m = synthetic.member("weekly", seed)
    assert m.history == 7 * DAY and len(m.demand) == 9 * DAY
    days = m.demand.reshape(9, DAY)
    weekday = (np.arange(9) + (2 * seed + 3)) % 7  # the member's first day, as its description says
    hourly = days.reshape(9, 24, HOUR).mean(axis=2)
    assert np.all(hourly.max(axis=1) >= 3 * hourly.min(axis=1))  # nights much quieter than days
    weekend, work = days[weekday >= 5].mean(), days[weekday < 5].mean()
    assert weekend < 0.9 * work
    names = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    assert names[weekday[7]] in m.description  # measured days: a week after the first


@pytest.mark.parametrize("seed", SEEDS)
def test_ramps_are_slow_and_wide(seed):
    d = synthetic.member("ramps", seed).demand
    smooth = np.convolve(d, np.ones(60) / 60, mode="valid")
    span = smooth.max() - smooth.min()
    assert smooth.max() >= 2.5 * smooth.min()
    assert np.abs(smooth[60:] - smooth[:-60]).max() <= 0.15 * span  # no minute moves it far


@pytest.mark.parametrize("seed", SEEDS)
def test_heavy_tail_noise_has_a_narrow_body_and_a_far_tail(seed):
    d = synthetic.member("heavy-tail", seed).demand
    r = d / baseline(d, HOUR)
    p25, p50, p75, p999 = np.percentile(r, [25, 50, 75, 99.9])
    assert p75 / p25 < 1.5
    # a lognormal with this body would put its 99.9th percentile near 2.2x the median
    assert p999 / p50 >= 2.5 and r.max() >= 3.5 * p50


@pytest.mark.parametrize("seed", SEEDS)
def test_an_outage_drops_demand_for_10_to_30_minutes_then_it_returns(seed):
    m = synthetic.member("outage", seed)
    d = m.demand
    starts, lengths = runs(d < 0.05 * np.median(d))
    assert len(starts) == 1 and starts[0] >= m.history  # one outage, in the measured part
    assert 10 * 60 <= lengths[0] <= 30 * 60 + 90
    before = np.median(d[starts[0] - HOUR : starts[0]])
    after = d[starts[0] + lengths[0] : starts[0] + lengths[0] + 15 * 60].max()
    surge = 1 + (seed - 1) % 3
    if surge > 1:
        assert after >= 1.5 * before
    else:
        assert after <= 1.4 * before
    assert f"×{surge}" in m.description if surge > 1 else "no surge" in m.description


@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_bursts_are_both_shorter_and_far_longer_than_a_boot_at_random_times(seed):
    m = synthetic.member("mixed-bursts", seed)
    assert m.history == DAY
    parts = synthetic.mixed_bursts_parts(seed)
    assert parts.demand.tobytes() == m.demand.tobytes()
    lengths = np.array([length for _, length in parts.bursts])
    # every boot time the bench measures (20-300 s) has bursts on both sides of it
    assert (lengths < 20).sum() >= 5 and (lengths > 300).sum() >= 20
    assert 0.2 <= (lengths < 90).mean() <= 0.6
    starts = np.array([start for start, _ in parts.bursts])
    gaps = np.diff(starts) - lengths[:-1]
    assert gaps.min() >= 0 and gaps.std() > 0.5 * gaps.mean()  # never overlapping, irregular
    # each burst is there in the demand: well above the load under it, for its length
    start, length = max(parts.bursts, key=lambda b: b[1])
    assert np.median(parts.mult[start : start + length]) >= 1.5


def test_bursty_flags_are_what_the_goals_judge():
    flags = {m.shape: m.bursty for m in synthetic.family(1)}
    assert flags == {
        "short-bursts": True,
        "recurring-spikes": True,
        "recurring-bursts": True,
        "weekly": False,
        "ramps": False,
        "heavy-tail": True,
        "outage": True,
        "mixed-bursts": True,
    }
