"""`python -m monitor_c`: the agent. Exit 0 on SIGTERM/SIGINT (after deregistering), 2 on bad config."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys

from shared.config import EXIT_BAD_CONFIG, Config, load_or_exit
from shared.logs import setup_logging

_early_signals: list[int] = []


def _record(sig: int, frame: object) -> None:
    # A stop request during start-up (imports, binding) is honoured once the loop runs; the agent
    # has not registered yet, so there is nothing to deregister.
    _early_signals.append(sig)


def check_identity_config(cfg: Config) -> list[str]:
    """Check what the agent will send at registration with MonitorS's own rules, so a bad id or
    label stops the agent here (exit 2) instead of being refused forever."""
    from monitor_s.validation import Refusal, check_register
    from protos import helix_pb2

    keys = {
        "instance_id": ("HELIX_INSTANCE_ID", cfg.instance_id),
        "address": ("HELIX_ADVERTISE_ADDR", cfg.advertise_addr),
        "vcpus": ("HELIX_VCPUS", cfg.vcpus),
        "labels": ("HELIX_LABELS", ",".join(f"{k}={v}" for k, v in cfg.labels.items())),
    }
    request = helix_pb2.RegisterRequest(
        instance_id=cfg.instance_id or "placeholder",
        address=cfg.advertise_addr or "127.0.0.1:1",
        vcpus=max(1, math.ceil(cfg.vcpus or os.cpu_count() or 1)),
        labels=cfg.labels,
    )
    try:
        check_register(request)
    except Refusal as refusal:
        field = refusal.message.split(":")[0].split("[")[0]
        key, value = keys.get(field, ("HELIX_LABELS", ""))
        return [f"{key}={value}: {refusal.message}"]
    return []


def main() -> int:
    cfg = load_or_exit(prog="monitor_c")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _record)
    errors = check_identity_config(cfg)
    if errors:
        for line in errors:
            print(f"monitor_c: bad configuration: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    log = setup_logging(cfg.log_level, "monitor_c")
    from shared import rpc_security

    auth = rpc_security.auth_from_config(
        cfg, log, prog="monitor_c", identity=bool(cfg.instance_secret) or cfg.identity_document
    )
    from monitor_c.agent import Agent

    key = None
    if cfg.effective_tls_mode == "ca":
        from shared import pki

        try:
            with open(cfg.tls_ca, "rb") as fh:
                key = pki.AgentKey(fh.read())
        except (OSError, pki.PKIError) as exc:
            reason = "not set" if not cfg.tls_ca else getattr(exc, "strerror", None) or "not a PEM certificate"
            print(
                f"monitor_c: bad configuration: HELIX_TLS_CA={cfg.tls_ca}: expected the manager CA's PEM certificate "
                f"with HELIX_TLS_MODE=ca ({reason})",
                file=sys.stderr,
            )
            return EXIT_BAD_CONFIG

    async def run() -> int:
        return await Agent(cfg, auth, log, early_signals=_early_signals, key=key).run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
