"""What every policy shares: the conservative rules for unmeasured instances (stated here, where
they act), the scale-in window and how it is seeded, the reason text, and small numeric helpers."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from controller_asg.policy.base import Observation


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


@dataclass(frozen=True, slots=True)
class Needs:
    """The fleet's need, in instances at the target, under the conservative rules.

    As Kubernetes' HPA treats missing and not-ready pods: in-service instances without a usable
    sample (`missing`: stale or failing polls; `warming`: inside HELIX_WARMUP, whose sample lags the
    load they are about to take) count as idle (0) when scaling out, so silence never launches and
    a fresh instance is never launched for twice, and as at the target when scaling in, so silence
    never terminates."""

    up: float  # for scaling out: unmeasured instances at 0
    down: float  # for scaling in: unmeasured instances at the target
    seen: float  # what the measured instances see, n × their mean / target (-1: none measured)
    mean_up: float  # the mean behind `up` (0..1 for CPU)
    known: int  # instances with a usable sample
    total: float  # the sum of their samples


def needs(obs: Observation, target: float) -> Needs | None:
    """The needs of `obs` at `target`, or None when nothing at all is measured (hold)."""
    known = len(obs.cpu_samples)
    unmeasured = obs.missing + obs.warming
    if known + obs.missing == 0:
        return None
    total = sum(obs.cpu_samples)
    n = obs.in_service  # warming instances serve too: the fleet is every in-service instance
    mean_up = total / (known + unmeasured)
    return Needs(
        up=n * mean_up / target,
        down=n * (total + target * unmeasured) / (known + unmeasured) / target,
        # Unlike `up` and `down` this does not step when an instance starts or ends its warm-up, so
        # its sample-to-sample change is noise.
        seen=n * total / known / target if known else -1.0,
        mean_up=mean_up,
        known=known,
        total=total,
    )


def no_metrics(obs: Observation, label: str = "CPU") -> str:
    return f"no {label} metrics yet ({obs.in_service} in service, {obs.warming} warming, {obs.pending} pending)"


def describe(obs: Observation, total: float, known: int, target: float, label: str = "CPU", scale: float = 1.0) -> str:
    """'mean CPU 0.83 over 4 in-service instances (1 without metrics), target 0.50': the start of
    every reason. `scale` turns a normalised sample back into its own unit for the text."""
    mean = total / known if known else 0.0
    return (
        f"mean {label} {mean * scale:.{_digits(scale)}f} over {known} in-service instance{'s' if known != 1 else ''}"
        + (f" ({obs.missing} without metrics)" if obs.missing else "")
        + f", target {target * scale:.{_digits(scale)}f}"
    )


def _digits(scale: float) -> int:
    return 2 if scale == 1.0 else 1


class ScaleInWindow:
    """Scale in only to the highest recommendation of the last `window` seconds.

    A (re)started policy has seen nothing yet: the fleet it finds counts as the first
    recommendation, so a restart never scales in before a full window has been observed."""

    def __init__(self, window: float, lo: int, hi: int):
        self.window = window
        self.lo, self.hi = lo, hi
        self._max = WindowMax(window)
        self._seeded = False

    def seed(self, obs: Observation) -> None:
        if not self._seeded and self.window > 0:
            self._seeded = True
            self._max.push(obs.now, clamp(obs.capacity, self.lo, self.hi))

    def hold(self, window: float) -> None:
        """Change how long a recommendation holds (a policy that scales it with the boot time);
        recommendations already older than a shorter window are forgotten."""
        self.window = self._max.window = window

    def push(self, now: float, recommendation: float) -> None:
        self._max.push(now, recommendation)

    def allowed(self, now: float, recommendation: float) -> float:
        return self._max.max(now, recommendation)
