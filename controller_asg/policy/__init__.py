"""Scaling policies. `make_policy(cfg)` builds the one `HELIX_POLICY` names, with its settings.

Live policies: `predictive` (default), `target`, `threshold`. The simulator can also run the
baselines of `baselines.py` (`seed`, `aws-target-tracking`, `k8s-hpa`) through `build_policy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace as dataclasses_replace

from controller_asg.policy.backlog import Backlog, BacklogSettings
from controller_asg.policy.base import Decision, Observation, Policy
from controller_asg.policy.baselines import AwsTargetTracking, K8sHpa, Limits, SeedLoop
from controller_asg.policy.multi import Member, MultiMetric
from controller_asg.policy.predictive import Predictive, PredictiveSettings
from controller_asg.policy.target import TargetSettings, TargetTracking
from controller_asg.policy.threshold import Threshold, ThresholdSettings
from shared.config import Config

LIVE_POLICIES = ("predictive", "target", "threshold")
BASELINES = ("seed", "aws-target-tracking", "k8s-hpa")

__all__ = [
    "Decision",
    "Observation",
    "Policy",
    "make_policy",
    "build_policy",
    "policy_with_signals",
    "LIVE_POLICIES",
    "BASELINES",
]


def build_policy(name: str, cfg: Config, metric: str = "CPU", unit_scale: float = 1.0) -> Policy:
    """Any policy by name (live ones and baselines), with the settings of `cfg` (a shared.config.Config).
    `metric`/`unit_scale`: what its samples measure, for its reasons (see policy/multi.py)."""
    lo, hi = cfg.min_instances, cfg.max_instances
    if name == "target":
        return TargetTracking(
            TargetSettings(lo, hi, cfg.cpu_target, cfg.tolerance, cfg.scale_in_window, metric, unit_scale)
        )
    if name == "threshold":
        return Threshold(ThresholdSettings(lo, hi, cfg.cpu_upper, cfg.cpu_lower, cfg.step, cfg.cooldown))
    if name == "predictive":
        return Predictive(dataclasses_replace(predictive_settings(cfg), metric=metric, unit_scale=unit_scale))
    if name == "seed":
        return SeedLoop(Limits(lo, hi))
    if name == "aws-target-tracking":
        return AwsTargetTracking(Limits(lo, hi), target=cfg.cpu_target)
    if name == "k8s-hpa":
        return K8sHpa(Limits(lo, hi), target=cfg.cpu_target, tolerance=cfg.tolerance)
    raise ValueError(f"policy={name}: expected one of {', '.join(LIVE_POLICIES + BASELINES)}")


def predictive_settings(cfg: Config) -> PredictiveSettings:
    """The default policy's settings. Its smoothing scales with HELIX_SCALE_IN_WINDOW (tuned at the
    default 300 s: 60 s for the scale-out need, 90 s for the scale-in need), so a short window in a
    demo still brings the fleet back to min within about the window."""
    w = cfg.scale_in_window
    return PredictiveSettings(
        min_instances=cfg.min_instances,
        max_instances=cfg.max_instances,
        cpu_target=cfg.cpu_target,
        tolerance=cfg.tolerance,
        scale_in_window=w,
        lead=cfg.launch_lead,
        up_smooth=0.2 * w,
        in_smooth=0.3 * w,
    )


def policy_with_signals(name: str, cfg: Config, external: bool | None = None) -> Policy:
    """`name` on CPU, plus one recommender for each other metric `cfg` turns on (requests per
    second, memory, the external backlog), the largest winning (policy/multi.py). With CPU alone,
    just the policy. Baselines scale on CPU only. `external`: whether there is an external metric
    (None: whether HELIX_EXTERNAL_METRIC names one; the simulator says so for a backlog column)."""
    base = build_policy(name, cfg)
    if name not in LIVE_POLICIES:
        return base
    # Per-instance metrics run the same policy in its CPU terms; threshold's fixed CPU bands do not
    # translate, so with it they run `target`.
    same = "target" if name == "threshold" else name
    members = [Member("CPU", base)]
    for label, target, field in (
        ("requests/s", cfg.rps_target, "rps_samples"),
        ("memory", cfg.mem_target, "mem_samples"),
    ):
        if target > 0:
            factor = cfg.cpu_target / target
            members.append(
                Member(label, build_policy(same, cfg, metric=label, unit_scale=1 / factor), _scaled(field, factor))
            )
    if (bool(cfg.external_metric) if external is None else external) and cfg.external_target > 0:
        backlog = BacklogSettings(cfg.min_instances, cfg.max_instances, cfg.external_target, cfg.scale_in_window)
        members.append(Member("backlog", Backlog(backlog)))
    if len(members) == 1:
        return base
    return MultiMetric(members, cfg.min_instances, cfg.scale_in_window)


def _scaled(field: str, factor: float) -> Callable[[Observation], tuple[float, ...]]:
    """One per-instance metric's samples in the policy's CPU terms (its target reads as the CPU target)."""

    def pick(obs: Observation) -> tuple[float, ...]:
        return tuple(v * factor for v in getattr(obs, field))

    return pick


def make_policy(cfg: Config) -> Policy:
    """The policy the live controller runs: `cfg.policy` with its settings and signals."""
    return policy_with_signals(cfg.policy, cfg)
