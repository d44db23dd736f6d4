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

Warm pool (issue 12 §3; `warm_pool` = 0, the default, is the model above unchanged):
- The pool holds `warm_pool` instances that were launched, prepared (the full boot time, billed
  in full) and stopped; a stopped instance is billed `stopped_cost` of a running one (its disk).
  It starts full, as the initial fleet starts in service.
- A scale-out starts stopped pool instances first (billed in full from the start, in service
  `warm_start` seconds later), then launches the rest cold. Every instance that leaves the pool
  is replaced at once by a refill launch, which prepares for the boot time and then stops; an
  instance still preparing cannot be started warm.
- A scale-in cancels cold launches first (newest first, terminated as before), then warm starts
  (newest first), then the newest in-service instances. A warm start or an in-service instance
  goes back to the pool, stopped: into a free place, else in place of the newest refill still
  preparing (which is cancelled: reuse beats preparing a new one, as an ASG's reuse-on-scale-in
  does); with the pool full and no refill under way, it is terminated.
- `warm_max_prepared` (as ASG's MaxGroupPreparedCapacity, 0: none) caps the instances running
  and in the pool together: the pool holds min(`warm_pool`, cap - running), so it shrinks as the
  fleet grows (refills still preparing are cancelled) and is refilled as it shrinks.
- The policy sees warm starts as pending; the pool itself is not capacity. `launches` and
  `terminations` stay the policy's scaling actions; warm starts and refill launches are counted
  apart.
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
    warm_pool: int = 0  # instances kept prepared and stopped (0: no warm pool)
    warm_max_prepared: int = 0  # cap on instances running and in the pool together (0: none)
    warm_start: float = 10.0  # seconds from starting a stopped pool instance to in service
    stopped_cost: float = 0.1  # a stopped instance's bill as a fraction of a running one's (its disk)


@dataclass
class Run:
    """Per-second series of one simulation."""

    demand: np.ndarray  # requests/s
    in_service: np.ndarray  # instances serving
    billed: np.ndarray  # instances billed in full: in service, launching, starting warm, preparing for the pool
    launches: int
    terminations: int
    reasons: list[tuple[float, int, int, str]]  # (time, from, to, reason) for every change
    stopped: np.ndarray | None = None  # instances stopped in the warm pool (None: a run without one)
    warm_starts: int = 0  # of the launches, how many started from the warm pool
    pool_launches: int = 0  # launches that refilled the pool


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
    size = max(0, p.warm_pool)
    max_prepared = max(0, p.warm_max_prepared)
    warm_start = p.warm_start
    stopped = size if not max_prepared else max(0, min(size, max_prepared - initial))  # prepared, stopped
    starting: deque[float] = deque()  # warm starts: ready times, earliest first (warm_start is constant)
    preparing: deque[float] = deque()  # pool refills: prepared times, earliest first
    in_service = array("i", bytes(4 * T))
    billed = array("i", bytes(4 * T))
    stopped_at = array("i", bytes(4 * T))
    launches = terminations = warm_starts = pool_launches = 0
    reasons: list[tuple[float, int, int, str]] = []
    cpu_seen = rps_seen = 0.0
    queue = backlog.tolist() if backlog is not None else None
    for t in range(T):
        now = float(t)
        if starting:
            # Both kinds join in the order they become ready, so `serving` stays oldest first.
            while (pending and pending[0] <= now) or (starting and starting[0] <= now):
                if starting and starting[0] <= now and not (pending and pending[0] < starting[0]):
                    serving.append(starting.popleft())
                else:
                    serving.append(pending.popleft())
        else:
            while pending and pending[0] <= now:
                serving.append(pending.popleft())
        while preparing and preparing[0] <= now:
            preparing.popleft()
            stopped += 1
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
            launching = len(pending) + len(starting)
            capacity = n + launching
            measured = n - warming
            obs = Observation(
                now=now,
                capacity=capacity,
                in_service=n,
                pending=launching,
                cpu_samples=(cpu_seen,) * measured,
                missing=0,
                warming=warming,
                rps_samples=(rps_seen,) * measured,
                mem_samples=(0.0,) * measured,
                external=queue[t] if queue is not None else None,
                boot_time=boot,  # what the live controller learns from its own launches
            )
            dec = policy.decide(obs)
            want = dec.desired
            if want != capacity:
                if keep_reasons:
                    reasons.append((now, capacity, want, dec.reason))
                back = 0  # prepared instances leaving service: warm starts, then the newest serving
                if want > capacity:
                    warm = min(stopped, want - capacity)
                    stopped -= warm
                    for _ in range(warm):
                        starting.append(now + warm_start)
                    for _ in range(want - capacity - warm):
                        pending.append(now + boot)
                    if t >= measure_from:
                        launches += want - capacity
                        warm_starts += warm
                else:
                    drop = capacity - want
                    if t >= measure_from:
                        terminations += drop
                    while drop and pending:
                        pending.pop()
                        drop -= 1
                    while drop and starting:
                        starting.pop()
                        back += 1
                        drop -= 1
                    while drop and serving:
                        serving.pop()
                        back += 1
                        drop -= 1
                if size:
                    goal = size
                    if max_prepared:
                        goal = max(0, min(size, max_prepared - len(serving) - len(pending) - len(starting)))
                    while back:
                        back -= 1
                        if stopped + len(preparing) < goal:
                            stopped += 1
                        elif preparing:
                            preparing.pop()
                            stopped += 1
                        # else: the pool is full, the instance is terminated
                    short = goal - stopped - len(preparing)
                    for _ in range(short):
                        preparing.append(now + boot)
                    if t >= measure_from and short > 0:
                        pool_launches += short
                    # Over the cap, the fleet having grown by cold launches: the pool had no stopped
                    # instance left (warm ones start first), so only refills still preparing go.
                    while short < 0 and preparing:
                        preparing.pop()
                        short += 1
                n = len(serving)
        in_service[t] = n
        billed[t] = n + len(pending) + len(starting) + len(preparing)
        stopped_at[t] = stopped
    m = measure_from
    return Run(
        demand=np.asarray(demand[m:], dtype=float),
        in_service=np.frombuffer(in_service, dtype=np.int32)[m:].astype(np.int64),
        billed=np.frombuffer(billed, dtype=np.int32)[m:].astype(np.int64),
        launches=launches,
        terminations=terminations,
        reasons=reasons,
        stopped=np.frombuffer(stopped_at, dtype=np.int32)[m:].astype(np.int64),
        warm_starts=warm_starts,
        pool_launches=pool_launches,
    )
