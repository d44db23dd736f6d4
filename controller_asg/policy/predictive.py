"""`predictive` (the default): target tracking with a memory of recent days and a patient,
noise-aware scale-in. Six named parts, each a small class or method below:

- **the need estimator** (`NeedEstimator`): the need R = in_service × mean CPU / target (the
  `target` formula, in instances at the target, under the conservative rules of
  `common.needs`), smoothed for scaling out (`up_smooth`) and for scaling in (`in_smooth`), with
  two measures of noise: how far the raw need wanders from its average (`wander`), and the
  sample-to-sample jitter (`jitter`); and the calm need, the same average over the moments outside
  overloads (from an overload's start until the need falls back to the capacity it started at; one
  that lasts LEVEL_SHIFT is the load's new level);
- **the seasonal memory** (`SeasonalMemory`): per-minute peaks of the smoothed need for
  `history_days` days; what recent days needed at this minute, and over the next `lead` seconds.
  Beside them, per-minute peaks of a short average of the need at moments it overloaded the fleet:
  a spike shorter than the smoothing that came back at this time on several recent days. What
  one day alone says is taken minute by minute only while the memory keeps its promises
  (`SeasonalMemory.trusted`), else as that day's calm level: yesterday's random bursts are no plan
  for today, its shape is;
- **the short-overload rule** (`ShortOverloads`): how long recent overloads lasted against the
  capacity they started at. When launches asked at the start of the last `short_overloads` would
  have served for little of them (SERVED_SHARE), a launch for the next would mostly serve after it
  is over: it is asked only once an overload outlasts the longest that ended within the boot time,
  or is larger than any of them, and the scale-in plan keeps a standing headroom instead;
- **the scale-out plan** (`Predictive._scale_out`): at once, as far as the plan says, once it
  exceeds capacity × (1 + tolerance). The plan is the smoothed need, or for hot instances (mean
  CPU ≥ `hot_ratio` × target, or `rise_ratio` × target in a sudden rise: the raw need well above
  its 10 s average) their raw need, trusted once the next sample confirms it
  (`hot_confirm`) or when it stands `hot_z` σ of the jitter above the hot line; and never less
  than `floor_fraction` of what recent days needed over the next lead, so a rise that recurs daily
  is met a boot time ahead (below a 90 s boot, that share scaled as the headroom is while the
  memory is not `trusted`), nor than the whole of a spike that recurred within it. Then the noise
  floor: the fleet at 100% CPU keeps serving the smoothed need plus `full_z` σ of the jitter;
- **the scale-in plan** (`Predictive._scale_in`): the smoothed need plus headroom, the largest of
  `noise_z` σ of its wander, `jitter_z` σ of the sample jitter (noise too fast for any launch to
  catch) and `in_margin` of the need, less `in_slack` instances of rounding slack (the margin and
  the wander's share scaled by the boot time planned for, `headroom_factor`, the jitter's only
  below a 90 s boot, `jitter_factor`); only to the
  highest such recommendation of the last `hold_leads` boot times (at most `scale_in_window`
  seconds: a short boot relaunches cheaply, so it holds capacity for less long), or of the last
  boot time alone while the hold does not pay (below); never
  below `floor_fraction` of what recent days needed at this minute (a sudden silence does not
  throw away capacity that returns with the traffic); never while launches are pending. While
  overloads are short, or the hold does not pay, it plans from the calm need instead, so what a
  burst launched is let go when it ends (while one runs, no lower than the most the need asked for
  over the last boot time), with `burst_margin` in place of `in_margin` while bursts come
  (`ShortOverloads.coming`, its share scaled as the jitter's); while overloads are short, plus
  `burst_headroom` of the calm need (at most their measured size);
- **the hold record** (`HoldRecord`): whether the capacity the scale-in hold keeps is needed again
  before the hold lets it go, at least as often as it is let go unused. Load that returns keeps the
  whole hold; bursts that end and stay gone cut it to a boot time (at least `in_smooth`) and turn
  the scale-in plan to the calm need.

With no history it is smoothed target tracking with a hot fast path. The history is what
`export_state` returns, so it survives a controller restart. Why each part is shaped as it is,
and what it was measured against, is in the bench output (`make bench BENCH_ARGS=policies`) and
the commit history, not here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from controller_asg.policy.base import Decision, Observation
from controller_asg.policy.common import (
    Needs,
    ScaleInWindow,
    WindowMax,
    ceil_units,
    clamp,
    describe,
    needs,
    no_metrics,
)

DAY = 86400
SLOTS = 1440  # one-minute slots per day
STATE_VERSION = 1
# A gap between two decisions longer than this (a controller stopped for a while) restarts the
# averages from the current sample rather than blending in stale ones.
RESTART_AFTER = 1200.0
# What HELIX_LAUNCH_LEAD=0 plans for before the controller has measured a launch of its own.
DEFAULT_LEAD = 90.0
# A sample-to-sample step counts towards the jitter up to this many σ of it.
JITTER_CLIP = 4.0
# Spikes: the need averaged over SPIKE_SMOOTH seconds (a 20 s spike keeps most of its height) is
# remembered while it runs the fleet at SPIKE_CPU or more (a spike the fleet barely served, or not:
# traffic that only wanders rarely does), and planned for when it did so at the same time on at
# least SPIKE_DAYS of the recent days SPIKE_BACK (a one-off spike is not worth a pre-warm).
SPIKE_SMOOTH = 10.0
SPIKE_CPU = 0.9
SPIKE_BACK = (1, 2, 7)
SPIKE_DAYS = 2
# A sudden rise: the raw need RISE or more above its SPIKE_SMOOTH-second average (a burst's first
# seconds; a drift, however steep, keeps that average close behind the raw need). Its raw need is
# used from `rise_ratio` × target, below the usual hot line: each second spent waiting for the
# smoothed need or the hot line is a second added to the boot time the burst runs over capacity.
RISE = 0.25
# The scale-in headroom scales as (boot time / DEFAULT_LEAD) ** HEADROOM_POWER, the boot time held
# within HEADROOM_LEADS (the range `make bench BENCH_ARGS=bursty` measures).
HEADROOM_POWER = 0.25
HEADROOM_LEADS = (20.0, 300.0)
# A claim of the seasonal memory that rests on one day is used only while the memory keeps its
# promises: over the last PROMISE_MINUTES finished minutes (a moving average), at most
# FALSE_ALARMS of them were ones it said would need more than (1 + OVER_PROMISE) × what they
# did. A minute that needed less than SILENCE of what it said is a silence, which the floor is
# there for, and is not judged. Bursts at random times fail it by the hour, and so does real web
# traffic's minute-to-minute bursts; a smooth day's shape and bursts that recur at about the same
# time keep it. Untrusted, one day says its calm level: the lowest of its peaks within
# CALM_MINUTES either side (the day's shape without its bursts, which still guards against a
# silence and plans for a slow daily rise).
PROMISE_MINUTES = 60.0
FALSE_ALARMS = 0.15
OVER_PROMISE = 0.5
SILENCE = 0.2
CALM_MINUTES = 15
# Short overloads older than this are forgotten: a burst pattern of an hour ago says little now.
OVERLOAD_MEMORY = 2 * 3600.0
# An overload is followed for at most LONG_OVERLOAD boot times (a longer one is recorded as that
# long: one level shift does not outweigh the rest). Recent overloads are short when launches asked
# at their starts would have served (from a boot time in until each ended) for at most SERVED_SHARE
# of their whole length. 0 would ask that every one ended within the boot time; one 91 s overload at
# a 90 s boot then turned the rule off for the next four, on bursts of 20-80 s.
LONG_OVERLOAD = 3.0
SERVED_SHARE = 0.2
# The calm need leaves out the seconds from an overload's start until the need seen falls back to
# the capacity it started at, however long that takes (so its launches are let go as soon as it is
# over, not after the averages have followed it back down); after LEVEL_SHIFT seconds it is not a
# burst but the load's new level, and the calm need takes the scale-in need's average.
LEVEL_SHIFT = 1500.0
# The scale-in hold keeps the highest recommendation of its last seconds: it pays when what it keeps
# is needed again before it would let it go. Over the last HOLD_MEMORY seconds (a decaying sum) the
# hold record counts the instances a rising recommendation found still held (they came back) and
# those the hold released unused. While fewer come back than are released, and at least
# HOLD_EVIDENCE have been released, the hold is cut to a boot time (at least the scale-in
# average's own time): random bursts end and stay gone, and capacity held after one is a headroom
# that stands only after bursts, which costs more than the same headroom standing always
# (bench/burst_bound.py). Load that returns, as real web traffic does, keeps the whole hold.
HOLD_MEMORY = 2 * 3600.0
HOLD_EVIDENCE = 10.0


@dataclass
class PredictiveSettings:
    min_instances: int = 1
    max_instances: int = 10
    cpu_target: float = 0.5
    tolerance: float = 0.1
    scale_in_window: float = 300.0
    lead: float = 90.0  # seconds to plan ahead: the launch-to-in-service time (0: the observed boot time)
    history_days: int = 8
    floor_fraction: float = 0.6  # of what recent days needed: the scale-in floor and the pre-launch
    up_smooth: float = 60.0  # seconds: moving average of the scale-out need (0: none)
    in_smooth: float = 90.0  # seconds: moving average of the scale-in need (0: none)
    hot_ratio: float = 1.4  # mean CPU / target from which the raw need is used, not the smoothed one
    rise_ratio: float = 1.2  # … or from which it is used in a sudden rise (RISE above its 10 s average)
    hot_confirm: int = 2  # samples in a row a hot reading must last before its whole raw need is trusted
    hot_z: float = 3.0  # … unless it stands this many σ of the jitter beyond the hot line
    noise_z: float = 0.75  # scale-in headroom: this many σ of the need's wander …
    in_margin: float = 0.13  # … or this fraction of the need, whichever is more
    burst_margin: float = 0.35  # … this fraction of the calm need while bursts come, planning from it
    in_slack: float = 0.25  # instances of rounding slack taken off the scale-in need
    jitter_z: float = 6.0  # … or this many σ of the sample jitter: noise faster than any launch (0: off)
    hold_leads: float = 8.0  # scale in to the highest need of this many boot times, at most the window (0: the window)
    short_overloads: int = 4  # when launches served little of this many recent overloads, wait out the next (0: off, and the calm need with it)
    burst_headroom: float = 0.7  # … and stand this fraction of the calm need above it,
    burst_size: float = 0.6  # … at most this fraction of the recent overloads' size (RMS)
    full_z: float = 4.0  # the fleet at 100% CPU serves the smoothed need plus this many σ of the jitter (0: off)
    metric: str = "CPU"  # what the samples measure, for the reason text
    unit_scale: float = 1.0  # a sample × this is in the metric's own unit (for the reason text)


def _alpha(dt: float, tau: float) -> float:
    """Weight of a new sample dt seconds after the last in a moving average over tau seconds."""
    return 1.0 if tau <= 0 else 1 - math.exp(-dt / tau)


class NeedEstimator:
    """The need, smoothed for each direction, and two measures of its noise; and the calm need,
    the scale-in need averaged over the moments outside overloads only, with its wander."""

    def __init__(self, s: PredictiveSettings):
        self.s = s
        self.up = 0.0  # the scale-out need, averaged over up_smooth
        self.down = 0.0  # the scale-in need, averaged over in_smooth
        self.fast = -1.0  # what the measured instances see, averaged over SPIKE_SMOOTH (-1: none yet)
        self._wander_var = 0.0  # variance of the raw scale-in need around its average
        self._jitter_var = 0.0  # variance of the sample noise
        self.calm = -1.0  # -1: not measured yet
        self._calm_var = 0.0
        self._calm_last = -1.0
        self._seen_before = -1.0
        self._last: float | None = None
        self._step = 0.0  # seconds between the last two samples
        self._dt = -1.0
        self._alphas = (1.0, 1.0, 1.0, 1.0)

    @property
    def wander(self) -> float:
        return math.sqrt(self._wander_var)

    @property
    def jitter(self) -> float:
        return math.sqrt(self._jitter_var)

    @property
    def calm_wander(self) -> float:
        return math.sqrt(self._calm_var)

    def update_calm(self, now: float, down: float) -> None:
        """Take `down`, the scale-in need at a moment outside any overload, into the calm need,
        weighed as one sample (by the time since the sample before it, as `update` weighs every
        sample), not by the time since the last calm moment: the first moment after an overload,
        its instances still warming and counted at the target, would carry the whole overload."""
        last = self._calm_last
        if self.calm < 0 or now - last > RESTART_AFTER or now < last:
            self.calm, self._calm_var = down, 0.0
        else:
            _, a_down, a_noise, _ = self._weights(min(now - last, self._step))
            self.calm += (down - self.calm) * a_down
            dev = down - self.calm
            self._calm_var += (dev * dev - self._calm_var) * a_noise
        self._calm_last = now

    def take_level(self, now: float) -> None:
        """The load has moved to a new level (LEVEL_SHIFT): the calm need starts from the scale-in
        need's average and its wander."""
        self.calm, self._calm_var, self._calm_last = self.down, self._wander_var, now

    def update(self, now: float, need: Needs) -> None:
        if self._last is None or now - self._last > RESTART_AFTER or now < self._last:
            self.up, self.down = need.up, need.down
            self.fast = need.seen
            self._wander_var = self._jitter_var = 0.0
            self._step = 0.0
        else:
            self._step = now - self._last
            a_up, a_down, a_noise, a_fast = self._weights(self._step)
            self.up += (need.up - self.up) * a_up
            self.down += (need.down - self.down) * a_down
            if need.known:
                self.fast = need.seen if self.fast < 0 else self.fast + (need.seen - self.fast) * a_fast
            dev = need.down - self.down
            self._wander_var += (dev * dev - self._wander_var) * a_noise
            # Half the mean squared change from one sample to the next is the variance of the
            # sample noise, whatever the trend (a slow trend adds almost nothing per second). One
            # step far beyond the noise so far is a change of level, not noise: it counts only up
            # to JITTER_CLIP σ (or a tenth of the need, while the noise is still unmeasured).
            if need.known and self._seen_before >= 0:
                step = need.seen - self._seen_before
                clip = max(JITTER_CLIP * self.jitter, 0.1 * max(need.seen, self._seen_before))
                step = max(-clip, min(clip, step))
                self._jitter_var += (0.5 * step * step - self._jitter_var) * a_noise
        self._seen_before = need.seen
        self._last = now

    def _weights(self, dt: float) -> tuple[float, float, float, float]:
        if dt != self._dt:  # cached: dt is nearly always the control interval
            s = self.s
            self._dt = dt
            # Noise is measured over two scale-in windows.
            self._alphas = (
                _alpha(dt, s.up_smooth),
                _alpha(dt, s.in_smooth),
                _alpha(dt, 2 * s.scale_in_window),
                _alpha(dt, SPIKE_SMOOTH),
            )
        return self._alphas


