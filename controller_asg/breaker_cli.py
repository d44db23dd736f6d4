"""`python -m controller_asg.breaker_cli status|reset`: look at or close the churn breaker.

`reset` leaves a request in the controller's state directory; the running controller (or the next
one to start) takes it on its next step and records who asked in the activity log. It works
whether or not the controller is running, and needs only write access to HELIX_STATE_DIR.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from controller_asg.controller import BREAKER_RESET_FILE
from shared.config import load_or_exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller_asg.breaker_cli", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("status", "reset"))
    parser.add_argument("--why", default="", help="a few words for the activity log")
    args = parser.parse_args(argv)
    cfg = load_or_exit(prog="breaker")
    folder = os.path.join(cfg.state_dir, "controller")
    if args.command == "reset":
        os.makedirs(folder, exist_ok=True)
        who = f"{getpass.getuser()} (pid {os.getpid()})" + (f": {args.why}" if args.why else "")
        tmp = os.path.join(folder, f".{BREAKER_RESET_FILE}.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(who[:200])
        os.replace(tmp, os.path.join(folder, BREAKER_RESET_FILE))
        print(f"breaker reset requested; the controller takes it on its next step ({folder})")
        return 0
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as fh:
            breaker = dict(json.load(fh).get("breaker", {}))
    except FileNotFoundError:
        print(f"breaker: no controller state in {folder}")
        return 1
    except (OSError, ValueError, AttributeError) as exc:
        print(f"breaker: unreadable controller state in {folder}: {exc}")
        return 1
    word = "TRIPPED" if breaker.get("tripped") else "closed"
    print(
        f"breaker: {word}, {int(breaker.get('consecutive', 0))} failed launch(es) in a row, "
        f"{len(breaker.get('watched', {}))} launch(es) being judged, {len(breaker.get('slots', []))} slot(s) backing off"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
