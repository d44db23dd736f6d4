"""Providers: where instances run. `make_provider(cfg)` picks one from HELIX_PROVIDER, and
`make_traffic(cfg)` what tells load balancers about them (controller_asg/traffic.py)."""

from __future__ import annotations

from controller_asg.providers.base import LaunchError, Provider, ProviderInstance
from controller_asg.traffic import NoTraffic, Traffic
from shared.config import Config

__all__ = ["LaunchError", "Provider", "ProviderInstance", "make_provider", "make_traffic"]


def make_provider(cfg: Config) -> Provider:
    """The provider HELIX_PROVIDER names; boto3 is imported only for `ec2`."""
    if cfg.provider == "ec2":
        from controller_asg.providers.ec2 import Ec2Provider

        return Ec2Provider(cfg)
    from controller_asg.providers.local import LocalProvider

    return LocalProvider(cfg)


def make_traffic(cfg: Config) -> Traffic:
    """TargetGroups for `ec2` with HELIX_EC2_TARGET_GROUPS set, else NoTraffic (the local demo's
    balancer reads the table; EC2 without groups has no balancer to tell). boto3 is imported only
    for TargetGroups. Raises TrafficConfigError (a ConfigError) for a group that cannot be used,
    TrafficError when the API fails while checking them."""
    if cfg.provider == "ec2" and cfg.ec2_target_groups:
        from controller_asg.providers.elb import TargetGroups

        return TargetGroups(cfg)
    return NoTraffic()
