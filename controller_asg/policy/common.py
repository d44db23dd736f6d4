"""Small shared pieces of the policies: clamping, robust ceilings, a sliding-window maximum."""

from __future__ import annotations

import math
from collections import deque


def clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def ceil_units(x: float) -> int:
    """ceil() that does not turn 3.0000000001 (float noise) into 4."""
    return math.ceil(x - 1e-9)


class WindowMax:
    """Maximum of the values pushed during the last `window` seconds, O(1) amortised per push.

    Keeps a monotonic deque of (time, value): values that can never again be the maximum (an older
    value not above a newer one) are dropped on push.
    """

    __slots__ = ("window", "_q")

    def __init__(self, window: float):
        self.window = window
        self._q: deque[tuple[float, float]] = deque()

    def push(self, now: float, value: float) -> None:
        q = self._q
        while q and q[-1][1] <= value:
            q.pop()
        q.append((now, value))

    def max(self, now: float, default: float) -> float:
        q = self._q
        while q and q[0][0] < now - self.window:
            q.popleft()
        return q[0][1] if q else default

    def clear(self) -> None:
        self._q.clear()


def fmt_cpu(samples: tuple[float, ...]) -> str:
    return f"{sum(samples) / len(samples):.2f}" if samples else "n/a"
