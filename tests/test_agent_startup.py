"""The agent starts once per instance: its import path stays free of the heavy modules."""

from __future__ import annotations

import subprocess
import sys

from tests.procs import base_env

HEAVY = ("numpy", "boto3", "botocore", "matplotlib", "rich", "shared.table", "prometheus_client")


def test_agent_import_path_is_light():
    code = f"import sys, monitor_c.__main__, monitor_c.agent; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=base_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "", f"the agent imports {out.stdout.strip()}"
