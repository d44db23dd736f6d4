"""`python -m monitor_s`: exit 0 on SIGTERM/SIGINT, 2 on bad config (or a table it must not replace)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from shared.config import EXIT_BAD_CONFIG, load_or_exit
from shared.logs import setup_logging

_early_signals: list[int] = []


def _record(sig: int, frame: object) -> None:
    # SIGTERM during start-up (imports, the table, binding) must still stop cleanly, with exit 0,
    # once the loop runs: without this the default action killed MonitorS mid-start.
    _early_signals.append(sig)


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _record)
    cfg = load_or_exit(prog="monitor_s")
    log = setup_logging(cfg.log_level, "monitor_s")
    from shared import rpc_security

    auth = rpc_security.auth_from_config(cfg, log, prog="monitor_s")
    from shared import pki

    manager_ca = None
    if cfg.effective_tls_mode == "ca":
        try:
            manager_ca = pki.ManagerCA.load(cfg.effective_pki_dir)
        except pki.PKIError as exc:
            print(f"monitor_s: bad configuration: HELIX_TLS_MODE=ca: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    elif cfg.effective_tls_mode == "off" and cfg.provider == "ec2":
        log.warning("PLAINTEXT: HELIX_TLS_MODE=off with the ec2 provider: every poll crosses the VPC unencrypted")
    from monitor_s.server import serve
    from shared.table import LayoutMismatch, MetricsTable, NotPrivate

    try:
        table = MetricsTable.open_or_create(
            cfg.shm_name, cfg.shm_capacity, reset=cfg.shm_reset, pid=os.getpid(), directory=cfg.shm_dir
        )
    except LayoutMismatch as exc:
        print(f"monitor_s: bad configuration: HELIX_SHM_NAME={cfg.shm_name}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except NotPrivate as exc:  # a directory, segment or lock not ours alone: restarting cannot help
        print(f"monitor_s: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        return asyncio.run(serve(cfg, auth, table, log, manager_ca, _early_signals))
    finally:
        table.close()


if __name__ == "__main__":
    sys.exit(main())