class ShortOverloads:
    """Whether recent overloads were mostly over before a launch asked at their start could serve.

    An overload starts when the need seen exceeds the capacity of that moment past the tolerance,
    and ends when the need falls back to that capacity. It is measured against the capacity it
    started at, so a launch does not end it: its length is what a launch asked at its start would
    have had to outlast, and its size (the most it asked above that capacity) is what the fleet
    standing at its start missed. A CPU sample stops at 100%, so that size stops at about the
    fleet itself: a small burst is measured, a large one is seen as large. One that runs longer
    than LONG_OVERLOAD boot times is recorded as that long.

    Beside the overloads it follows the excursion the calm need leaves out: from an overload's start
    until the need seen falls back to the capacity it started at, for at most LEVEL_SHIFT seconds
    (`shifted` says, for one update, that it ran that long and the load is at a new level).

    Nothing here is saved: after a restart the rule is off until `keep` new overloads are seen,
    and the policy launches for every overload as it does without it."""

    def __init__(self, s: PredictiveSettings):
        self.keep = s.short_overloads
        self.tolerance = s.tolerance
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=max(1, self.keep))  # (ended, length, size)
        self.start = -1.0  # when the running overload started (-1: none running)
        self.cap0 = 0  # the capacity it started at
        self.size = 0.0  # the most it asked above cap0 so far
        self.excursion_start = -1.0  # -1: none running
        self.excursion_cap0 = 0
        self.shifted = False

    @property
    def running(self) -> bool:
        return self.start >= 0

    @property
    def excursion(self) -> bool:
        return self.excursion_start >= 0

    def update(self, now: float, seen: float, cap: int, lead: float) -> None:
        self.shifted = False
        if self.excursion and (seen <= self.excursion_cap0 or now - self.excursion_start > LEVEL_SHIFT):
            self.shifted = seen > self.excursion_cap0
            self.excursion_start = -1.0
        if not self.running:
            if seen > cap * (1 + self.tolerance):
                self.start, self.cap0, self.size = now, cap, seen - cap
                if not self.excursion:
                    self.excursion_start, self.excursion_cap0 = now, cap
        elif seen <= self.cap0 or now - self.start > LONG_OVERLOAD * lead:
            self.recent.append((now, now - self.start, self.size))
            self.start = -1.0
        else:
            self.size = max(self.size, seen - self.cap0)

    def wait(self, now: float, lead: float) -> float:
        """How long an overload must last before a launch for it is worth asking: the longest of
        the last `keep` (ended within OVERLOAD_MEMORY) that ended within `lead`, when launches
        asked at their starts would have served for at most SERVED_SHARE of their total length;
        else 0 (launch at once)."""
        lengths = self._lengths(now)
        if self.keep <= 0 or len(lengths) < self.keep:
            return 0.0
        within = [length for length in lengths if length < lead]
        served = sum(length - lead for length in lengths if length > lead)
        if not within or served > SERVED_SHARE * sum(lengths):
            return 0.0
        return max(within)

    def waiting(self, now: float, wait: float) -> float:
        """Of `wait` (what `wait` returned), what is still to run before launching for the running
        overload, or for a smoothed need still above the capacity after one (0: none). An overload
        larger than any of the recent short ones is not one of them: it launches at once."""
        if wait <= 0:
            return 0.0
        if not self.running:
            return wait
        if self.size > max(size for _, _, size in self.recent):
            return 0.0
        return max(0.0, wait - (now - self.start))

    def coming(self, now: float, lead: float) -> bool:
        """Whether bursts come: the last `keep` overloads ended within OVERLOAD_MEMORY, and at least
        half of them were bursts (the need fell back to the capacity each started at within
        LONG_OVERLOAD boot times). Launches may or may not catch such bursts, but only capacity
        standing when one starts meets its first boot time. A rise the fleet was slow to follow (a
        ramp) does not fall back."""
        lengths = self._lengths(now)
        bursts = sum(1 for length in lengths if length <= LONG_OVERLOAD * lead)
        return self.keep > 0 and len(lengths) >= self.keep and 2 * bursts >= self.keep

    def _lengths(self, now: float) -> list[float]:
        """The lengths of the recent overloads that ended within OVERLOAD_MEMORY."""
        return [length for ended, length, _ in self.recent if ended >= now - OVERLOAD_MEMORY]

    def size_rms(self) -> float:
        """The root mean square of the recent overloads' sizes, in instances at the target."""
        return math.sqrt(sum(size * size for _, _, size in self.recent) / len(self.recent)) if self.recent else 0.0


