"""`python -m monitor_c`: the agent. Exit 0 on SIGTERM/SIGINT (after deregistering), 2 on bad config."""

from __future__ import annotations

import asyncio
import sys

from shared.config import load_or_exit
from shared.logs import setup_logging


def main() -> int:
    cfg = load_or_exit(prog="monitor_c")
    log = setup_logging(cfg.log_level, "monitor_c")
    from shared import rpc_security  # after the config check: grpc is the slow import

    auth = rpc_security.auth_from_config(cfg, log, prog="monitor_c")
    from monitor_c.agent import Agent

    async def run() -> int:
        return await Agent(cfg, auth, log).run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
