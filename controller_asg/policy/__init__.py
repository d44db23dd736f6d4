"""Scaling policies. `make_policy(cfg)` builds the one `HELIX_POLICY` names, with its settings.

Live policies: `predictive` (default), `target`, `threshold`. The simulator can also run the
baselines of `baselines.py` (`seed`, `aws-target-tracking`, `k8s-hpa`) through `build_policy`.
"""

from __future__ import annotations

from controller_asg.policy.base import Decision, Observation, Policy
from controller_asg.policy.baselines import AwsTargetTracking, K8sHpa, Limits, SeedLoop
from controller_asg.policy.predictive import Predictive, PredictiveSettings
from controller_asg.policy.target import TargetSettings, TargetTracking
from controller_asg.policy.threshold import Threshold, ThresholdSettings
from shared.config import Config

LIVE_POLICIES = ("predictive", "target", "threshold")
BASELINES = ("seed", "aws-target-tracking", "k8s-hpa")

__all__ = ["Decision", "Observation", "Policy", "make_policy", "build_policy", "LIVE_POLICIES", "BASELINES"]


def build_policy(name: str, cfg: Config) -> Policy:
    """Any policy by name (live ones and baselines), with the settings of `cfg` (a shared.config.Config)."""
    lo, hi = cfg.min_instances, cfg.max_instances
    if name == "target":
        return TargetTracking(TargetSettings(lo, hi, cfg.cpu_target, cfg.tolerance, cfg.scale_in_window))
    if name == "threshold":
        return Threshold(ThresholdSettings(lo, hi, cfg.cpu_upper, cfg.cpu_lower, cfg.step, cfg.cooldown))
    if name == "predictive":
        return Predictive(predictive_settings(cfg))
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


def make_policy(cfg: Config) -> Policy:
    """The policy the live controller runs: `cfg.policy` with its settings."""
    return build_policy(cfg.policy, cfg)
