"""`python -m controller_asg [--dry-run]`: the ControllerASG process on the manager VM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from controller_asg.hostlock import HostLock, HostLockHeld
from controller_asg.traffic import Traffic, TrafficError
from shared.config import EXIT_BAD_CONFIG, Config, ConfigError, load_or_exit
from shared.logs import setup_logging
from shared.table import MetricsTable, NotPrivate, TableError, TableNotFound


def wait_for_table(name: str, directory: str, stop: threading.Event, log: logging.Logger) -> MetricsTable | None:
    """Attach to MonitorS's table, waiting (one log line, not one a second) while it is not there.
    NotPrivate (a directory, table or lock not ours alone) is not waited out: it is raised."""
    said = False
    while not stop.is_set():
        try:
            return MetricsTable.attach(name, directory=directory)
        except TableNotFound as exc:
            if not said:
                log.info("waiting for the metrics table: %s", exc)
                said = True
        stop.wait(1.0)
    return None


def wait_for_traffic(cfg: Config, stop: threading.Event, log: logging.Logger) -> Traffic | None:
    """The target groups, checked once (a group that cannot be used is a config error: exit 2);
    while their API fails, wait and retry rather than run without them (an instance must never be
    terminated while still registered). None if stopped meanwhile."""
    from controller_asg.providers import make_traffic

    while not stop.is_set():
        try:
            return make_traffic(cfg)
        except TrafficError as exc:
            log.error("cannot check the target groups (%s); retrying in 10s", exc)
        stop.wait(10.0)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller_asg", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="decide and log as usual, act on nothing")
    args = parser.parse_args(argv)
    cfg = load_or_exit(prog="controller_asg")
    if not cfg.resolved_token() and not cfg.insecure:
        print(
            "controller_asg: bad configuration: HELIX_TOKEN=: expected a token (or HELIX_TOKEN_FILE); "
            "set HELIX_INSECURE=1 to run without one",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG

    if cfg.effective_tls_mode == "ca":
        # Every instance this controller launches is told to trust the manager CA: without it
        # they could never enrol, so stop here rather than launch a fleet that cannot be polled.
        from shared import pki

        try:
            pki.read_ca_certificate(cfg.effective_pki_dir)
        except pki.PKIError as exc:
            print(f"controller_asg: bad configuration: HELIX_TLS_MODE=ca: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG

    # At most one acting controller per group on this host, before anything is touched.
    host_lock = None
    if not args.dry_run:
        host_lock = HostLock(cfg.state_dir, cfg.group_name)
        try:
            host_lock.acquire()
        except HostLockHeld as exc:
            print(f"controller_asg: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        except OSError as exc:
            print(f"controller_asg: cannot take the host lock {host_lock.path}: {exc.strerror}", file=sys.stderr)
            return EXIT_BAD_CONFIG

    log = setup_logging(cfg.log_level, "controller_asg")
    if not cfg.resolved_token():
        log.warning("INSECURE: no token; instances this controller launches accept RPCs from anyone")
    if cfg.effective_tls_mode == "off" and cfg.provider == "ec2":
        log.warning("PLAINTEXT: HELIX_TLS_MODE=off: instances will be polled unencrypted across the VPC")

    # Imported after the configuration is known good: the ec2 provider pulls in boto3.
    from controller_asg.controller import Controller
    from controller_asg.external import make_external
    from controller_asg.policy import make_policy
    from controller_asg.providers import make_provider

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping after this step", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        table = wait_for_table(cfg.shm_name, cfg.shm_dir, stop, log)
    except NotPrivate as exc:
        print(f"controller_asg: {exc}", file=sys.stderr)
        if host_lock is not None:
            host_lock.release()
        return EXIT_BAD_CONFIG
    if table is None:
        return 0
    provider = make_provider(cfg)
    try:
        try:
            traffic = wait_for_traffic(cfg, stop, log)
        except ConfigError as exc:  # a target group that cannot be used
            print(f"controller_asg: bad configuration: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        if traffic is None:
            return 0
        policy = make_policy(cfg)
        try:
            external = make_external(cfg)
        except ConfigError as exc:  # an sqs: metric with no region to call
            print(f"controller_asg: bad configuration: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        controller = Controller(
            cfg,
            table,
            provider,
            policy,
            dry_run=args.dry_run,
            fence=host_lock,
            traffic=traffic,
            external=external,
        )
        log.info(
            "starting: provider %s, policy %s, min %d, max %d, every %gs%s",
            provider.name,
            cfg.policy,
            cfg.min_instances,
            cfg.max_instances,
            cfg.effective_control_interval,
            " (DRY RUN: acting on nothing)" if args.dry_run else "",
        )
        try:
            controller.start()
        except TableError as exc:  # a state file that is not ours alone (NotPrivate)
            print(f"controller_asg: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        controller.run(stop)
    finally:
        provider.close()
        table.close()
        if host_lock is not None:
            host_lock.release()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