class HoldRecord:
    """Whether the scale-in hold pays: of the capacity a hold of `full` seconds kept above the
    recommendation, how much was needed again before the hold let it go (see HOLD_MEMORY). It
    follows the recommendations through a hold of its own, so it judges the whole hold whatever
    hold the policy uses. Nothing here is saved: a restarted controller holds in full until it has
    seen HOLD_EVIDENCE instances released."""

    def __init__(self) -> None:
        self._whole = WindowMax(0.0)  # the recommendations through a whole hold
        self.back = 0.0  # instances a rising recommendation found still held (decaying sum)
        self.released = 0.0  # instances the hold let go unused (decaying sum)
        self._last = -1.0
        self._rec = 0.0
        self._level = 0.0  # what the hold kept at the last update
        self._dt = -1.0
        self._keep = 1.0

    @property
    def pays(self) -> bool:
        return self.released < HOLD_EVIDENCE or self.back >= self.released

    def update(self, now: float, rec: float, full: float) -> None:
        """`rec`: this moment's scale-in recommendation; `full`: the whole hold, in seconds."""
        self._whole.window = full
        self._whole.push(now, rec)
        level = self._whole.max(now, rec)
        dt = now - self._last
        if self._last >= 0 and 0 <= dt <= RESTART_AFTER:
            if dt != self._dt:  # cached: dt is nearly always the control interval
                self._dt, self._keep = dt, math.exp(-dt / HOLD_MEMORY)
            self.back = self.back * self._keep + max(0.0, min(rec, self._level) - self._rec)
            self.released = self.released * self._keep + max(0.0, self._level - level)
        self._last, self._rec, self._level = now, rec, level


