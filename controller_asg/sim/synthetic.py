"""Synthetic demand shapes (requests/s per second), reproducible from a seed.

Shapes the default policy was NOT tuned on are what the bench's "never tuned on" rows use:
`flash_crowd` and `recurring_bursts`. `diurnal`, `ramps` and `noisy_constant` serve tests.
"""

from __future__ import annotations

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
