"""Logging for every Helix process: one line per event, with a timestamp and the component."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, component: str) -> logging.Logger:
    """Configure the root logger once for this process and return the component's logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            fmt="%(asctime)s.%(msecs)03d %(levelname)s %(name)s[%(process)d] %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and botocore are chatty at INFO; their warnings still show.
    for noisy in ("botocore", "boto3", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return logging.getLogger(component)
