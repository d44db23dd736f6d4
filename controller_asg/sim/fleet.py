"""A simulated fleet in simulated time, 1-second steps, driven by a live policy object.

Model (issue 6 §1):
- Each second the demand (requests/s) is spread evenly over the in-service instances: CPU per
  instance = min(1, demand / (in_service × capacity)); demand above what they serve is lost.
- A launch is billed from the moment it is asked for and serves from launch + boot time.
- Terminations take effect at once: pending launches go first (newest first), then the newest
  in-service instances (all carry equal load, so "least busy" is simply the newest).
- The CPU the policy sees is sampled every poll interval; the policy decides every control
  interval with an Observation built exactly as the live controller builds it: capacity =
  in service + pending, CPU samples of in-service instances past HELIX_WARMUP, the rest counted as
  warming. The simulated monitor never loses a metric (missing = 0).
- Several signals: each in-service instance also reports requests per second (its share of the
  demand) and memory (modelled as idle: 0), and with a `backlog` series the external metric is
  that series, second by second (taken as observed, not driven by the fleet). So a policy scaling
  on several metrics (policy/multi.py) runs here as it runs live.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass

import numpy as np

from controller_asg.policy.base import Observation, Policy


@dataclass
class FleetParams:
    capacity: float  # requests/s one instance serves at 100% CPU
    boot_time: float = 90.0
    poll_interval: float = 1.0
    control_interval: float = 1.0
    warmup: float = 60.0
    min_instances: int = 1
    max_instances: int = 10
    target: float = 0.5  # defines the required supply r(t) for the elasticity metrics


@dataclass
class Run:
    """Per-second series of one simulation."""

    demand: np.ndarray  # requests/s
    in_service: np.ndarray  # instances serving
    billed: np.ndarray  # instances billed (in service + pending)
    launches: int
    terminations: int
    reasons: list[tuple[float, int, int, str]]  # (time, from, to, reason) for every change


def required(demand: np.ndarray, p: FleetParams) -> np.ndarray:
    """r(t) = max(min, ceil(demand / (capacity × target))): the supply the target asks for."""
    need = np.ceil(demand / (p.capacity * p.target) - 1e-9).astype(np.int64)
    return np.clip(need, p.min_instances, None)


def simulate(
    demand: np.ndarray,
    policy: Policy,
    p: FleetParams,
    initial: int | None = None,
    keep_reasons: bool = False,
    measure_from: int = 0,
    backlog: np.ndarray | None = None,
) -> Run:
    """Run `policy` against `demand` (requests/s, one value per second).

    The first `measure_from` seconds only warm the policy up (it learns history from them); the
    returned run covers the rest.
    """
    T = len(demand)
    dem = demand.tolist()
    cap = p.capacity
    boot = p.boot_time
    poll = max(1, int(round(p.poll_interval)))
    ctrl = max(1, int(round(p.control_interval)))
    warmup = p.warmup
    if initial is None:
        initial = int(required(demand[: int(boot) + 1], p).max())
    # Instances that start warmed up and in service: (service start) times, oldest first.
    serving: deque[float] = deque([-1e18] * initial)
    pending: deque[float] = deque()  # ready times, earliest first (boot time is constant)
    in_service = array("i", bytes(4 * T))
    billed = array("i", bytes(4 * T))
    launches = terminations = 0
    reasons: list[tuple[float, int, int, str]] = []
    cpu_seen = rps_seen = 0.0
    queue = backlog.tolist() if backlog is not None else None
    for t in range(T):
        now = float(t)
        while pending and pending[0] <= now:
            serving.append(pending.popleft())
        n = len(serving)
        d = dem[t]
        if t % poll == 0:
            cpu_seen = 1.0 if n == 0 and d > 0 else (min(1.0, d / (n * cap)) if n else 0.0)
            rps_seen = d / n if n else 0.0
        if t % ctrl == 0:
            warming = 0
            limit = now - warmup
            for i in range(n - 1, -1, -1):  # newest at the right
                if serving[i] > limit:
                    warming += 1
                else:
                    break
            capacity = n + len(pending)
            measured = n - warming
            obs = Observation(
                now=now,
                capacity=capacity,
                in_service=n,
                pending=len(pending),
                cpu_samples=(cpu_seen,) * measured,
                missing=0,
                warming=warming,
                rps_samples=(rps_seen,) * measured,
                mem_samples=(0.0,) * measured,
                external=queue[t] if queue is not None else None,
            )
            dec = policy.decide(obs)
            want = dec.desired
            if want != capacity:
                if keep_reasons:
                    reasons.append((now, capacity, want, dec.reason))
                if want > capacity:
                    for _ in range(want - capacity):
                        pending.append(now + boot)
                    if t >= measure_from:
                        launches += want - capacity
                else:
                    drop = capacity - want
                    if t >= measure_from:
                        terminations += drop
                    while drop and pending:
                        pending.pop()
                        drop -= 1
                    while drop and serving:
                        serving.pop()
                        drop -= 1
                n = len(serving)
        in_service[t] = n
        billed[t] = n + len(pending)
    m = measure_from
    return Run(
        demand=np.asarray(demand[m:], dtype=float),
        in_service=np.frombuffer(in_service, dtype=np.int32)[m:].astype(np.int64),
        billed=np.frombuffer(billed, dtype=np.int32)[m:].astype(np.int64),
        launches=launches,
        terminations=terminations,
        reasons=reasons,
    )
