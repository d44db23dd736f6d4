"""Synthetic demand shapes (requests/s per second), reproducible from a seed.

Shapes the default policy was NOT tuned on are what the bench's "never tuned on" rows use:
`flash_crowd` and `recurring_bursts`. `diurnal`, `ramps` and `noisy_constant` serve tests.
`family(seed)` is the bursty family `bench/bench_bursty.py` reports member by member (below).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DAY = 86400


def _noise(n: int, rng: np.random.Generator, rel: float, corr: int = 30) -> np.ndarray:
    """Multiplicative noise around 1 with relative size `rel`, correlated over about `corr` seconds."""
    white = rng.normal(0.0, 1.0, n + corr)
    kernel = np.ones(corr) / np.sqrt(corr)
    return np.maximum(0.0, 1.0 + rel * np.convolve(white, kernel, mode="valid")[:n])


def diurnal(days: float, base: float, peak: float, seed: int = 1, noise: float = 0.05) -> np.ndarray:
    """A daily cycle from `base` (04:00) to `peak` (16:00) requests/s, with a quieter weekend."""
    n = int(days * DAY)
    t = np.arange(n)
    day_shape = 0.5 - 0.5 * np.cos(2 * np.pi * ((t % DAY) / DAY - 4 / 24))
    weekday = ((t // DAY) % 7 < 5).astype(float) * 0.3 + 0.7
    rng = np.random.default_rng(seed)
    return (base + (peak - base) * day_shape * weekday) * _noise(n, rng, noise)


def flash_crowd(
    hours: float = 6.0,
    base: float = 10.0,
    factor: float = 10.0,
    at: float = 3 * 3600,
    rise: float = 60.0,
    hold: float = 20 * 60,
    seed: int = 2,
) -> np.ndarray:
    """Steady `base` requests/s; at `at` seconds it climbs to `factor` × base within `rise` seconds,
    holds for `hold` seconds, then falls back as fast."""
    n = int(hours * 3600)
    t = np.arange(n, dtype=float)
    up = np.clip((t - at) / rise, 0, 1)
    down = np.clip((t - at - rise - hold) / rise, 0, 1)
    level = base * (1 + (factor - 1) * (up - down))
    return level * _noise(n, np.random.default_rng(seed), 0.03)


def recurring_bursts(
    days: float = 8.0,
    base: float = 10.0,
    peak: float = 30.0,
    burst: float = 4.0,
    times: tuple[float, ...] = (9.5, 14.0, 20.0),
    jitter: float = 600.0,
    rise: float = 45.0,
    hold: float = 15 * 60,
    seed: int = 3,
) -> np.ndarray:
    """A diurnal load with bursts that recur every day at about the same times of day (± `jitter`
    seconds): each multiplies the load by `burst` within `rise` seconds and holds for `hold`."""
    rng = np.random.default_rng(seed)
    d = diurnal(days, base, peak, seed=seed, noise=0.04)
    n = len(d)
    t = np.arange(n, dtype=float)
    mult = np.ones(n)
    for day in range(int(np.ceil(days))):
        for h in times:
            start = day * DAY + h * 3600 + rng.uniform(-jitter, jitter)
            if start >= n:
                continue
            up = np.clip((t - start) / rise, 0, 1)
            down = np.clip((t - start - rise - hold) / rise, 0, 1)
            mult += (burst - 1) * (up - down)
    return d * mult


def ramps(
    hours: float = 4.0, low: float = 10.0, high: float = 100.0, ramp: float = 1800.0, seed: int = 4
) -> np.ndarray:
    """Low, a linear ramp to high over `ramp` seconds, high, a ramp back down, low."""
    n = int(hours * 3600)
    t = np.arange(n, dtype=float)
    q = n / 4
    up = np.clip((t - q) / ramp, 0, 1)
    down = np.clip((t - 3 * q) / ramp, 0, 1)
    return (low + (high - low) * (up - down)) * _noise(n, np.random.default_rng(seed), 0.03)


def noisy_constant(seconds: int, level: float, rel: float = 0.1, seed: int = 5) -> np.ndarray:
    return level * _noise(seconds, np.random.default_rng(seed), rel, corr=5)


# --- the bursty family (issue 12 §4) ---------------------------------------------------------------
# Shapes a bench reports member by member, several seeds each, so that no single shape can be fitted:
# a policy change is judged on all of them. Every shape draws from its own generator, seeded by
# (seed, shape), so adding a shape never changes another's demand.

HOUR = 3600
FAMILY_SEEDS = (1, 2, 3)


@dataclass(eq=False)
class Member:
    name: str  # "<shape>/s<seed>"
    shape: str
    seed: int
    description: str
    demand: np.ndarray  # requests/s, one value per second, history first
    history: int  # seconds of history the policies learn from before the measured part
    bursty: bool  # whether the bursty-traffic goals apply to it (smooth shapes are reported, not judged)


def _pulse(mult: np.ndarray, start: int, length: int, amp: float, edge: int) -> None:
    """Add a burst to a multiplier in place: above 1 for exactly `length` seconds from `start`,
    reaching ×`amp` after `edge` seconds and leaving it `edge` seconds before its end."""
    n = len(mult)
    lo, hi = max(0, start), min(n, start + length)
    if hi <= lo:
        return
    k = np.arange(lo, hi, dtype=float) - start
    # +1 so the first and the last second of the burst are already above the base
    shape = np.minimum(1.0, np.minimum(k + 1, length - k) / max(1, edge))
    mult[lo:hi] += (amp - 1.0) * shape


def _day_cycle(n: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
    """0..1 over each day: a trough in the small hours (02:00-06:00), a peak about 12 hours later,
    sharpened or flattened by a drawn exponent so days differ in shape across seeds."""
    t = np.arange(offset, offset + n)
    trough = rng.uniform(2.0, 6.0)
    sharp = rng.uniform(0.7, 1.8)
    return (0.5 - 0.5 * np.cos(2 * np.pi * ((t % DAY) / DAY - trough / 24))) ** sharp


def short_bursts(seed: int, hours: float = 6.0) -> np.ndarray:
    """A steady load drifting ±20% over a few hours, hit at random times (Poisson, 4-10 an hour) by
    bursts of ×2-5 lasting 20-80 s: each is over before an instance booted for it would serve."""
    return short_bursts_parts(seed, hours).demand


@dataclass
class BurstParts:
    """A member made of random bursts (`short_bursts`, `mixed_bursts`) taken apart: the demand is
    base × mult × noise."""

    base: np.ndarray  # the drifting level
    mult: np.ndarray  # the bursts: ×1 outside them
    noise: np.ndarray
    bursts: list[tuple[int, int]]  # (start, length) of each burst, in seconds
    quiet_after: int  # seconds after a burst in which no other starts

    @property
    def demand(self) -> np.ndarray:
        return self.base * self.mult * self.noise

    @property
    def calm(self) -> np.ndarray:
        """The demand without its bursts."""
        return self.base * self.noise

    def after(self, start: int) -> BurstParts:
        """The parts from second `start` on (a member's measured part, after its history); a burst
        running at `start` keeps the rest of its length."""
        bursts = [
            (max(0, at - start), length - max(0, start - at)) for at, length in self.bursts if at + length > start
        ]
        return BurstParts(self.base[start:], self.mult[start:], self.noise[start:], bursts, self.quiet_after)


def _random_bursts(
    rng: np.random.Generator,
    n: int,
    rate: float,
    first: float,
    gap: int,
    length_of: Callable[[], int],
    shape_of: Callable[[], tuple[float, int]],
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(multiplier, bursts) over `n` seconds: bursts starting at random (Poisson, `rate` a second)
    from second `first`, at least `gap` seconds after the last one's end, each `length_of()`
    seconds long and shaped (×amp, edge) by `shape_of()`; drawn in that order, until one would
    run past the end."""
    mult = np.ones(n)
    bursts = []
    at = first
    while True:
        at += rng.exponential(1 / rate)
        length = length_of()
        if at + length >= n:
            break
        amp, edge = shape_of()
        _pulse(mult, int(at), length, amp, edge)
        bursts.append((int(at), length))
        at += length + gap
    return mult, bursts


def short_bursts_parts(seed: int, hours: float = 6.0) -> BurstParts:
    rng = np.random.default_rng([seed, 1])
    n = int(hours * HOUR)
    t = np.arange(n)
    base = 10.0 * (1 + 0.2 * np.sin(2 * np.pi * t / rng.uniform(2, 4) / HOUR + rng.uniform(0, 2 * np.pi)))
    gap = 120  # bursts never merge into one longer than 80 s
    # the first ten minutes are calm: the initial fleet is sized for them
    mult, bursts = _random_bursts(
        rng, n, rng.uniform(4, 10) / HOUR, 600.0, gap, lambda: int(rng.integers(20, 81)), lambda: (rng.uniform(2, 5), 3)
    )
    return BurstParts(base, mult, _noise(n, rng, 0.05), bursts, gap)


def _recurring(
    seed: int, tag: int, days: float, lengths: tuple[int, int], jitter: float, rise: int, slot: int
) -> np.ndarray:
    """4-7 bursts a day at times of day drawn once, each in its own `slot`-second slot between
    06:00 and 23:00 (so even jittered they stay 10 minutes apart), recurring every day ± `jitter`."""
    rng = np.random.default_rng([seed, tag])
    n = int(days * DAY)
    level = 10.0 + 20.0 * _day_cycle(n, rng)
    mult = np.ones(n)
    count = int(rng.integers(4, 8))
    slots = np.arange(6 * HOUR // slot, 23 * HOUR // slot)
    times = np.sort(rng.choice(slots, size=count, replace=False)) * float(slot)
    times += jitter + rng.uniform(0, slot - lengths[1] - 2 * jitter - 600, count)
    length = rng.integers(lengths[0], lengths[1] + 1, count)
    amp = rng.uniform(2, 4, count)
    for day in range(int(np.ceil(days))):
        for i in range(count):
            start = day * DAY + times[i] + rng.uniform(-jitter, jitter)
            _pulse(mult, int(start), int(length[i]), amp[i], rise)
    return level * mult * _noise(n, rng, 0.04)


def recurring_spikes(seed: int, days: float = 3.0) -> np.ndarray:
    """A diurnal load with 4-7 spikes a day (×2-4, 20-80 s each) at the same times every day, ±90 s:
    a cron job's rush, too short for a launch to catch but there again tomorrow."""
    return _recurring(seed, 2, days, (20, 80), 90.0, 3, 1800)


def recurring_bursts_family(seed: int, days: float = 3.0) -> np.ndarray:
    """A diurnal load with 4-7 bursts a day (×2-4, 3-20 min each, rising over 1 min) at the same
    times every day, ±5 min."""
    return _recurring(seed, 3, days, (180, 1200), 300.0, 60, HOUR)


def weekly(seed: int, days: float = 9.0, weekday: int = 0) -> np.ndarray:
    """Diurnal and weekly cycles: weekdays peak at 4-10× the night, weekends at 40-80% of a
    weekday, a second evening peak on some seeds; 5% noise. Second 0 is 00:00 on `weekday`
    (0 = Monday)."""
    rng = np.random.default_rng([seed, 4])
    n = int(days * DAY)
    t = np.arange(n)
    day = _day_cycle(n, rng)
    evening = rng.uniform(0.0, 0.4) * np.exp(-0.5 * (((t % DAY) / HOUR - 21.0) / 1.5) ** 2)
    dow = (t // DAY + weekday) % 7
    week = np.where(dow < 5, 1.0, rng.uniform(0.4, 0.8))
    night = 10.0
    peak = night * rng.uniform(4, 10)
    return (night + (peak - night) * (day + evening) * week) * _noise(n, rng, 0.05)


def ramps_family(seed: int, hours: float = 8.0) -> np.ndarray:
    """Holds of 10-40 min between slow linear ramps of 20-90 min, up or down, each to a level
    drawn between 1× and 8× the lowest; 3% noise."""
    rng = np.random.default_rng([seed, 5])
    n = int(hours * HOUR)
    knots_t = [0.0]
    knots_v = [float(rng.uniform(1, 3))]
    while knots_t[-1] < n:
        hold = rng.uniform(10, 40) * 60
        ramp = rng.uniform(20, 90) * 60
        knots_t += [knots_t[-1] + hold, knots_t[-1] + hold + ramp]
        level = knots_v[-1]
        # each ramp changes the level at least 1.5×, up or down within 1..8
        while abs(np.log(level / knots_v[-1])) < np.log(1.5):
            level = float(rng.uniform(1, 8))
        knots_v += [knots_v[-1], level]
    v = np.interp(np.arange(n), knots_t, knots_v)
    return 10.0 * v * _noise(n, rng, 0.03)


def heavy_tail(seed: int, days: float = 2.0) -> np.ndarray:
    """A diurnal load (×1 to ×4) under lognormal noise (σ 0.25, correlated over about 5 s) and
    Pareto-sized spikes (α 1.5, 2-5 an hour, 10-120 s, capped at ×2.5): most seconds are calm,
    a few are far from the mean."""
    rng = np.random.default_rng([seed, 6])
    n = int(days * DAY)
    level = 10.0 + 30.0 * _day_cycle(n, rng)
    z = np.convolve(rng.normal(0.0, 1.0, n + 4), np.ones(5) / np.sqrt(5), mode="valid")[:n]
    sigma = 0.25
    mult = np.exp(sigma * z - sigma * sigma / 2)
    spikes = np.ones(n)
    rate = rng.uniform(2, 5) / HOUR
    at = 0.0
    while True:
        at += rng.exponential(1 / rate)
        length = int(rng.integers(10, 121))
        if at + length >= n:
            break
        _pulse(spikes, int(at), length, min(2.5, 1.0 + 0.3 * rng.pareto(1.5)), 2)
        at += length
    return level * mult * spikes


def mixed_bursts_parts(seed: int, days: float = 2.0) -> BurstParts:
    """`mixed_bursts` taken apart (its `quiet_after` is 0: a burst may follow another at once)."""
    rng = np.random.default_rng([seed, 8])
    n = int(days * DAY)
    base = 10.0 + 20.0 * _day_cycle(n, rng)
    mult, bursts = _random_bursts(
        rng,
        n,
        rng.uniform(3, 8) / HOUR,
        0.0,
        0,
        lambda: int(np.exp(rng.uniform(np.log(15), np.log(1200)))),
        lambda: (rng.uniform(1.5, 4), int(rng.integers(3, 31))),
    )
    return BurstParts(base, mult, _noise(n, rng, 0.05), bursts, 0)


def mixed_bursts(seed: int, days: float = 2.0) -> np.ndarray:
    """A diurnal load hit at random times (Poisson, 3-8 an hour) by bursts of ×1.5-4 whose lengths
    are spread evenly on a log scale from 15 s to 20 min, rising over 3-30 s: short ones that no
    launch catches mixed with long ones a launch must, so no single rule about bursts fits."""
    return mixed_bursts_parts(seed, days).demand


def outage(seed: int, days: float = 1.75, surge: float | None = None) -> np.ndarray:
    """A diurnal load (measured from day 1) that drops to 2% for 10-30 min at a time drawn between
    08:00 and 16:00 of day 1 (an upstream outage), then returns within a minute; with `surge` > 1
    the returning clients' retries add up to (surge - 1)× the load, decaying over 3-10 min.
    `surge` None: none on seeds 1, 4, …; ×2 on seeds 2, 5, …; ×3 on seeds 3, 6, …"""
    rng = np.random.default_rng([seed, 7])
    n = int(days * DAY)
    level = 10.0 + 20.0 * _day_cycle(n, rng)
    if surge is None:
        surge = 1.0 + (seed - 1) % 3
    start = int(DAY + rng.uniform(8, 16) * HOUR)
    length = int(rng.uniform(10, 30) * 60)
    t = np.arange(n, dtype=float)
    down = np.clip((t - start) / 30, 0, 1) - np.clip((t - start - length) / 60, 0, 1)
    mult = 1 - 0.98 * down
    after = t - start - length
    tau = rng.uniform(3, 10) * 60
    mult += np.where(after >= 0, (surge - 1) * np.clip(after / 60, 0, 1) * np.exp(-np.maximum(after, 0) / tau), 0)
    return level * mult * _noise(n, rng, 0.04)


SHAPES = (
    "short-bursts",
    "recurring-spikes",
    "recurring-bursts",
    "weekly",
    "ramps",
    "heavy-tail",
    "outage",
    "mixed-bursts",
)


def member(shape: str, seed: int) -> Member:
    """One member of the family: `shape` (one of SHAPES) drawn with `seed`."""
    name = f"{shape}/s{seed}"
    if shape == "short-bursts":
        return Member(name, shape, seed, "random 20-80 s bursts ×2-5, 6 h", short_bursts(seed), 0, True)
    if shape == "recurring-spikes":
        desc = "20-80 s spikes at the same times daily ±90 s, 2 days after 1 of history"
        return Member(name, shape, seed, desc, recurring_spikes(seed), DAY, True)
    if shape == "recurring-bursts":
        desc = "3-20 min bursts at the same times daily ±5 min, 2 days after 1 of history"
        return Member(name, shape, seed, desc, recurring_bursts_family(seed), DAY, True)
    if shape == "weekly":
        # Seeds 1, 2, 3 measure Sat-Sun, Mon-Tue (after a weekend), Wed-Thu; the history starts a
        # week earlier, on the same weekday.
        wd = (2 * seed + 3) % 7
        names = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
        desc = f"diurnal + weekly cycle, {names[wd]}-{names[(wd + 1) % 7]} after 7 days of history"
        return Member(name, shape, seed, desc, weekly(seed, weekday=wd), 7 * DAY, False)
    if shape == "ramps":
        return Member(name, shape, seed, "slow 20-90 min ramps between 1× and 8×, 8 h", ramps_family(seed), 0, False)
    if shape == "heavy-tail":
        desc = "diurnal, lognormal noise and Pareto spikes, 1 day after 1 of history"
        return Member(name, shape, seed, desc, heavy_tail(seed), DAY, True)
    if shape == "outage":
        surge = 1 + (seed - 1) % 3
        what = f"then a ×{surge} retry surge" if surge > 1 else "no surge"
        desc = f"drops to 2% for 10-30 min, {what}; 18 h after 1 day of history"
        return Member(name, shape, seed, desc, outage(seed), DAY, True)
    if shape == "mixed-bursts":
        desc = "random 15 s-20 min bursts ×1.5-4 on a diurnal load, 1 day after 1 of history"
        return Member(name, shape, seed, desc, mixed_bursts(seed), DAY, True)
    raise ValueError(f"shape={shape}: expected one of {', '.join(SHAPES)}")


def family(seed: int) -> list[Member]:
    """Every shape of the family drawn with `seed`; the bench reports FAMILY_SEEDS' members."""
    return [member(shape, seed) for shape in SHAPES]
