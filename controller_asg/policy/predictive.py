"""`predictive` (the default): target tracking with a memory of recent days and a patient,
noise-aware scale-in. Tuned on NASA-HTTP 1995 and synthetic shapes with the simulator
(`bench/bench_policies.py` prints where it stands against the baselines).

Need. R = in_service × mean CPU / target, the `target` formula, in instances at the target.

Scale-out (at once, as far as the plan says, when the plan exceeds capacity × (1 + tolerance)):
- the need is a moving average over `up_smooth` seconds, because one noisy second should not buy
  an instance; but hot instances (mean CPU ≥ `hot_ratio` × target, 0.7 at target 0.5) take the
  fast path on their raw need;
- a hot reading must be confirmed by the next sample (`hot_confirm`), or stand `hot_z` σ of the
  need's sample-to-sample jitter above the hot line, before the fast path trusts its whole raw
  need; until then it plans for the raw need less that much. That is the hysteresis against
  sample noise: a burst still launches within a second, a lone noisy second launches nothing
  that the scale-in rule would hand back the moment it came into service;
- prediction: what recent days needed over the next `lead` seconds at this time of day (per-minute
  peaks of the smoothed need, the lower of yesterday's and last week's same weekday, ×
  `floor_fraction`), so a rise that recurs daily is met by launches a boot time ahead.

Scale-in (patient, and sized from the noise):
- the need is a moving average over `in_smooth` seconds, plus headroom sized from the observed
  burstiness: `noise_z` standard deviations of how far the raw need wanders from that average
  (measured over two scale-in windows), or `in_margin` of the need when the load is smooth, the
  larger of the two (the fraction is the hysteresis that keeps a calm fleet from flapping; on bursty
  traffic the wander alone sets the headroom, so it costs nothing there), less `in_slack`
  instances of rounding slack (a small fleet's one-instance step is hysteresis enough). Bursts
  that need more than the fleet within a boot time are what loses requests on real traffic, and
  they come where the need wanders most (fleets of 2-4 instances on NASA), so the headroom goes
  there rather than to every hour;
- only to the highest such recommendation of the last `scale_in_window` seconds;
- never below `floor_fraction` of what recent days needed at this minute, so a sudden silence (a
  logging gap, an upstream outage) does not throw away capacity that returns with the traffic;
- never while launches are pending: a launch about to serve is the worst capacity to give up.

Sample noise a small fleet cannot absorb: the fleet at 100% CPU keeps serving the smoothed need
plus `full_z` σ of the jitter (scale out past the tolerance, scale in no lower than the line). On
NASA (60 s moving average) the jitter is about 0.1 instance: every week's loss and cost stayed
within 0.001 of what they were, with 0.5-1.5% fewer actions; on a
sine of 10-110 req/s with white noise of σ = 5 or 10 req/s (12 req/s per instance) they took the
day's actions from 215 and 1119 to 33 and 64, fewer than k8s-hpa's 74 and 235, with no loss.

Conservative rules, as in `target`: missing metrics, and warming instances (capacity, CPU left
out), count as 0 when scaling out and at target when scaling in; pending launches count as
capacity so a spike never launches twice. With no history it is smoothed target tracking with a
hot fast path. The history (one list of 1440 per-minute values per day, `history_days` days) is
what `export_state` returns, so it survives a controller restart.

Measured on seven NASA weeks (starting on days 0, 7, 14, 21, 35, 42 and 49 of the 1995 trace, each
after up to a week of history; the week from day 28, with the outage, left out) and the flash-crowd and recurring-burst shapes:
every week under 0.03% lost at no more than 1.02x the oracle's cost. Measured and left off by
default (the knobs stay for the simulator): a trend extrapolation (`trend_gain`), a seasonal
growth ratio (`max_season_rise`), extra launch margins, holding launches for a window
(`hold_launches`) and a saturation boost all cost more on NASA than they saved; a headroom that
grows with √need helped NASA but cost the smooth synthetic shapes up to 8% more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from controller_asg.policy.base import Decision, Observation
from controller_asg.policy.common import WindowMax, ceil_units, clamp

DAY = 86400
SLOTS = 1440  # one-minute slots per day
STATE_VERSION = 1


@dataclass
class PredictiveSettings:
    min_instances: int = 1
    max_instances: int = 10
    cpu_target: float = 0.5
    tolerance: float = 0.1
    scale_in_window: float = 300.0
    lead: float = 90.0  # seconds to plan ahead: about the launch-to-in-service time
    trend_fast: float = 30.0
    trend_slow: float = 120.0
    history_days: int = 8
    floor_fraction: float = 0.6
    max_season_rise: float = 1.0
    trend_gain: float = 0.0  # 0 turns the trend estimate off
    up_smooth: float = 60.0  # seconds: moving average of the scale-out need (0: none)
    hot_ratio: float = 1.4  # mean CPU / target from which the raw need is used, not the smoothed one
    out_margin: float = 0.0  # scale out to ceil(plan × (1 + this))
    hot_margin: float = 0.0  # when hot: ceil(plan × (1 + this)); bursts keep rising while launches boot
    in_smooth: float = 90.0  # seconds: moving average of the scale-in need (0: none)
    saturated_cpu: float = 0.97  # mean CPU taken as saturated: the real demand may be far higher
    saturation_boost: float = 1.0
    noise_z: float = 0.75  # scale-in headroom: this many standard deviations of the need's wander …
    noise_window: float = 0.0  # … measured over this many seconds (0: twice the scale-in window)
    hold_launches: bool = False  # a scale-out counts as a recommendation the scale-in window remembers
    prelaunch: bool = True  # launch ahead of what recent days needed over the next lead
    in_slack: float = (
        0.25  # instances: rounding slack of the scale-in need (a tiny fleet's one-instance step is already hysteresis)
    )
    in_margin: float = 0.13  # … or this fraction of the need, whichever is more: ceil(need + headroom − in_slack)
    hot_confirm: int = (
        2  # samples in a row a hot reading must last before the fast path trusts its whole raw need (1: at once) …
    )
    hot_z: float = 3.0  # … unless it is this many σ of the need's sample-to-sample jitter beyond the hot line; unconfirmed, it plans for the raw need less that
    full_z: float = 4.0  # the fleet at 100% CPU serves the smoothed need plus this many σ of the jitter (0: off)


class Predictive:
    name = "predictive"

    def __init__(self, settings: PredictiveSettings):
        self.s = settings
        self._window = WindowMax(settings.scale_in_window)
        self._started = False
        self._last: float | None = None
        self._fast = self._slow = 0.0
        self._in_avg = self._up_avg = 0.0
        self._dt = -1.0
        self._var = 0.0
        self._jit = 0.0
        self._r_prev = -1.0
        self._hot_run = 0
        self._held = 0.0  # the raw need of the first hot sample, while unconfirmed
        self._a: tuple[float, ...] = ()
        # day number -> list of SLOTS per-minute peaks of R (-1: not seen)
        self._days: dict[int, list[float]] = {}
        self._cache_minute = -1
        self._cache: tuple[float, float] = (-1.0, -1.0)

    # --- history ---------------------------------------------------------------------------
    def _remember(self, now: float, r: float) -> None:
        day, slot = int(now // DAY), int(now % DAY // 60)
        row = self._days.get(day)
        if row is None:
            row = self._days[day] = [-1.0] * SLOTS
            for old in [d for d in self._days if d <= day - self.s.history_days]:
                del self._days[old]
        if r > row[slot]:
            row[slot] = r

    def _usual(self, day: int, slot: int) -> float:
        """What recent days needed at this minute: the lower of yesterday's and last week's same
        weekday peaks when both are known (weekends are quieter than weekdays), else what is known;
        -1 when there is no history."""
        vals = []
        for back in (1, 7):
            row = self._days.get(day - back)
            if row is not None and row[slot % SLOTS] >= 0:
                # a 3-minute neighbourhood smooths the per-minute noise
                vals.append(max(row[(slot - 1) % SLOTS], row[slot % SLOTS], row[(slot + 1) % SLOTS]))
        return min(vals) if vals else -1.0

    def _season(self, now: float) -> tuple[float, float]:
        """(usual need now, usual peak over the next lead), cached per minute."""
        minute = int(now // 60)
        if minute != self._cache_minute:
            day, slot = int(now // DAY), int(now % DAY // 60)
            cur = self._usual(day, slot)
            ahead = cur
            for k in range(1, int(self.s.lead // 60) + 2):
                s2 = slot + k
                u = self._usual(day + s2 // SLOTS, s2 % SLOTS)
                ahead = max(ahead, u)
            self._cache_minute, self._cache = minute, (cur, ahead)
        return self._cache

    def _window_seed(self, obs: Observation) -> None:
        self._window.push(obs.now, min(max(obs.capacity, self.s.min_instances), self.s.max_instances))

    # --- the decision ----------------------------------------------------------------------
    def _alphas(self, dt: float) -> tuple[float, ...]:
        """Moving-average weights for a step of dt seconds (cached: dt is nearly always the interval)."""
        if dt != self._dt:
            s = self.s
            self._dt = dt
            noise = s.noise_window if s.noise_window > 0 else 2 * s.scale_in_window
            self._a = tuple(
                1.0 if tau <= 0 else 1 - math.exp(-dt / tau)
                for tau in (s.trend_fast, s.trend_slow, s.up_smooth, s.in_smooth, noise)
            )
        return self._a

    def decide(self, obs: Observation) -> Decision:
        s = self.s
        lo, hi = s.min_instances, s.max_instances
        cap = obs.capacity
        known = len(obs.cpu_samples)
        if not self._started and self.s.scale_in_window > 0:
            # A (re)started policy has seen nothing yet: the fleet it finds counts as the first
            # recommendation, so a restart never scales in before a full window has been observed.
            self._started = True
            self._window_seed(obs)
        if known + obs.missing == 0:
            return Decision(
                clamp(cap, lo, hi),
                f"no CPU metrics yet ({obs.in_service} in service, {obs.warming} warming, {obs.pending} pending)",
            )
        total = sum(obs.cpu_samples)
        n = obs.in_service
        # Missing metrics: 0 when scaling out, at target when scaling in (see module docstring).
        # Warming instances, like Kubernetes' not-ready pods: 0 when scaling out (their CPU sample
        # lags the load they are about to take, so counting them at the others' mean launches twice),
        # at target when scaling in.
        unmeasured = obs.missing + obs.warming
        mean_up = total / (known + unmeasured)
        r_up = n * mean_up / s.cpu_target
        r_in = n * (total + s.cpu_target * unmeasured) / (known + unmeasured) / s.cpu_target
        # The demand the measured instances see, n × their mean CPU: unlike r_up and r_in it does not
        # step when an instance starts or ends its warm-up, so its sample-to-sample change is noise.
        r_seen = n * total / known / s.cpu_target if known else -1.0
        # The sample noise as measured before this sample: a jump is not evidence of its own noise.
        jitter = math.sqrt(self._jit)
        now = obs.now
        if self._last is None or now - self._last > 10 * s.trend_slow or now < self._last:
            self._fast = self._slow = self._up_avg = r_up
            self._in_avg = r_in
            self._var = 0.0
            self._jit = 0.0
        else:
            af, asl, au, ai, av = self._alphas(now - self._last)
            self._fast += (r_up - self._fast) * af
            self._slow += (r_up - self._slow) * asl
            self._up_avg += (r_up - self._up_avg) * au
            self._in_avg += (r_in - self._in_avg) * ai
            dev = r_in - self._in_avg
            self._var += (dev * dev - self._var) * av
            # Jitter: half the mean squared change from one sample to the next is the variance of
            # the sample noise, whatever the trend (a slow trend adds almost nothing per second).
            if known and self._r_prev >= 0:
                step = r_seen - self._r_prev
                self._jit += (0.5 * step * step - self._jit) * av
        self._r_prev = r_seen
        self._last = now
        if known:
            self._remember(now, self._in_avg)  # the smoothed need: raw peaks are mostly noise
        # Hot instances take the fast path: their raw need, not the smoothed one. Saturated ones
        # hide how much demand there really is (CPU cannot show more than 100%): plan for more.
        margin = s.hot_margin
        hot_line = min(0.95, s.hot_ratio * s.cpu_target)
        self._hot_run = self._hot_run + 1 if known and mean_up >= hot_line else 0
        # A hot reading is trusted when the next sample confirms it, or at once when it stands out
        # from the sample noise; until then it plans for its raw need less that noise. One noisy
        # second on a small fleet (0.4 -> 0.72 CPU at σ = 5 req/s on 3 instances) otherwise
        # launched two instances that the scale-in rule, rightly seeing no more need, gave back the
        # second they came into service: 2 actions and 90 s of billing for nothing, 100 times a day.
        noise = s.hot_z * jitter
        confirmed = self._hot_run >= s.hot_confirm or (self._hot_run and r_up - noise >= hot_line * n / s.cpu_target)
        if self._hot_run == 1:
            # what a trusted first sample would have launched, held back while unconfirmed
            self._held = 0.0 if confirmed or r_up <= cap * (1 + s.tolerance) else r_up
        if confirmed:
            need = r_up * (s.saturation_boost if mean_up >= s.saturated_cpu else 1.0)
        elif self._hot_run:
            need = max(self._up_avg, r_up - noise)
        else:
            need, margin = self._up_avg, s.out_margin
        plan_up = need
        if s.trend_gain:
            slope = (self._fast - self._slow) / (s.trend_slow - s.trend_fast)
            if slope > 0:
                plan_up += s.trend_gain * slope * s.lead
        usual_now, usual_ahead = self._season(now)
        if usual_now > 0 and usual_ahead > usual_now and s.max_season_rise > 1:
            plan_up = max(plan_up, need * min(s.max_season_rise, usual_ahead / usual_now))
        # What recent days needed over the next lead: launch a boot time ahead of a recurring rise.
        expected = s.floor_fraction * usual_ahead if usual_ahead > 0 and s.prelaunch else 0.0
        if expected > plan_up:
            plan_up = expected
        # The sample that confirms a hot reading launches, past the tolerance, what the first one held
        # back: together they launch what one trusted sample would have.
        topping_up = s.hot_confirm > 1 and self._hot_run == s.hot_confirm and ceil_units(self._held) > cap
        if topping_up and self._held > plan_up:
            plan_up = self._held
        if known and (topping_up or plan_up > cap * (1 + s.tolerance)):
            want = clamp(ceil_units(plan_up * (1 + margin)), lo, hi)
            if s.hold_launches:
                self._window.push(now, want)
            if want > cap:
                return Decision(
                    want,
                    self._why(
                        obs,
                        total,
                        known,
                        f"; planning for {plan_up:.1f} instances at target"
                        + (
                            f" (recent days needed {usual_ahead:.1f} within {s.lead:g} s)"
                            if plan_up == expected
                            else ""
                        ),
                    ),
                )
            return Decision(clamp(cap, lo, hi), "at the maximum")
        # Sample noise that a small fleet cannot absorb: n instances serve n / target instances'
        # worth of need at 100% CPU, and a second above that loses requests. Keep that line
        # `full_z` σ of the jitter above the smoothed need (on 3 instances at σ = 10 req/s the
        # noise headroom alone saturated them every few minutes). Scale out past the tolerance,
        # scale in no lower than the line itself: the same band as target tracking.
        full_line = s.cpu_target * (self._up_avg + s.full_z * jitter) if s.full_z > 0 else 0.0
        if known and full_line > cap * (1 + s.tolerance):
            want = clamp(ceil_units(full_line), lo, hi)
            if want > cap:
                return Decision(
                    want,
                    self._why(obs, total, known, f"; its sample noise needs {full_line:.1f} instances at 100% CPU"),
                )
        plan_in = self._in_avg + (plan_up - need if plan_up > need else 0.0)
        # Headroom sized from the observed burstiness: z standard deviations of how far the raw need
        # wanders from its average, or a fixed fraction of the need when the load is smooth (the
        # fraction is the hysteresis that stops a calm fleet flapping around the scale-out line).
        # The larger, not the sum: on bursty traffic the wander alone sets it, so the fixed fraction
        # costs nothing there.
        headroom = max(s.in_margin * plan_in, s.noise_z * math.sqrt(self._var))
        rec = ceil_units(plan_in + headroom - s.in_slack)
        if s.full_z > 0:
            rec = max(rec, ceil_units(s.cpu_target * (self._in_avg + s.full_z * jitter)))
        # Rounded down: the floor is a guard against sudden silence, not extra headroom.
        floor = int(s.floor_fraction * usual_now) if usual_now > 0 else 0
        if floor > rec:
            rec = floor
        rec = clamp(rec, lo, hi)
        self._window.push(now, rec)
        allowed = int(self._window.max(now, rec))
        desired = clamp(min(cap, allowed), lo, hi)
        if desired < cap and obs.pending and cap <= hi:
            # Never scale in while launches are pending: a launch about to serve is the worst
            # capacity to give up, and cancelling it restarts the boot clock when the load returns.
            desired = cap
        if desired == cap:
            return Decision(desired, "no change")
        if desired > cap:
            return Decision(desired, f"keep within [{lo}, {hi}]")
        return Decision(
            desired,
            self._why(
                obs,
                total,
                known,
                f"; the highest need of the last {s.scale_in_window:g} s is {allowed}"
                + (f" (recent days needed {usual_now:.1f} now)" if allowed == floor else ""),
            ),
        )

    def _why(self, obs: Observation, total: float, known: int, tail: str) -> str:
        mean = total / known if known else 0.0
        return (
            f"mean CPU {mean:.2f} over {known} in-service instance{'s' if known != 1 else ''}"
            + (f" ({obs.missing} without metrics)" if obs.missing else "")
            + f", target {self.s.cpu_target:.2f}"
            + tail
        )

    # --- persistence -----------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "days": {str(d): [round(v, 3) for v in row] for d, row in self._days.items()}}

    def import_state(self, state: dict[str, Any]) -> None:
        """Load learned history; anything malformed is ignored and the policy starts fresh."""
        try:
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                return
            days: dict[int, list[float]] = {}
            for key, row in dict(state["days"]).items():
                if not isinstance(row, list) or len(row) != SLOTS:
                    return
                vals = [float(v) for v in row]
                if any(not math.isfinite(v) or v > 1e7 for v in vals):
                    return
                days[int(key)] = [max(-1.0, v) for v in vals]
        except (KeyError, TypeError, ValueError, AttributeError):
            return
        newest = max(days, default=0)
        self._days = {d: r for d, r in days.items() if d > newest - self.s.history_days}
        self._cache_minute = -1
