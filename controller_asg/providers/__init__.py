"""Providers: where instances run. `make_provider(cfg)` picks one from HELIX_PROVIDER."""

from __future__ import annotations

from controller_asg.providers.base import LaunchError, Provider, ProviderInstance
from shared.config import Config

__all__ = ["LaunchError", "Provider", "ProviderInstance", "make_provider"]


def make_provider(cfg: Config) -> Provider:
    """The provider HELIX_PROVIDER names; boto3 is imported only for `ec2`."""
    if cfg.provider == "ec2":
        from controller_asg.providers.ec2 import Ec2Provider

        return Ec2Provider(cfg)
    from controller_asg.providers.local import LocalProvider

    return LocalProvider(cfg)
