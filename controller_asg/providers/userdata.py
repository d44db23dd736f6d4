"""The user data an EC2 instance boots with: how the baked agent learns where MonitorS is.

HELIX_MONITOR_ADDR carries every manager's MonitorS (comma-separated), so a standby's table is warm.
The AMI runs the agent as `helix-monitor-c.service` with `EnvironmentFile=/etc/helix/helix.env`.
cloud-init writes that file (root only) and restarts the unit, which may already have started
(and failed) before the file existed. With HELIX_ROSTER=required (the default) it holds no secret:
the agent proves its identity with the instance identity document.

PyYAML is a test dependency only, so the document is written by hand: every scalar is a JSON
string, which is also a valid YAML double-quoted scalar.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from shared.config import PORT_PLACEHOLDER, Config

ENV_PATH = "/etc/helix/helix.env"
CA_PATH = "/etc/helix/ca.crt"
AGENT_UNIT = "helix-monitor-c.service"
MAX_USER_DATA = 16 * 1024  # EC2's limit on user data, before base64


def _env_value(key: str, value: str) -> str:
    """One systemd EnvironmentFile line; the value double-quoted with `\\` and `"` escaped."""
    if any(ch in value for ch in "\n\r\0"):
        raise ValueError(f"{key}: expected a value without newlines or NUL for {ENV_PATH}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{key}="{escaped}"'


def render_env_file(cfg: Config, token: str, labels: Mapping[str, str], ca_pem: str = "") -> str:
    label_text = ",".join(f"{k}={v}" for k, v in labels.items())
    # Every manager's MonitorS (HELIX_MONITOR_ADDR may list several): the agent registers with each.
    lines = [_env_value("HELIX_MONITOR_ADDR", ",".join(cfg.monitor_addrs))]
    mode = cfg.effective_tls_mode
    if mode == "ca":
        # Public: the agent verifies MonitorS with it and enrols for its own certificate.
        lines += [_env_value("HELIX_TLS_MODE", "ca"), _env_value("HELIX_TLS_CA", CA_PATH)]
    elif mode == "off":
        lines.append(_env_value("HELIX_TLS_MODE", "off"))
    # `files`: the operator baked the certificate files into the image, with their own settings.
    if cfg.roster == "required":
        # No fleet secret in user data (any process on the instance, and anyone allowed
        # ec2:DescribeInstanceAttribute, can read it): the agent proves who it is with the instance
        # identity document and then accepts only the credential MonitorS hands it.
        lines.append(_env_value("HELIX_IDENTITY_DOCUMENT", "1"))
    elif token:
        lines.append(_env_value("HELIX_TOKEN", token))
    else:
        # The controller runs without a token (HELIX_INSECURE); the agent must be told so too.
        lines.append(_env_value("HELIX_INSECURE", "1"))
    lines.append(_env_value("HELIX_LABELS", label_text))
    if cfg.ec2_app_check:
        lines.append(_env_value("HELIX_APP_CHECK", cfg.ec2_app_check))
    # The app's request counter, read by the agent on the instance (monitor_c/appmetrics.py).
    if cfg.app_metrics_url:
        if PORT_PLACEHOLDER in cfg.app_metrics_url:  # only the local provider has per-instance ports
            raise ValueError(
                f"HELIX_APP_METRICS_URL={cfg.app_metrics_url}: expected a fixed URL for EC2 instances, "
                f"without {PORT_PLACEHOLDER}"
            )
        lines.append(_env_value("HELIX_APP_METRICS_URL", cfg.app_metrics_url))
        lines.append(_env_value("HELIX_APP_METRICS_NAME", cfg.app_metrics_name))
    # The manager's lifecycle hooks: the agent runs them on the instance (Prepare, Drain).
    for key, command in (("HELIX_LAUNCH_HOOK", cfg.launch_hook), ("HELIX_TERMINATE_HOOK", cfg.terminate_hook)):
        if command:
            lines.append(_env_value(key, command))
    lines.append(_env_value("HELIX_LOG_LEVEL", cfg.log_level))
    return "\n".join(lines) + "\n"


def render_user_data(cfg: Config, token: str, labels: Mapping[str, str], ca_pem: str = "") -> str:
    """A `#cloud-config` document writing /etc/helix/helix.env (0600 root), the manager CA's
    certificate when there is one, and restarting the agent."""
    if cfg.effective_tls_mode == "ca" and "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise ValueError("HELIX_TLS_MODE=ca: expected the manager CA's PEM certificate for the user data")
    content = render_env_file(cfg, token, labels, ca_pem)
    q = json.dumps
    files = [
        f"  - path: {q(ENV_PATH)}",
        f"    permissions: {q('0600')}",
        f"    owner: {q('root:root')}",
        f"    content: {q(content)}",
    ]
    if cfg.effective_tls_mode == "ca":
        files += [
            f"  - path: {q(CA_PATH)}",
            f"    permissions: {q('0644')}",
            f"    owner: {q('root:root')}",
            f"    content: {q(ca_pem)}",
        ]
    doc = "\n".join(
        [
            "#cloud-config",
            "write_files:",
            *files,
            "runcmd:",
            f"  - [{q('systemctl')}, {q('daemon-reload')}]",
            f"  - [{q('systemctl')}, {q('restart')}, {q(AGENT_UNIT)}]",
            "",
        ]
    )
    if len(doc.encode()) > MAX_USER_DATA:
        raise ValueError(f"user data: expected at most {MAX_USER_DATA} bytes, got {len(doc.encode())}")
    return doc