class SeasonalMemory:
    """Per-minute peaks of the smoothed need, and of the spikes, for the last `days` days."""

    def __init__(self, days: int):
        self.days = days
        self.by_day: dict[int, list[float]] = {}  # day number -> SLOTS per-minute peaks (-1: not seen)
        self.spikes: dict[int, list[float]] = {}  # day number -> SLOTS per-minute spike peaks (0: none)
        self._cache_minute = -1
        self._cache_lead = -1.0
        self._cache = (-1.0, -1.0)
        self._spike_minute = -1
        self._spike_lead = -1.0
        self._spike = 0.0
        self.false_alarms = 0.0  # the share of recent minutes the memory over-promised
        self._minute = -1  # the minute being remembered, judged once it is over

    @property
    def trusted(self) -> bool:
        """Whether what one day alone says is taken minute by minute (see FALSE_ALARMS); not saved,
        so a restarted controller trusts its memory until it breaks its promises again."""
        return self.false_alarms <= FALSE_ALARMS

    def remember(self, now: float, need: float, spike: float | None = None) -> None:
        """`need` is the smoothed need; `spike` (None: not measured) the spike peak, 0 when none."""
        day, slot = int(now // DAY), int(now % DAY // 60)
        minute = int(now // 60)
        if minute != self._minute:
            if self._minute >= 0:
                self._judge(self._minute)
            self._minute = minute
        _raise(self.by_day, self.days, day, slot, need, -1.0)
        if spike is not None:
            _raise(self.spikes, self.days, day, slot, spike, 0.0)

    def usual(self, day: int, slot: int) -> float:
        """What recent days needed at this minute: the lower of yesterday's and last week's same
        weekday peaks when both are known (weekends are quieter than weekdays), else what is known
        while the memory is `trusted`, or that day's calm level when it is not; -1 when there is no
        history."""
        said, rows = self._said(day, slot)
        if len(rows) != 1 or self.trusted:
            return said
        near = [rows[0][(slot + k) % SLOTS] for k in range(-CALM_MINUTES, CALM_MINUTES + 1)]
        return min(v for v in near if v >= 0)  # the minute itself is among them

    def _said(self, day: int, slot: int) -> tuple[float, list[list[float]]]:
        """(what `usual` would say trusting one day, the days' rows it rests on)."""
        vals, rows = [], []
        for back in (1, 7):
            row = self.by_day.get(day - back)
            if row is not None and row[slot % SLOTS] >= 0:
                # a 3-minute neighbourhood smooths the per-minute noise
                vals.append(max(row[(slot - 1) % SLOTS], row[slot % SLOTS], row[(slot + 1) % SLOTS]))
                rows.append(row)
        return (min(vals) if vals else -1.0), rows

    def _judge(self, minute: int) -> None:
        """Score the finished `minute`: did the memory say it would need far more than it did?"""
        day, slot = minute // SLOTS, minute % SLOTS
        row = self.by_day.get(day)
        said, _ = self._said(day, slot)
        if row is None or row[slot] < 0 or said <= 0 or row[slot] < SILENCE * said:
            return
        alarm = 1.0 if said > (1 + OVER_PROMISE) * row[slot] else 0.0
        self.false_alarms += (alarm - self.false_alarms) / PROMISE_MINUTES

    def now_and_ahead(self, now: float, lead: float) -> tuple[float, float]:
        """(usual need now, usual peak over the next `lead` seconds), cached per minute."""
        minute = int(now // 60)
        if minute != self._cache_minute or lead != self._cache_lead:
            self._cache_lead = lead
            day, slot = int(now // DAY), int(now % DAY // 60)
            current = ahead = self.usual(day, slot)
            for k in range(1, int(lead // 60) + 2):
                later = slot + k
                ahead = max(ahead, self.usual(day + later // SLOTS, later % SLOTS))
            self._cache_minute, self._cache = minute, (current, ahead)
        return self._cache

    def spike_ahead(self, now: float, lead: float) -> float:
        """The spike that came over the next `lead` seconds on at least SPIKE_DAYS of the recent
        days: the lowest of those days' peaks in that window, 0 when none (cached per minute). Each
        day's peak is taken over the whole window, so a spike a few minutes early or late on one
        day still counts as the same."""
        minute = int(now // 60)
        if minute != self._spike_minute or lead != self._spike_lead:
            self._spike_minute, self._spike_lead = minute, lead
            day, slot = int(now // DAY), int(now % DAY // 60)
            # the minutes now_and_ahead looks at: to the minute after the lead, and one either side
            window = range(slot - 1, slot + int(lead // 60) + 3)
            peaks = []
            for back in SPIKE_BACK:
                seen = -1.0  # -1: the controller did not run that day
                for m in window:
                    row = self.spikes.get(day - back + m // SLOTS)
                    if row is not None:
                        seen = max(seen, row[m % SLOTS])
                if seen >= 0:
                    peaks.append(seen)
            self._spike = min(peaks) if len(peaks) >= SPIKE_DAYS else 0.0
        return self._spike

    def export(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "days": {str(d): [round(v, 3) for v in row] for d, row in self.by_day.items()},
            "spikes": {str(d): [round(v, 3) for v in row] for d, row in self.spikes.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        """Load learned history; anything malformed is ignored and the memory stays as it was."""
        try:
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                return
            days = _rows(state["days"], -1.0)
            spikes = _rows(state.get("spikes", {}), 0.0)  # a history saved before spikes were kept has none
        except (KeyError, TypeError, ValueError, AttributeError):
            return
        newest = max(days, default=0)
        self.by_day = {d: r for d, r in days.items() if d > newest - self.days}
        self.spikes = {d: r for d, r in spikes.items() if d > newest - self.days}
        self._cache_minute = self._spike_minute = -1


def headroom_factor(lead: float) -> float:
    """How the scale-in headroom (tuned at a 90 s boot) scales with the boot time planned for:
    as its fourth root, the boot time held within the 20-300 s the bench measures. A short boot
    relaunches before the need has moved far; a long one must hold more."""
    return (min(HEADROOM_LEADS[1], max(HEADROOM_LEADS[0], lead)) / DEFAULT_LEAD) ** HEADROOM_POWER


def jitter_factor(lead: float) -> float:
    """How the sample jitter's share of the scale-in headroom (tuned at a 90 s boot) scales with the
    boot time planned for: as the square root of `headroom_factor` below DEFAULT_LEAD, not at all
    above it. A launch that serves in 20 s follows a run of noisy seconds the standing headroom
    would otherwise have to hold; no launch follows noise that fast, however long the boot."""
    return math.sqrt(min(1.0, headroom_factor(lead)))


def _raise(rows: dict[int, list[float]], days: int, day: int, slot: int, value: float, unseen: float) -> None:
    """Raise `rows[day][slot]` to `value`, starting the day's row (and forgetting days older than
    `days`) at its first value."""
    row = rows.get(day)
    if row is None:
        row = rows[day] = [unseen] * SLOTS
        for old in [d for d in rows if d <= day - days]:
            del rows[old]
    if value > row[slot]:
        row[slot] = value


def _rows(saved: Any, lowest: float) -> dict[int, list[float]]:
    """Per-day rows as saved by `SeasonalMemory.export`; ValueError when malformed."""
    rows: dict[int, list[float]] = {}
    for key, row in dict(saved).items():
        if not isinstance(row, list) or len(row) != SLOTS:
            raise ValueError("a day's row is not one value per minute")
        vals = [float(v) for v in row]
        if any(not math.isfinite(v) or v > 1e7 for v in vals):
            raise ValueError("a value is out of range")
        rows[int(key)] = [max(lowest, v) for v in vals]
    return rows


class Predictive:
    name = "predictive"

    def __init__(self, settings: PredictiveSettings):
        self.s = settings
        self.estimate = NeedEstimator(settings)
        self.memory = SeasonalMemory(settings.history_days)
        self.window = ScaleInWindow(settings.scale_in_window, settings.min_instances, settings.max_instances)
        self._hot_run = 0  # samples in a row at or above the hot line
        self._held = 0.0  # the raw need of the first hot sample, while unconfirmed
        self.overloads = ShortOverloads(settings)
        self.hold_record = HoldRecord()
        self._recent_need = WindowMax(DEFAULT_LEAD)  # the unsmoothed scale-in need of the last boot time

    def decide(self, obs: Observation) -> Decision:
        s = self.s
        self.window.seed(obs)
        need = needs(obs, s.cpu_target)
        if need is None:
            return Decision(clamp(obs.capacity, s.min_instances, s.max_instances), no_metrics(obs, s.metric))
        # The noise as measured before this sample: a jump is not evidence of its own noise.
        jitter = self.estimate.jitter
        self.estimate.update(obs.now, need)
        lead = self.lead(obs)
        self._recent_need.window = lead
        self._recent_need.push(obs.now, need.down)
        if need.known:
            self.memory.remember(obs.now, self.estimate.down, self._spike_peak(obs, lead))
        usual_now, usual_ahead = self.memory.now_and_ahead(obs.now, lead)
        spike_ahead = self.memory.spike_ahead(obs.now, lead)
        if need.known and s.short_overloads > 0:
            self.overloads.update(obs.now, need.seen, obs.capacity, lead)
            if self.overloads.shifted:
                self.estimate.take_level(obs.now)
            elif not self.overloads.excursion:
                self.estimate.update_calm(obs.now, need.down)
        wait = self.overloads.wait(obs.now, lead)
        waiting = self.overloads.waiting(obs.now, wait)
        plan_up, planned_for, decision = self._scale_out(obs, need, jitter, lead, usual_ahead, spike_ahead, waiting)
        if decision is not None:
            return decision
        decision = None if waiting > 0 else self._noise_floor(obs, need, jitter)
        if decision is not None:
            return decision
        return self._scale_in(obs, need, jitter, lead, plan_up - planned_for, usual_now, wait > 0)

    def _spike_peak(self, obs: Observation, lead: float) -> float:
        """What the seasonal memory keeps of this moment as a spike: the shortly averaged need when
        it runs the fleet at SPIKE_CPU or more, or while a recurring spike is due (a spike the
        pre-warm served in full does not overload the fleet, yet it is there again); else 0.
        The smoothed need alone would not do: a 90 s average keeps a fraction of a 30 s spike."""
        fast = self.estimate.fast
        overloads = fast * self.s.cpu_target >= SPIKE_CPU * obs.in_service
        return fast if overloads or self.memory.spike_ahead(obs.now, lead) > 0 else 0.0

    def lead(self, obs: Observation) -> float:
        """How far ahead to plan: HELIX_LAUNCH_LEAD, or with 0 the boot time the controller measured
        on its own launches (DEFAULT_LEAD until it has measured one)."""
        if self.s.lead > 0:
            return self.s.lead
        return obs.boot_time if obs.boot_time > 0 else DEFAULT_LEAD

    # --- the scale-out plan ------------------------------------------------------------------
    def _scale_out(
        self,
        obs: Observation,
        need: Needs,
        jitter: float,
        lead: float,
        usual_ahead: float,
        spike_ahead: float,
        waiting: float = 0.0,
    ) -> tuple[float, float, Decision | None]:
        """(the plan, the need it was planned from, a launch decision or None). `waiting`: seconds
        to wait out before launching for the need itself (what recent days needed is not waited
        for)."""
        s = self.s
        cap, n = obs.capacity, obs.in_service
        hot_line = min(0.95, s.hot_ratio * s.cpu_target)
        if need.up >= (1 + RISE) * self.estimate.fast > 0:
            hot_line = min(hot_line, s.rise_ratio * s.cpu_target)
        self._hot_run = self._hot_run + 1 if need.known and need.mean_up >= hot_line else 0
        # A hot reading is trusted when the next sample confirms it, or at once when it stands out
        # from the sample noise; until then it plans for its raw need less that noise, so one noisy
        # second on a small fleet does not launch instances the scale-in side hands straight back.
        noise = s.hot_z * jitter
        confirmed = self._hot_run >= s.hot_confirm or (self._hot_run and need.up - noise >= hot_line * n / s.cpu_target)
        if self._hot_run == 1:
            # what a trusted first sample would have launched, held back while unconfirmed
            self._held = 0.0 if confirmed or need.up <= cap * (1 + s.tolerance) else need.up
        if confirmed:
            base = need.up
        elif self._hot_run:
            base = max(self.estimate.up, need.up - noise)
        else:
            base = self.estimate.up
        plan = base
        # What recent days needed over the next lead: launch a boot time ahead of a recurring rise.
        # While the memory over-promises (not `trusted`: real traffic's minute-to-minute peaks,
        # which come back less than recent days' maxima say), the rise may not come: launch ahead
        # only the share scaled with the boot time as the headroom is, since a short boot follows
        # the rise itself nearly as well.
        share = s.floor_fraction if self.memory.trusted else s.floor_fraction * min(1.0, headroom_factor(lead))
        expected = share * usual_ahead if usual_ahead > 0 else 0.0
        # A spike that recurred within it: all of it, since a fleet it overloaded saw less than it
        # asked for, and a fraction would lose the rest.
        spiking = spike_ahead > expected
        if spiking:
            expected = spike_ahead
        if expected > plan:
            plan = expected
        # The sample that confirms a hot reading launches, past the tolerance, what the first one
        # held back: together they launch what one trusted sample would have.
        topping_up = s.hot_confirm > 1 and self._hot_run == s.hot_confirm and ceil_units(self._held) > cap
        if topping_up and self._held > plan:
            plan = self._held
        if not (need.known and (topping_up or plan > cap * (1 + s.tolerance))):
            return plan, base, None
        if waiting > 0 and plan != expected:
            tail = f"; not launching for {plan:.1f} yet: recent overloads ended within the {lead:g} s boot ({waiting:.0f} s to wait)"
            return plan, base, Decision(clamp(cap, s.min_instances, s.max_instances), self._why(obs, need, tail))
        want = clamp(ceil_units(plan), s.min_instances, s.max_instances)
        if want <= cap:
            return plan, base, Decision(clamp(cap, s.min_instances, s.max_instances), "at the maximum")
        if plan != expected:
            season = ""
        elif spiking:
            season = f" (a spike of {spike_ahead:.1f} recurred within {lead:g} s on recent days)"
        else:
            season = f" (recent days needed {usual_ahead:.1f} within {lead:g} s)"
        return (
            plan,
            base,
            Decision(want, self._why(obs, need, f"; planning for {plan:.1f} instances at target{season}")),
        )

    def _noise_floor(self, obs: Observation, need: Needs, jitter: float) -> Decision | None:
        """Sample noise that a small fleet cannot absorb: n instances serve n / target instances'
        worth of need at 100% CPU, and a second above that loses requests. Keep that line `full_z`
        σ of the jitter above the smoothed need; scale out past the tolerance (scale-in keeps it
        as its own lower bound)."""
        s = self.s
        if s.full_z <= 0 or not need.known:
            return None
        full_line = s.cpu_target * (self.estimate.up + s.full_z * jitter)
        if full_line <= obs.capacity * (1 + s.tolerance):
            return None
        want = clamp(ceil_units(full_line), s.min_instances, s.max_instances)
        if want <= obs.capacity:
            return None
        return Decision(want, self._why(obs, need, f"; its sample noise needs {full_line:.1f} instances at 100% CPU"))

    # --- the scale-in plan -------------------------------------------------------------------
    def _scale_in(
        self,
        obs: Observation,
        need: Needs,
        jitter: float,
        lead: float,
        pre_launch: float,
        usual_now: float,
        short: bool = False,
    ) -> Decision:
        """`pre_launch`: how far the scale-out plan rose above the need on what recent days needed
        next; the scale-in plan keeps that much too, or it would hand back what was just planned.
        `short`: recent overloads were mostly over within a boot time, so no launch serves them: plan
        from the calm need between them, with a standing headroom for them."""
        s = self.s
        lo, hi, cap, now = s.min_instances, s.max_instances, obs.capacity, obs.now
        est = self.estimate
        margin = headroom_factor(lead) * s.in_margin
        rec, floor = self._recommend(est.down, est.wander, margin, pre_launch, jitter, lead, usual_now, short)
        full = min(s.scale_in_window, s.hold_leads * lead) if s.hold_leads > 0 else s.scale_in_window
        self.hold_record.update(now, rec, full)
        held_in_full = self.hold_record.pays
        # While overloads are short, or the hold does not pay (bursts end and stay gone), the plan
        # starts from the calm need once measured: what an overload launched is let go as soon as
        # it is over, not after a 90 s average has followed it down and the hold has kept its
        # highest value; bursts at random times are better met by a standing margin than by
        # capacity that stands only after them (bench/burst_bound.py).
        calm = (short or not held_in_full) and est.calm >= 0
        if calm:
            # Bursts that come at random are met by a margin that stands (`burst_margin`), in place of
            # the capacity the hold would have kept after them. Like the sample jitter, a burst's
            # first boot time is out of any launch's reach whatever the boot time: its share shrinks
            # less at short boots, and does not grow at long ones.
            if self.overloads.coming(now, lead):
                margin = jitter_factor(lead) * s.burst_margin
            rec, floor = self._recommend(est.calm, est.calm_wander, margin, pre_launch, jitter, lead, usual_now, short)
        self.window.hold(full if held_in_full else min(full, max(lead, s.in_smooth)))
        self.window.push(now, rec)
        allowed = int(self.window.allowed(now, rec))
        desired = clamp(min(cap, allowed), lo, hi)
        if desired < cap and calm and self.overloads.excursion:
            # The calm need leaves a running overload out: while it runs, the fleet goes no lower
            # than the most the need asked for over the last boot time (a burst holds it; a ramp
            # that turned lets it go as the load falls). Not pushed into the hold, which would keep
            # it after the end.
            desired = max(desired, min(cap, ceil_units(self._recent_need.max(now, need.down))))
        if desired < cap and obs.pending and cap <= hi:
            # Never scale in while launches are pending: a launch about to serve is the worst
            # capacity to give up, and cancelling it restarts the boot clock when the load returns.
            desired = cap
        if desired < cap and obs.warming and need.down > desired:
            # Nor, while instances warm up, below what the unsmoothed need asks for right now: the
            # smoothed need lags a rise that instances started from a warm pool meet in seconds.
            desired = min(cap, max(desired, ceil_units(need.down)))
        if desired == cap:
            return Decision(desired, "no change")
        if desired > cap:
            return Decision(desired, f"keep within [{lo}, {hi}]")
        season = f" (recent days needed {usual_now:.1f} now)" if allowed == floor else ""
        if calm:
            season += f" (planned from the calm need {est.calm:.1f}, overloads left out)"
        cut = (
            ""
            if held_in_full
            else f"; held {self.window.window:g} s, not {full:g}: held capacity came back less often than it was let go"
        )
        return Decision(
            desired,
            self._why(obs, need, f"; the highest need of the last {self.window.window:g} s is {allowed}{season}{cut}"),
        )

    def _recommend(
        self,
        base: float,
        wander: float,
        margin: float,
        pre_launch: float,
        jitter: float,
        lead: float,
        usual_now: float,
        short: bool,
    ) -> tuple[int, int]:
        """(the scale-in recommendation planned from `base`, a need with its `wander`, and `margin`
        of the need (scaled for the boot time); the floor of what recent days needed now)."""
        s = self.s
        plan = base + max(0.0, pre_launch)
        # Headroom sized from the observed burstiness: how far the need wanders from its average,
        # and the sample-to-sample jitter, which no launch can follow whatever the boot time (the
        # heavy-tailed noise that otherwise launches on every spike and hands it straight back);
        # or a fixed fraction of the need when the load is smooth (the hysteresis that stops a calm
        # fleet flapping). The largest, not the sum.
        # The wander's share grows with the boot time it covers (as the margin does); the sample
        # jitter's only shrinks, and less, at short boots (`jitter_factor`).
        f = headroom_factor(lead)
        headroom = max(margin * plan, f * s.noise_z * wander, jitter_factor(lead) * s.jitter_z * jitter)
        if short:
            # Bursts no launch can catch are served by what stands when they start (bench/burst_bound.py:
            # a steady headroom loses less than a varying one of the same cost). A fraction of the calm
            # need, so it scales with the fleet, and of the bursts' own size, so small ones get little;
            # scaled with the boot time like the margin.
            headroom = max(headroom, f * min(s.burst_headroom * plan, s.burst_size * self.overloads.size_rms()))
        rec = ceil_units(plan + headroom - s.in_slack)
        if s.full_z > 0:
            rec = max(rec, ceil_units(s.cpu_target * (base + s.full_z * jitter)))
        # Rounded down: the floor is a guard against sudden silence, not extra headroom.
        floor = int(s.floor_fraction * usual_now) if usual_now > 0 else 0
        if floor > rec:
            rec = floor
        return clamp(rec, s.min_instances, s.max_instances), floor

    def _why(self, obs: Observation, need: Needs, tail: str) -> str:
        s = self.s
        return describe(obs, need.total, need.known, s.cpu_target, s.metric, s.unit_scale) + tail

    # --- persistence -------------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        return self.memory.export()

    def import_state(self, state: dict[str, Any]) -> None:
        self.memory.load(state)
