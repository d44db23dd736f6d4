"""`python -m controller_asg [--dry-run]`: the ControllerASG process on the manager VM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from controller_asg.hostlock import HostLock, HostLockHeld
from controller_asg.traffic import Traffic, TrafficError
from shared import sdnotify
from shared.config import EXIT_BAD_CONFIG, Config, ConfigError, load_or_exit
from shared.logs import setup_logging
from shared.table import MetricsTable, NotPrivate, TableError, TableNotFound

if TYPE_CHECKING:  # imported for real only once the configuration is known good (boto3)
    from controller_asg.lease import LeaseFence
    from controller_asg.statestore import StateStore


def wait_for_table(
    name: str, directory: str, stop: threading.Event, log: logging.Logger, tick: Callable[[], None] | None = None
) -> MetricsTable | None:
    """Attach to MonitorS's table, waiting (one log line, not one a second) while it is not there.
    NotPrivate (a directory, table or lock not ours alone) is not waited out: it is raised.
    `tick` every second while waiting (the systemd watchdog: this loop is alive)."""
    said = False
    while not stop.is_set():
        try:
            return MetricsTable.attach(name, directory=directory)
        except TableNotFound as exc:
            if not said:
                log.info("waiting for the metrics table: %s", exc)
                sdnotify.status(f"waiting for MonitorS's metrics table: {exc}")
                said = True
        if tick is not None:
            tick()
        stop.wait(1.0)
    return None


def wait_for_traffic(
    cfg: Config, stop: threading.Event, log: logging.Logger, tick: Callable[[], None] | None = None
) -> Traffic | None:
    """The target groups, checked once (a group that cannot be used is a config error: exit 2);
    while their API fails, wait and retry rather than run without them (an instance must never be
    terminated while still registered). None if stopped meanwhile. `tick`: as wait_for_table's."""
    from controller_asg.providers import make_traffic

    while not stop.is_set():
        try:
            return make_traffic(cfg)
        except TrafficError as exc:
            log.error("cannot check the target groups (%s); retrying in 10s", exc)
            sdnotify.status(f"waiting for the target groups' API: {exc}")
        if tick is not None:
            tick()
        stop.wait(10.0)
    return None


def state_store(cfg: Config, fence: LeaseFence | None) -> StateStore:
    """The files, or with HELIX_LEASE the lease's table; a dry run (no fence) reads the leader's
    state there and writes nothing."""
    from controller_asg.statestore import DynamoDbStore, make_store

    if cfg.lease and fence is None:
        from controller_asg.lease import dynamodb_client

        return DynamoDbStore(dynamodb_client(cfg), cfg.lease_table, cfg.group_name, lambda: 0)
    return make_store(cfg, fence)


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

    # At most one acting controller per group on this host, before anything is touched. With a
    # leader lease (HELIX_LEASE) the lease is the fence instead, across hosts (taken further down).
    host_lock = None
    if not args.dry_run and not cfg.lease:
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
    lease_fence = None
    if cfg.lease and not args.dry_run:
        from controller_asg.lease import LeaseError, make_fence, make_lease

        lease = make_lease(cfg)
        assert lease is not None
        lease_fence = make_fence(cfg, lease)
        try:
            lease_fence.start()  # a standby until it holds the lease; only a missing table stops here
        except LeaseError as exc:
            print(f"controller_asg: bad configuration: HELIX_LEASE={cfg.lease}: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    if not cfg.resolved_token():
        log.warning("INSECURE: no token; instances this controller launches accept RPCs from anyone")
    if cfg.effective_tls_mode == "off" and cfg.provider == "ec2":
        log.warning("PLAINTEXT: HELIX_TLS_MODE=off: instances will be polled unencrypted across the VPC")

    # Imported after the configuration is known good: the ec2 provider pulls in boto3.
    from controller_asg.controller import Controller
    from controller_asg.ctlserver import CtlServer, CtlServerError
    from controller_asg.events import activity_listener, make_sink
    from controller_asg.external import make_external
    from controller_asg.policy import make_policy
    from controller_asg.prom import ControllerMetrics, wrap_provider
    from controller_asg.providers import make_provider

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping after this step", signal.Signals(signum).name)
        sdnotify.stopping("stopping after this step")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # systemd (Type=notify): READY=1 once started (instances adopted); the waits before that and
    # every step after ping the watchdog, so a hung cloud call or lock gets the process restarted.
    watchdog = sdnotify.Watchdog.from_env()
    watchdog.cover(cfg.effective_control_interval, "a control step (HELIX_CONTROL_INTERVAL)")
    watchdog.ping()
    try:
        table = wait_for_table(cfg.shm_name, cfg.shm_dir, stop, log, tick=watchdog.ping)
    except NotPrivate as exc:
        print(f"controller_asg: {exc}", file=sys.stderr)
        if host_lock is not None:
            host_lock.release()
        if lease_fence is not None:
            lease_fence.stop(release=True)
        return EXIT_BAD_CONFIG
    if table is None:
        if lease_fence is not None:
            lease_fence.stop(release=True)
        return 0
    # Events (HELIX_WEBHOOK_URL) and metrics (HELIX_CONTROLLER_METRICS_LISTEN): neither may stop
    # the controller: a webhook that fails queues (bounded), a port in use logs one line.
    sink = make_sink(cfg)
    metrics = ControllerMetrics(sink=sink)
    endpoint = metrics.serve(cfg, log)
    ctl: CtlServer | None = None
    provider = wrap_provider(make_provider(cfg), metrics)
    try:
        try:
            traffic = wait_for_traffic(cfg, stop, log, tick=watchdog.ping)
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
            fence=lease_fence or host_lock,
            store=state_store(cfg, lease_fence),
            traffic=traffic,
            external=external,
            policy_factory=lambda lo, hi: make_policy(cfg.replace(min_instances=lo, max_instances=hi)),
        )
        controller.metrics = metrics
        controller.activity.add_listener(metrics.on_activity)
        if sink is not None:
            controller.activity.add_listener(activity_listener(sink))
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
        ctl = CtlServer(cfg.effective_ctl_socket, controller.handle_ctl, log=log)
        try:
            ctl.start()
        except CtlServerError as exc:  # the fleet is still governed; only helix-ctl cannot reach it
            log.error("helix-ctl cannot reach this controller: %s", exc)
            ctl = None
        sdnotify.ready(f"controlling: provider {provider.name}, policy {cfg.policy}")
        controller.run(stop, tick=watchdog.ping)
    finally:
        if ctl is not None:
            ctl.close()
        if endpoint is not None:
            endpoint.close()
        if sink is not None:
            sink.close(cfg.webhook_timeout)
        if lease_fence is not None:
            lease_fence.stop(release=True)  # a clean stop hands the lease over at once
        provider.close()
        table.close()
        if host_lock is not None:
            host_lock.release()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
