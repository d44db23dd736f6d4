"""The one boto3 session every AWS client of Helix is made from: the seed's HELIX_AWS_* keys when
set, else boto3's default chain (the manager's instance profile). boto3 is imported here, on first
use, so the local provider never loads it."""

from __future__ import annotations

from typing import Any

from shared.config import Config


def aws_session(cfg: Config, region: str | None = None) -> Any:
    """A boto3 session with Helix's credentials, in `region` (default HELIX_AWS_REGION)."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id=cfg.aws_access_key or None,
        aws_secret_access_key=cfg.aws_secret_key or None,
        aws_session_token=cfg.aws_session_token or None,
        region_name=(cfg.aws_region if region is None else region) or None,
    )
