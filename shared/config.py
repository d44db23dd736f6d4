"""The one configuration loader for every Helix process.

Every setting is declared once, below, as a field of `Config`: its environment key, the seed
project's aliases, its default, its parser (which says what is expected) and its documentation.
The README's configuration table is checked against this declaration by a test, so the two cannot
drift.

Where values come from, strongest first:
  1. the process environment,
  2. the `.env` file at `HELIX_ENV_FILE` (default `./.env`, optional when not named explicitly),
  3. the declared default.
Within one source a `HELIX_…` key wins over its seed alias.

Bad configuration never half-applies: `load_config` collects every problem, each as
`KEY=value: expected …`, and raises `ConfigError`; `load_or_exit` prints them and exits 2 before
the caller has touched a segment, a socket or a cloud API. A secret never appears in a problem:
not the value of a secret setting, not that of an unknown `HELIX_` key (it may be a misspelt
secret), not a `.env` line that does not parse. Files holding a secret (token, private keys,
basic-auth password) must be readable by their owner only.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import ipaddress
import math
import os
import re
import shlex
import ssl
import stat
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dotenv import dotenv_values
from dotenv.parser import parse_stream

ENV_FILE_KEY = "HELIX_ENV_FILE"
DEFAULT_ENV_FILE = ".env"
EXIT_BAD_CONFIG = 2


class ConfigError(Exception):
    """One or more settings are invalid; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


class Invalid(ValueError):
    """Raised by a parser; the message completes 'expected …'."""


# ---------------------------------------------------------------------------------------------
# Parsers. Each takes the raw string and returns the typed value or raises Invalid("…") where the
# message says what was expected.

Parser = Callable[[str], Any]


def text(max_len: int = 4096, allow_empty: bool = True) -> Parser:
    def parse(raw: str) -> str:
        if not raw and not allow_empty:
            raise Invalid("a non-empty value")
        if len(raw) > max_len:
            raise Invalid(f"at most {max_len} characters")
        return raw

    return parse


def integer(lo: int, hi: int) -> Parser:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise Invalid(f"an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise Invalid(f"an integer from {lo} to {hi}")
        return value

    return parse


def number(lo: float, hi: float, *, lo_open: bool = False, unit: str = "") -> Parser:
    unit_text = f" {unit}" if unit else ""
    bound = f"greater than {lo:g}" if lo_open else f"from {lo:g}"
    expected = f"a number {bound} to {hi:g}{unit_text}"

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise Invalid(expected) from None
        if math.isnan(value) or value > hi or value < lo or (lo_open and value == lo):
            raise Invalid(expected)
        return value

    return parse


def flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise Invalid("one of 1, 0, true, false, yes, no, on, off")


def choice(*options: str) -> Parser:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise Invalid("one of " + ", ".join(options))
        return value

    return parse


def host_port(optional: bool = False) -> Parser:
    def parse(raw: str) -> str:
        value = raw.strip()
        if not value and optional:
            return ""
        parse_host_port(value)
        return value

    return parse


def host_port_list(max_items: int = 5) -> Parser:
    """1 to `max_items` comma-separated host:port addresses, no duplicates; returned as written,
    each item stripped (so one address reads exactly as before)."""
    expected = (
        f"1 to {max_items} comma-separated host:port addresses with ports from 1 to 65535 "
        "(IPv6 as [addr]:port), none twice"
    )

    def parse(raw: str) -> str:
        items = [part.strip() for part in raw.split(",")]
        if len(items) > max_items:
            raise Invalid(f"{expected}; got {len(items)}")
        seen: set[tuple[str, int]] = set()
        for n, item in enumerate(items, 1):
            try:
                host, port = parse_host_port(item)
            except Invalid:
                raise Invalid(f"{expected}; item {n} ({item!r}) is not host:port") from None
            if (host.lower(), port) in seen:
                raise Invalid(f"{expected}; item {n} ({item!r}) is listed twice")
            seen.add((host.lower(), port))
        return ",".join(items)

    return parse


def listen_or_off(raw: str) -> str:
    """A listen address, or '' for off (written as empty, `0` or `off`)."""
    value = raw.strip()
    if value.lower() in ("", "0", "off"):
        return ""
    try:
        parse_host_port(value)
    except Invalid:
        raise Invalid("host:port with a port from 1 to 65535 (IPv6 as [addr]:port), or empty, 0 or off") from None
    return value


def optional_integer(lo: int, hi: int) -> Parser:
    """An integer from lo to hi, or None when empty (the setting is not given)."""

    def parse(raw: str) -> int | None:
        if not raw.strip():
            return None
        try:
            return integer(lo, hi)(raw)
        except Invalid:
            raise Invalid(f"an integer from {lo} to {hi}, or empty") from None

    return parse


def csv_list(item: Parser | None = None, *, max_items: int = 256) -> Parser:
    def parse(raw: str) -> tuple[str, ...]:
        items = tuple(part.strip() for part in raw.split(",") if part.strip())
        if len(items) > max_items:
            raise Invalid(f"at most {max_items} comma-separated items")
        if item is not None:
            for one in items:
                item(one)
        return items

    return parse


_TARGET_GROUP_ARN = re.compile(
    r"^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:\d{12}:targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}$"
)


def target_group_arn(raw: str) -> str:
    if not _TARGET_GROUP_ARN.fullmatch(raw):
        raise Invalid("target group ARNs (arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)")
    return raw


# --- HELIX_EXTERNAL_METRIC (controller_asg/external.py reads it) ---------------------------------

# An SQS queue URL's path, on AWS and on stand-ins (moto's server, LocalStack): /ACCOUNT/NAME.
_SQS_PATH = re.compile(r"/(\d{12})/([A-Za-z0-9_-]{1,80}(?:\.fifo)?)")
# AWS's own queue hosts; the region is where the queue lives (and where its client must call).
_SQS_AWS_HOST = re.compile(r"sqs\.([a-z]{2}(?:-[a-z]+)+-\d{1,2})\.amazonaws\.com(?:\.cn)?")


@dataclass(frozen=True)
class SqsQueue:
    """A queue URL taken apart: `region` is '' when the host is not AWS's (an endpoint override)."""

    url: str
    region: str
    account: str
    name: str


def sqs_queue(url: str) -> SqsQueue | None:
    """The queue an http(s) URL names (/ACCOUNT/NAME, no query), or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return None
    found = _SQS_PATH.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment or not found:
        return None
    aws = _SQS_AWS_HOST.fullmatch(parts.netloc) if parts.scheme == "https" else None
    return SqsQueue(url, aws.group(1) if aws else "", found.group(1), found.group(2))


def http_url(raw: str) -> str:
    """Empty, or an http(s) URL with a host and no user:password@ (it would show in every log line)."""
    value = raw.strip()
    expected = "empty or an http(s)://host… URL without user:password@"
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        raise Invalid(expected) from None
    if value and (parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc):
        raise Invalid(expected)
    return value


_DYNAMODB_TABLE = re.compile(r"[A-Za-z0-9_.-]{3,255}")


def lease_spec(raw: str) -> str:
    """HELIX_LEASE: empty, or `dynamodb:<table name>`."""
    value = raw.strip()
    kind, _, table = value.partition(":")
    if value and not (kind == "dynamodb" and _DYNAMODB_TABLE.fullmatch(table)):
        raise Invalid("empty or dynamodb:<table> (a table name of 3 to 255 letters, digits, _ . -)")
    return value


def schedule_spec(raw: str) -> tuple:
    """HELIX_SCHEDULE, parsed by shared/schedule.py (scheduled actions, each a cron expression)."""
    from shared.schedule import ScheduleError, parse_schedule

    try:
        return parse_schedule(raw)
    except ScheduleError as exc:
        raise Invalid(str(exc)) from None


def external_metric_spec(raw: str) -> str:
    value = raw.strip()
    kind, _, rest = value.partition(":")
    if not value or (kind in ("http", "https") and http_url(value)):
        return value
    if kind == "sqs" and sqs_queue(rest):
        return value
    if kind == "file" and os.path.isabs(rest) and "\x00" not in rest:
        return value
    if kind == "command":
        try:
            if shlex.split(rest):
                return value
        except ValueError:
            pass
    raise Invalid(
        "empty, sqs:<queue URL such as https://sqs.REGION.amazonaws.com/ACCOUNT/NAME>, command:<shell words>, "
        "http(s)://… or file:<absolute path>"
    )


_LABEL_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*=\s*"(?:[^"\\\n]|\\.)*"\s*'
METRIC_SELECTOR = re.compile(
    rf"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{{(?P<labels>{_LABEL_MATCHER}(?:,{_LABEL_MATCHER})*,?)?\}})?"
)


def metric_selector(raw: str) -> str:
    value = raw.strip()
    if value and not METRIC_SELECTOR.fullmatch(value):
        raise Invalid('empty, or a Prometheus series: name or name{label="value",…}')
    return value


_SHM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def shm_segment_name(raw: str) -> str:
    if not _SHM_NAME.fullmatch(raw):
        raise Invalid("a segment name of letters, digits, '.', '_' or '-' (no '/'), 1 to 201 characters")
    return raw


def shm_directory(raw: str) -> str:
    """Empty, or an absolute directory path. Whether it is this user's alone (mode 0700) is checked
    where the table is opened: the directory may not exist yet here (systemd makes it at start),
    and agents, which load this too, never use it."""
    if not raw or (raw.startswith("/") and len(raw) <= 1024 and "\x00" not in raw):
        return raw
    raise Invalid(
        "empty (a POSIX segment in /dev/shm) or an absolute path, at most 1024 characters, to a directory "
        "only this user may enter (mode 0700), e.g. /run/helix"
    )


def cpu_source_spec(raw: str) -> str:
    value = raw.strip()
    if value == "host":
        return value
    if value.startswith("tree:") and value[5:].isdigit() and int(value[5:]) > 0:
        return value
    if value.startswith("cgroup:") and value[7:].startswith("/"):
        return value
    raise Invalid("'host', 'tree:<pid>' or 'cgroup:<absolute path>'")


def app_check_spec(raw: str) -> str:
    value = raw.strip()
    if not value:
        return ""
    if value.startswith(("http://", "https://")) and value.partition("://")[2]:
        return value
    if value.startswith("tcp://"):
        parse_host_port(value[6:])
        return value
    if value.startswith("process:") and value[8:]:
        return value
    raise Invalid("empty, 'http(s)://…', 'tcp://host:port' or 'process:NAME'")


PORT_PLACEHOLDER = "{port}"  # a local instance's app port, filled in per instance by the local provider


def app_metrics_url_spec(raw: str) -> str:
    value = raw.strip()
    if not value:
        return ""
    expected = (
        "empty or an http(s)://host[:port]/path URL, at most 1024 characters (`{port}`: a local instance's app port)"
    )
    # Checked with the placeholder as a port number: the manager's value names the local instances'
    # endpoint before their ports are known (an agent still holding it refuses to start).
    probe = value.replace(PORT_PLACEHOLDER, "1")
    if len(value) > 1024 or not probe.isprintable() or any(ch.isspace() for ch in probe):
        raise Invalid(expected)
    from urllib.parse import urlsplit  # light, and only for this setting

    url = urlsplit(probe)
    try:
        port_ok = url.port is None or url.port > 0
    except ValueError:  # not a number, or beyond 65535
        port_ok = False
    if url.scheme not in ("http", "https") or not url.hostname or not port_ok:
        raise Invalid(expected)
    return value


def metric_name_spec(raw: str) -> str:
    value = raw.strip()
    if len(value) > 200 or not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", value):
        raise Invalid("a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most 200 characters)")
    return value


def label_pairs(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise Invalid("comma-separated key=value pairs")
        out[key.strip()] = value.strip()
    return out


def parse_host_port(value: str) -> tuple[str, int]:
    """Split 'host:port' or '[v6]:port'; raise Invalid naming what was expected."""
    expected = "host:port with a port from 1 to 65535 (IPv6 as [addr]:port)"
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise Invalid(expected)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(expected) from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or ":" in host:
            raise Invalid(expected)
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            raise Invalid(expected)
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise Invalid(expected)
    return host, int(port_text)


# ---------------------------------------------------------------------------------------------
# The declaration.


def setting(
    key: str,
    default: str,
    doc: str,
    parse: Parser,
    *,
    aliases: tuple[str, ...] = (),
    secret: bool = False,
    group: str = "general",
) -> Any:
    meta = {
        "key": key,
        "raw_default": default,
        "doc": doc,
        "parse": parse,
        "aliases": aliases,
        "secret": secret,
        "group": group,
    }
    value = parse(default)
    if isinstance(value, dict):
        return field(default_factory=lambda: dict(value), metadata=meta)
    return field(default=value, metadata=meta)


@dataclass(frozen=True)
class Config:
    # --- general -------------------------------------------------------------------------------
    log_level: str = setting(
        "HELIX_LOG_LEVEL", "info", "Log level of every process.", choice("debug", "info", "warning", "error")
    )
    shm_name: str = setting(
        "HELIX_SHM_NAME",
        "helix-metrics",
        "Name of the shared-memory metrics table (`/dev/shm/<name>`, or `<HELIX_SHM_DIR>/<name>`; lock file "
        "`<name>.lock` beside it).",
        shm_segment_name,
        group="table",
    )
    shm_dir: str = setting(
        "HELIX_SHM_DIR",
        "",
        "Directory holding the metrics table as a memory-mapped file and its lock (use a tmpfs, e.g. /run/helix: "
        "the manager units set their RuntimeDirectory); it must be the service user's with mode 0700, else "
        "MonitorS and ControllerASG refuse it. Empty: a POSIX shared-memory segment in /dev/shm.",
        shm_directory,
        group="table",
    )
    shm_capacity: int = setting(
        "HELIX_SHM_CAPACITY",
        "1024",
        "Rows in the metrics table: the most instances one manager tracks.",
        integer(1, 1_000_000),
        group="table",
    )
    shm_reset: bool = setting(
        "HELIX_SHM_RESET",
        "0",
        "MonitorS: replace an existing table whose layout does not match (loses the registry; agents re-register).",
        flag,
        group="table",
    )
    token: str = setting(
        "HELIX_TOKEN",
        "",
        "Shared bearer token every RPC carries (or use HELIX_TOKEN_FILE).",
        text(1024),
        secret=True,
        group="security",
    )
    token_file: str = setting(
        "HELIX_TOKEN_FILE",
        "",
        "File holding the bearer token (first line); only its owner may read it (mode 600 or 400).",
        text(),
        group="security",
    )
    insecure: bool = setting(
        "HELIX_INSECURE",
        "0",
        "Allow running with no token (loudly logged). Never in production.",
        flag,
        group="security",
    )
    tls_cert: str = setting(
        "HELIX_TLS_CERT", "", "PEM certificate this process serves with (enables TLS).", text(), group="security"
    )
    tls_key: str = setting(
        "HELIX_TLS_KEY",
        "",
        "PEM private key for HELIX_TLS_CERT; only its owner may read it (mode 600 or 400).",
        text(),
        group="security",
    )
    tls_ca: str = setting(
        "HELIX_TLS_CA",
        "",
        "PEM CA bundle: clients verify servers with it; servers require client certificates signed by it (mTLS).",
        text(),
        group="security",
    )
    tls_mode: str = setting(
        "HELIX_TLS_MODE",
        "auto",
        "How MonitorS and the agents encrypt: `ca` (the manager CA of `python -m shared.pki init` issues each "
        "agent a certificate at registration; mutual TLS), `files` (HELIX_TLS_CERT/KEY/CA), `off` (plaintext). "
        "`auto`: `files` when HELIX_TLS_CERT or HELIX_TLS_CA is set, else `ca` with the ec2 provider and `off` with local (loopback).",
        choice("auto", "ca", "files", "off"),
        group="security",
    )
    pki_dir: str = setting(
        "HELIX_PKI_DIR",
        "",
        "Directory of the manager CA (`python -m shared.pki init` creates it, mode 700); empty: HELIX_STATE_DIR/pki.",
        text(),
        group="security",
    )

    # --- MonitorC (the agent on each instance) --------------------------------------------------
    agent_listen: str = setting(
        "HELIX_AGENT_LISTEN", "0.0.0.0:50051", "Address the agent's gRPC server listens on.", host_port(), group="agent"
    )
    monitor_addr: str = setting(
        "HELIX_MONITOR_ADDR",
        "127.0.0.1:50052",
        "MonitorS address(es) the agent registers with: one host:port, or up to 5 comma-separated (one per "
        "manager; the agent registers with each and every MonitorS polls it).",
        host_port_list(),
        group="agent",
    )
    cpu_source: str = setting(
        "HELIX_CPU_SOURCE",
        "host",
        "What CPU the agent reports: `host` (whole machine), `tree:<pid>` or `cgroup:<path>` (divided by HELIX_VCPUS).",
        cpu_source_spec,
        group="agent",
    )
    vcpus: float = setting(
        "HELIX_VCPUS",
        "0",
        "vCPUs the agent divides CPU time by (a fraction is a CPU allotment, e.g. 0.25); 0: count the machine's.",
        number(0, 4096),
        group="agent",
    )
    app_check: str = setting(
        "HELIX_APP_CHECK",
        "",
        "App liveness probe: `http(s)://…` (2xx), `tcp://host:port`, `process:NAME`, or empty (live when the agent is).",
        app_check_spec,
        group="agent",
    )
    app_check_timeout: float = setting(
        "HELIX_APP_CHECK_TIMEOUT",
        "1.0",
        "Seconds the liveness probe may take.",
        number(0.01, 60, unit="seconds"),
        group="agent",
    )
    app_metrics_url: str = setting(
        "HELIX_APP_METRICS_URL",
        "",
        "The app's own Prometheus text endpoint, e.g. `http://127.0.0.1:8080/metrics`: the agent reads "
        "HELIX_APP_METRICS_NAME there each time it is polled (at most every 0.5 s) and reports its rate "
        "as requests/s (`rps`); empty: off. On the manager: passed to new instances' agents (`local`: "
        "`{port}` becomes each instance's app port).",
        app_metrics_url_spec,
        group="agent",
    )
    app_metrics_name: str = setting(
        "HELIX_APP_METRICS_NAME",
        "http_requests_total",
        "The counter HELIX_APP_METRICS_URL serves, summed over all its label sets (`name` and `name_total` "
        "both match; a gauge or untyped metric is refused).",
        metric_name_spec,
        group="agent",
    )
    launch_hook: str = setting(
        "HELIX_LAUNCH_HOOK",
        "",
        "Command (shell words) the agent runs on its instance before it takes traffic (Prepare): exit 0 "
        "continues, anything else abandons the launch; empty: none. The manager passes its own to new instances.",
        text(),
        group="hooks",
    )
    terminate_hook: str = setting(
        "HELIX_TERMINATE_HOOK",
        "",
        "Command (shell words) the agent runs on its instance before it is terminated (Drain), e.g. wait "
        "for requests in flight; empty: none. The manager passes its own to new instances.",
        text(),
        group="hooks",
    )
    launch_hook_timeout: float = setting(
        "HELIX_LAUNCH_HOOK_TIMEOUT",
        "300",
        "Seconds the launch hook may run; then it is stopped and the launch counts as failed.",
        number(1, 7200, unit="seconds"),
        group="hooks",
    )
    drain_timeout: float = setting(
        "HELIX_DRAIN_TIMEOUT",
        "300",
        "Seconds from deciding to terminate an instance in service to terminating it at the latest: it "
        "leaves its target groups and runs its terminate hook meanwhile; 0: terminate at once, no drain.",
        number(0, 7200, unit="seconds"),
        group="hooks",
    )
    instance_id: str = setting(
        "HELIX_INSTANCE_ID",
        "",
        "Instance id; empty: ask EC2 instance metadata, else use the hostname.",
        text(64),
        group="agent",
    )
    advertise_addr: str = setting(
        "HELIX_ADVERTISE_ADDR",
        "",
        "host:port MonitorS should poll; empty: the instance's private IPv4 and listen port.",
        host_port(optional=True),
        group="agent",
    )
    labels: dict = setting(
        "HELIX_LABELS",
        "",
        "Labels sent at registration, `key=value,…` (e.g. `zone=us-east-1a`).",
        label_pairs,
        group="agent",
    )
    imds_url: str = setting(
        "HELIX_IMDS_URL", "http://169.254.169.254", "EC2 instance-metadata endpoint (IMDSv2).", text(256), group="agent"
    )
    identity_document: bool = setting(
        "HELIX_IDENTITY_DOCUMENT",
        "0",
        "Prove the agent's identity at registration with the EC2 instance identity document and its signature "
        "from IMDS (the `ec2` provider's user data sets it; no fleet token is then needed).",
        flag,
        group="agent",
    )
    instance_secret: str = setting(
        "HELIX_INSTANCE_SECRET",
        "",
        "Per-instance secret the agent proves its identity with at registration (the `local` provider sets it).",
        text(256),
        secret=True,
        group="agent",
    )

    # --- MonitorS -------------------------------------------------------------------------------
    monitor_listen: str = setting(
        "HELIX_MONITOR_LISTEN",
        "0.0.0.0:50052",
        "Address MonitorS's Registry service listens on.",
        host_port(),
        group="monitor",
    )
    poll_interval: float = setting(
        "HELIX_POLL_INTERVAL",
        "1.0",
        "Seconds between two polls of every agent.",
        number(0.05, 3600, unit="seconds"),
        group="monitor",
    )
    unhealthy_after: int = setting(
        "HELIX_UNHEALTHY_AFTER",
        "3",
        "Consecutive failed polls before an instance is marked unhealthy.",
        integer(1, 1000),
        group="monitor",
    )
    forget_after: float = setting(
        "HELIX_FORGET_AFTER",
        "600",
        "Seconds an agent may stay silent before MonitorS frees its row (a live agent registers again by itself).",
        number(10, 30 * 86400, unit="seconds"),
        group="monitor",
    )
    metrics_listen: str = setting(
        "HELIX_METRICS_LISTEN",
        "127.0.0.1:9464",
        "Address MonitorS serves Prometheus metrics on (`/metrics`; what they expose: the README's Prometheus "
        "section); `0.0.0.0:9464` opens them to the network; empty, `0` or `off` turns them off.",
        listen_or_off,
        group="monitor",
    )
    metrics_port: int | None = setting(
        "HELIX_METRICS_PORT",
        "",
        "Deprecated, use HELIX_METRICS_LISTEN (not both): `0` turns the metrics off, a port N means "
        "`127.0.0.1:N` (loopback only; it used to be every interface).",
        optional_integer(0, 65535),
        group="monitor",
    )
    metrics_tls_cert: str = setting(
        "HELIX_METRICS_TLS_CERT",
        "",
        "PEM certificate (chain) the metrics endpoint serves HTTPS with; set with HELIX_METRICS_TLS_KEY.",
        text(),
        group="monitor",
    )
    metrics_tls_key: str = setting(
        "HELIX_METRICS_TLS_KEY",
        "",
        "PEM private key for HELIX_METRICS_TLS_CERT; only its owner may read it (mode 600 or 400).",
        text(),
        group="monitor",
    )
    metrics_basic_auth_file: str = setting(
        "HELIX_METRICS_BASIC_AUTH_FILE",
        "",
        "File whose first line is `user:password` (password at least 8 characters): the metrics endpoint then "
        "answers only requests with that HTTP basic auth (401 otherwise). Only its owner may read it.",
        text(),
        group="monitor",
    )
    poll_mode: str = setting(
        "HELIX_POLL_MODE",
        "poll",
        "How MonitorS collects: `poll` (GetMetrics each interval) or `stream` (agents push over one WatchMetrics stream each).",
        choice("poll", "stream"),
        group="monitor",
    )
    trust_advertised: bool = setting(
        "HELIX_TRUST_ADVERTISED",
        "0",
        "Accept an advertised host that is not the caller's own IP (behind NAT or a proxy); the host must still be "
        "the instance's address on the roster.",
        flag,
        group="monitor",
    )
    roster: str = setting(
        "HELIX_ROSTER",
        "required",
        "`required`: register only instances on the controller's roster (owned by this group), from their address "
        "there; `off`: any caller with the token (a MonitorS without a controller, for monitoring only).",
        choice("required", "off"),
        group="monitor",
    )
    identity_cert: str = setting(
        "HELIX_IDENTITY_CERT",
        "",
        "PEM certificate of AWS's RSA key for the region's instance identity documents: with it, an instance "
        "with no per-instance secret registers only with a document it signs for that id and address.",
        text(),
        group="monitor",
    )
    register_rate: float = setting(
        "HELIX_REGISTER_RATE",
        "20",
        "Registrations per second each source address may make (bursts up to 5 s worth); more are refused with "
        "RESOURCE_EXHAUSTED. 0: no limit.",
        number(0, 1_000_000),
        group="monitor",
    )

    # --- ControllerASG --------------------------------------------------------------------------
    control_interval: float = setting(
        "HELIX_CONTROL_INTERVAL",
        "0",
        "Seconds between two controller decisions; 0 means the poll interval.",
        number(0, 3600, unit="seconds"),
        group="controller",
    )
    min_instances: int = setting(
        "HELIX_MIN_INSTANCES",
        "1",
        "Fewest instances the fleet may have.",
        integer(0, 100_000),
        aliases=("MIN_INSTANCES",),
        group="controller",
    )
    max_instances: int = setting(
        "HELIX_MAX_INSTANCES",
        "10",
        "Most instances the fleet may have.",
        integer(1, 100_000),
        aliases=("MAX_INSTANCES",),
        group="controller",
    )
    policy: str = setting(
        "HELIX_POLICY",
        "predictive",
        "Scaling policy: `predictive` (target tracking that plans a launch time ahead from recent days, keeps standing capacity instead of launching for overloads that recently were mostly over within a boot time, and lets what it launched for a burst go when the burst ends once held capacity stops coming back), `target` (target tracking) or `threshold` (the seed's).",
        choice("predictive", "target", "threshold"),
        group="controller",
    )
    launch_lead: float = setting(
        "HELIX_LAUNCH_LEAD",
        "0",
        "`predictive` policy: seconds it plans ahead, about the launch-to-in-service time; 0: the median "
        "the controller measures on its own last 20 launches (90 until it has measured one).",
        number(0, 3600, unit="seconds"),
        group="controller",
    )
    cpu_target: float = setting(
        "HELIX_CPU_TARGET",
        "0.5",
        "Target mean CPU utilisation (0..1) of the scaling policy.",
        number(0, 1, lo_open=True),
        group="controller",
    )
    rps_target: float = setting(
        "HELIX_RPS_TARGET",
        "0",
        "Also scale on requests per second per instance (the agents' HELIX_APP_METRICS_URL), to this many; "
        "0: off. The largest recommendation of all metrics wins.",
        number(0, 1e9),
        group="controller",
    )
    warm_pool_size: int = setting(
        "HELIX_WARM_POOL_SIZE",
        "0",
        "Instances kept launched, prepared (launch hook run) and stopped, so a scale-out starts them in "
        "seconds instead of booting new ones; they cost only their disks meanwhile. 0: no warm pool.",
        integer(0, 1000),
        group="controller",
    )
    warm_pool_max_prepared: int = setting(
        "HELIX_WARM_POOL_MAX_PREPARED",
        "0",
        "Cap on every instance, running or stopped in the warm pool (as ASG's MaxGroupPreparedCapacity); "
        "0: HELIX_MAX_INSTANCES + HELIX_WARM_POOL_SIZE. Running instances stay within HELIX_MAX_INSTANCES.",
        integer(0, 100000),
        group="controller",
    )
    mem_target: float = setting(
        "HELIX_MEM_TARGET",
        "0",
        "Also scale on mean memory in use (0..1) per instance, to this; 0: off.",
        number(0, 1),
        group="controller",
    )
    tolerance: float = setting(
        "HELIX_TOLERANCE", "0.1", "No change while mean/target is within 1 ± this.", number(0, 1), group="controller"
    )
    scale_in_window: float = setting(
        "HELIX_SCALE_IN_WINDOW",
        "300",
        "Scale in only to the highest recommendation of this many seconds (`predictive` holds at most this"
        " long: less at short boot times, and one boot time while what it holds is not needed again).",
        number(0, 86400, unit="seconds"),
        group="controller",
    )
    warmup: float = setting(
        "HELIX_WARMUP",
        "60",
        "Seconds after registering during which an instance's CPU is left out of the mean.",
        number(0, 86400, unit="seconds"),
        group="controller",
    )
    cpu_upper: float = setting(
        "HELIX_CPU_UPPER",
        "0.7",
        "`threshold` policy: scale out above this mean CPU (0..1).",
        number(0, 1),
        aliases=("CPU_UPPER_LIMIT",),
        group="controller",
    )
    cpu_lower: float = setting(
        "HELIX_CPU_LOWER",
        "0.3",
        "`threshold` policy: scale in below this mean CPU (0..1).",
        number(0, 1),
        aliases=("CPU_LOWER_LIMIT",),
        group="controller",
    )
    step: int = setting(
        "HELIX_STEP",
        "1",
        "`threshold` policy: instances added or removed per action.",
        integer(1, 1000),
        group="controller",
    )
    cooldown: float = setting(
        "HELIX_COOLDOWN",
        "60",
        "`threshold` policy: seconds to wait after an action.",
        number(0, 86400, unit="seconds"),
        group="controller",
    )
    health_grace: float = setting(
        "HELIX_HEALTH_GRACE",
        "-1",
        "Seconds a new instance has to register before it is replaced; -1: 300 on ec2, 30 on local.",
        number(-1, 86400, unit="seconds"),
        group="controller",
    )
    app_down_after: int = setting(
        "HELIX_APP_DOWN_AFTER",
        "3",
        "Consecutive app-down polls before an instance is replaced.",
        integer(1, 1000),
        group="controller",
    )
    max_unhealthy_fraction: float = setting(
        "HELIX_MAX_UNHEALTHY_FRACTION",
        "0.45",
        "Above this fraction unhealthy at once, assume a monitoring fault: replace one per interval.",
        number(0, 1),
        group="controller",
    )
    termination_policy: str = setting(
        "HELIX_TERMINATION_POLICY",
        "least-busy",
        "Whom to terminate on scale-in: `least-busy`, `oldest`, `newest`.",
        choice("least-busy", "oldest", "newest"),
        group="controller",
    )
    breaker_failures: int = setting(
        "HELIX_BREAKER_FAILURES",
        "3",
        "Consecutive launches that never become healthy before the churn breaker trips (no more scale-out or "
        "replacement launches; one probe launch at a time, with back-off).",
        integer(1, 1000),
        group="controller",
    )
    breaker_window: float = setting(
        "HELIX_BREAKER_WINDOW",
        "1800",
        "Seconds within which a failed launch must follow the previous one for both to count as consecutive.",
        number(1, 7 * 86400, unit="seconds"),
        group="controller",
    )
    activity_log: str = setting(
        "HELIX_ACTIVITY_LOG",
        "",
        "File that gets one JSON line per scaling action; empty: none.",
        text(),
        group="controller",
    )
    history_file: str = setting(
        "HELIX_HISTORY_FILE",
        "",
        "File where the policy keeps the load history it learns from; empty: `<HELIX_STATE_DIR>/history.json`.",
        text(),
        group="controller",
    )

    # --- the external metric (controller_asg/external.py) ---------------------------------------
    external_metric: str = setting(
        "HELIX_EXTERNAL_METRIC",
        "",
        "A number from outside the fleet the controller also sizes it by (e.g. a queue's backlog): "
        "`sqs:<queue URL>` (its visible messages), `command:<shell words>` (the first line it prints), "
        "`http(s)://…` (the body's first line, or the series HELIX_EXTERNAL_METRIC_NAME picks) or "
        "`file:<absolute path>` (its first line); empty: none.",
        external_metric_spec,
        group="external_metric",
    )
    external_target: float = setting(
        "HELIX_EXTERNAL_TARGET",
        "0",
        "The external metric's value per instance the fleet is sized to (e.g. 100 messages per instance); "
        "required (above 0) with HELIX_EXTERNAL_METRIC.",
        number(0, 1e12),
        group="external_metric",
    )
    external_timeout: float = setting(
        "HELIX_EXTERNAL_TIMEOUT",
        "5",
        "Seconds one read of the external metric may take; a command still running then is killed with "
        "its process group.",
        number(0.1, 300, unit="seconds"),
        group="external_metric",
    )
    external_metric_name: str = setting(
        "HELIX_EXTERNAL_METRIC_NAME",
        "",
        "With an http(s), command or file metric: the output is Prometheus text and this series, "
        '`name` or `name{label="value",…}`, is the value (exactly one must match); empty: a plain number.',
        metric_selector,
        group="external_metric",
    )
    sqs_endpoint_url: str = setting(
        "HELIX_SQS_ENDPOINT_URL",
        "",
        "A non-AWS SQS endpoint for an `sqs:` metric (tests use moto's server); then any http(s) queue URL "
        "is accepted. Credentials are the `ec2` provider's (HELIX_AWS_…).",
        http_url,
        group="external_metric",
    )

    # --- operating the fleet: ctl, refresh, schedules, lifetime, events (issue 13) ---------------
    ctl_socket: str = setting(
        "HELIX_CTL_SOCKET",
        "",
        "Unix socket the controller listens on for `helix-ctl` (only its own user and root may talk to it: "
        "the peer's uid is checked); empty: `<HELIX_STATE_DIR>/controller/ctl.sock`.",
        text(100),
        group="operations",
    )
    controller_metrics_listen: str = setting(
        "HELIX_CONTROLLER_METRICS_LISTEN",
        "127.0.0.1:9465",
        "Address the controller serves its Prometheus metrics on (`/metrics`); empty, `0` or `off` turns them "
        "off. HELIX_METRICS_TLS_CERT/KEY and HELIX_METRICS_BASIC_AUTH_FILE apply here too.",
        listen_or_off,
        group="operations",
    )
    webhook_url: str = setting(
        "HELIX_WEBHOOK_URL",
        "",
        "One JSON POST per activity (launch, terminate, replace, freeze, breaker, refresh, override, …) to "
        "this URL, retried with back-off from a bounded queue; empty: none.",
        http_url,
        group="operations",
    )
    webhook_secret: str = setting(
        "HELIX_WEBHOOK_SECRET",
        "",
        "With HELIX_WEBHOOK_URL: each POST carries `X-Helix-Signature: sha256=<HMAC-SHA256 of the body>` "
        "under this key; empty: unsigned.",
        text(1024),
        secret=True,
        group="operations",
    )
    webhook_queue: int = setting(
        "HELIX_WEBHOOK_QUEUE",
        "1000",
        "Events waiting for the webhook at most; past it the oldest are dropped (and counted).",
        integer(1, 1_000_000),
        group="operations",
    )
    webhook_timeout: float = setting(
        "HELIX_WEBHOOK_TIMEOUT",
        "5",
        "Seconds one webhook POST may take.",
        number(0.1, 120, unit="seconds"),
        group="operations",
    )
    schedule: tuple = setting(
        "HELIX_SCHEDULE",
        "",
        "Scheduled actions, `;`-separated, each `NAME cron='MIN HOUR DOM MON DOW' [tz=Area/City] [for=DURATION] "
        "[min=N] [max=N] [desired=N]`: from each time the cron expression fires, for DURATION (default: "
        "until the next scheduled action fires), the fleet's min/max/desired are these (see the README).",
        lambda raw: schedule_spec(raw),
        group="operations",
    )
    max_instance_lifetime: float = setting(
        "HELIX_MAX_INSTANCE_LIFETIME",
        "0",
        "Seconds an instance may live; older ones are replaced gradually (min-healthy and drain respected). "
        "0: no limit; else at least 60.",
        number(0, 3650 * 86400, unit="seconds"),
        group="operations",
    )
    min_healthy_percentage: float = setting(
        "HELIX_MIN_HEALTHY_PERCENTAGE",
        "90",
        "An instance refresh or lifetime replacement keeps at least this percentage of the desired count in "
        "service (the refresh's default for --min-healthy).",
        number(0, 100, unit="percent"),
        group="operations",
    )
    max_healthy_percentage: float = setting(
        "HELIX_MAX_HEALTHY_PERCENTAGE",
        "100",
        "A refresh may launch replacements first, up to this percentage of the desired count (never above "
        "the fleet's max); 100: terminate first (the refresh's default for --max-healthy).",
        number(100, 200, unit="percent"),
        group="operations",
    )
    refresh_warmup: float = setting(
        "HELIX_REFRESH_WARMUP",
        "-1",
        "Seconds a refresh batch's new instances must have been in service before the next batch; -1: HELIX_WARMUP.",
        number(-1, 86400, unit="seconds"),
        group="operations",
    )

    # --- no single manager: the leader lease (issue 14) -------------------------------------------
    lease: str = setting(
        "HELIX_LEASE",
        "",
        "`dynamodb:<table>`: managers compete for a per-group leader lease in that DynamoDB table; only "
        "the holder's controller acts, the others are warm standbys, and the controller's state lives in "
        "the table. Empty: a single manager (the host lock).",
        lambda raw: lease_spec(raw),
        group="ha",
    )
    lease_ttl: float = setting(
        "HELIX_LEASE_TTL",
        "10",
        "Seconds a lease lasts unless renewed (renewed every quarter of it); a standby takes over at most "
        "this long after the leader stops renewing.",
        number(3, 600, unit="seconds"),
        group="ha",
    )
    lease_clock_margin: float = setting(
        "HELIX_LEASE_CLOCK_MARGIN",
        "2",
        "Seconds before its lease ends (by its own clock) that a holder stops acting: the clock drift "
        "between managers it tolerates. Below HELIX_LEASE_TTL / 2.",
        number(0, 300, unit="seconds"),
        group="ha",
    )
    manager_id: str = setting(
        "HELIX_MANAGER_ID",
        "",
        "This manager's name in the lease (and in the logs); empty: the host name.",
        text(128),
        group="ha",
    )
    lease_create_table: bool = setting(
        "HELIX_LEASE_CREATE_TABLE",
        "0",
        "Create the lease table (on demand billing) when it does not exist; else a missing table is an error.",
        flag,
        group="ha",
    )
    dynamodb_endpoint_url: str = setting(
        "HELIX_DYNAMODB_ENDPOINT_URL",
        "",
        "A non-AWS DynamoDB endpoint for the lease (tests use moto's server); boto3's own "
        "AWS_ENDPOINT_URL_DYNAMODB works too. Credentials are the `ec2` provider's (HELIX_AWS_…).",
        http_url,
        group="ha",
    )

    # --- providers ------------------------------------------------------------------------------
    provider: str = setting(
        "HELIX_PROVIDER",
        "local",
        "Where instances run: `local` (processes here) or `ec2`.",
        choice("local", "ec2"),
        group="provider",
    )
    group_name: str = setting(
        "HELIX_GROUP",
        "helix",
        "Fleet name; the `helix:group` tag on everything Helix owns.",
        text(128, allow_empty=False),
        group="provider",
    )
    state_dir: str = setting(
        "HELIX_STATE_DIR",
        ".helix-state",
        "Directory for the controller's state (local instances, history).",
        text(),
        group="provider",
    )
    local_app_cmd: str = setting(
        "HELIX_LOCAL_APP_CMD",
        "",
        "`local`: the app each instance runs (shell words; `{port}` becomes its port); empty: agent only.",
        text(),
        group="provider",
    )
    local_zones: tuple = setting(
        "HELIX_LOCAL_ZONES",
        "local-a,local-b",
        "`local`: zone names instances are spread over.",
        csv_list(text(32, allow_empty=False)),
        group="provider",
    )
    local_host: str = setting(
        "HELIX_LOCAL_HOST",
        "127.0.0.1",
        "`local`: loopback address instances listen on.",
        text(64, allow_empty=False),
        group="provider",
    )
    local_vcpus: float = setting(
        "HELIX_LOCAL_VCPUS",
        "1",
        "`local`: vCPUs each instance is allotted, fractions allowed (its CPU is divided by this).",
        number(0, 4096, lo_open=True),
        group="provider",
    )
    ec2_launch_template: str = setting(
        "HELIX_EC2_LAUNCH_TEMPLATE",
        "",
        "`ec2`: launch template id or name (else AMI + type + subnets).",
        text(256),
        group="ec2",
    )
    ec2_launch_template_version: str = setting(
        "HELIX_EC2_LAUNCH_TEMPLATE_VERSION",
        "$Default",
        "`ec2`: the launch template's version: a number, `$Default` or `$Latest`. Pin a number so an "
        "instance refresh can tell which instances run an older version (it cannot see through "
        "`$Default`/`$Latest`: refresh with --no-skip-matching then).",
        text(32, allow_empty=False),
        group="ec2",
    )
    ec2_ami: str = setting("HELIX_EC2_AMI", "", "`ec2`: AMI id of the app image.", text(64), group="ec2")
    ec2_instance_type: str = setting(
        "HELIX_EC2_INSTANCE_TYPE", "t3.micro", "`ec2`: instance type.", text(64, allow_empty=False), group="ec2"
    )
    ec2_subnets: tuple = setting(
        "HELIX_EC2_SUBNETS",
        "",
        "`ec2`: comma-separated subnet ids, one per zone, launches spread over them.",
        csv_list(),
        group="ec2",
    )
    ec2_security_groups: tuple = setting(
        "HELIX_EC2_SECURITY_GROUPS", "", "`ec2`: comma-separated security group ids.", csv_list(), group="ec2"
    )
    ec2_key_name: str = setting("HELIX_EC2_KEY_NAME", "", "`ec2`: optional SSH key pair name.", text(256), group="ec2")
    ec2_instance_profile: str = setting(
        "HELIX_EC2_INSTANCE_PROFILE", "", "`ec2`: optional IAM instance profile name or ARN.", text(2048), group="ec2"
    )
    ec2_role_arn: str = setting(
        "HELIX_EC2_ROLE_ARN",
        "",
        "`ec2`: ARN of the IAM role in HELIX_EC2_INSTANCE_PROFILE, the one role the policy `python -m controller_asg.iam` prints lets Helix pass (required there when a profile is set).",
        text(2048),
        group="ec2",
    )
    ec2_manager_instance_id: str = setting(
        "HELIX_EC2_MANAGER_INSTANCE_ID",
        "",
        "`ec2`: the manager's own instance id, never counted or terminated; empty: asked once from instance metadata (HELIX_IMDS_URL; no answer: not on EC2).",
        text(64),
        group="ec2",
    )
    ec2_target_groups: tuple = setting(
        "HELIX_EC2_TARGET_GROUPS",
        "",
        "`ec2`: comma-separated target group ARNs; an instance joins them once in service and leaves "
        "them (drained) before it is terminated.",
        csv_list(target_group_arn, max_items=16),
        group="ec2",
    )
    health_sources: tuple = setting(
        "HELIX_HEALTH_SOURCES",
        "agent",
        "What may call an instance unhealthy: `agent` (MonitorS's polls), and `elb` (the target groups' "
        "health checks, after the health grace).",
        csv_list(choice("agent", "elb"), max_items=2),
        group="ec2",
    )
    ec2_app_check: str = setting(
        "HELIX_EC2_APP_CHECK",
        "",
        "`ec2`: the app liveness probe agents on new instances run (their HELIX_APP_CHECK), e.g. `http://127.0.0.1:8080/health`.",
        app_check_spec,
        group="ec2",
    )
    ec2_endpoint_url: str = setting(
        "HELIX_EC2_ENDPOINT_URL",
        "",
        "`ec2`: a non-AWS EC2 endpoint (tests use moto's server).",
        text(2048),
        group="ec2",
    )
    aws_region: str = setting(
        "HELIX_AWS_REGION", "", "`ec2`: AWS region.", text(64), aliases=("AWS_REGION", "REGION"), group="ec2"
    )
    aws_access_key: str = setting(
        "HELIX_AWS_ACCESS_KEY",
        "",
        "`ec2`: access key id; empty: boto3's default chain (instance profile).",
        text(256),
        aliases=("AWS_ACCESS_KEY",),
        secret=True,
        group="ec2",
    )
    aws_secret_key: str = setting(
        "HELIX_AWS_SECRET_KEY",
        "",
        "`ec2`: secret access key.",
        text(256),
        aliases=("AWS_SECRET_KEY",),
        secret=True,
        group="ec2",
    )
    aws_session_token: str = setting(
        "HELIX_AWS_SESSION_TOKEN",
        "",
        "`ec2`: session token for temporary credentials.",
        text(4096),
        aliases=("AWS_SESSION_TOKEN",),
        secret=True,
        group="ec2",
    )

    # --- derived values -------------------------------------------------------------------------
    @property
    def effective_control_interval(self) -> float:
        return self.control_interval or self.poll_interval

    @property
    def effective_health_grace(self) -> float:
        if self.health_grace >= 0:
            return self.health_grace
        return 300.0 if self.provider == "ec2" else 30.0

    @property
    def effective_tls_mode(self) -> str:
        """`ca`, `files` or `off`: what HELIX_TLS_MODE=auto means here (see its help)."""
        if self.tls_mode != "auto":
            return self.tls_mode
        if self.tls_cert or self.tls_ca:
            return "files"
        return "ca" if self.provider == "ec2" else "off"

    @property
    def effective_max_prepared(self) -> int:
        """Every instance, stopped warm-pool ones included, stays within this."""
        return self.warm_pool_max_prepared or self.max_instances + self.warm_pool_size

    @property
    def effective_ctl_socket(self) -> str:
        return self.ctl_socket or os.path.join(self.state_dir, "controller", "ctl.sock")

    @property
    def effective_refresh_warmup(self) -> float:
        return self.warmup if self.refresh_warmup < 0 else self.refresh_warmup

    @property
    def effective_manager_id(self) -> str:
        import socket

        return self.manager_id or socket.gethostname()

    @property
    def lease_table(self) -> str:
        """The DynamoDB table of HELIX_LEASE ('' without a lease)."""
        return self.lease.partition(":")[2] if self.lease else ""

    @property
    def monitor_addrs(self) -> tuple[str, ...]:
        """HELIX_MONITOR_ADDR as its addresses (one per MonitorS), in the order given."""
        return tuple(part.strip() for part in self.monitor_addr.split(",") if part.strip())

    @property
    def effective_pki_dir(self) -> str:
        return self.pki_dir or os.path.join(self.state_dir, "pki")

    def resolved_token(self) -> str:
        """The bearer token, from HELIX_TOKEN or the first line of HELIX_TOKEN_FILE ('' if none)."""
        if self.token:
            return self.token
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as fh:
                return fh.readline().strip()
        return ""

    @property
    def effective_metrics_listen(self) -> str:
        """Where MonitorS serves Prometheus metrics ('' for off): the deprecated HELIX_METRICS_PORT,
        when given, still means what it says, but on loopback only."""
        if self.metrics_port is not None:
            return f"127.0.0.1:{self.metrics_port}" if self.metrics_port else ""
        return self.metrics_listen

    def metrics_basic_auth(self) -> tuple[str, str] | None:
        """(user, password) from HELIX_METRICS_BASIC_AUTH_FILE, None when unset; OSError, or Invalid
        for a malformed file."""
        if not self.metrics_basic_auth_file:
            return None
        with open(self.metrics_basic_auth_file, encoding="utf-8") as fh:
            return parse_basic_auth(fh.readline())

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SettingInfo:
    name: str
    key: str
    raw_default: str
    doc: str
    aliases: tuple[str, ...]
    secret: bool
    group: str
    parse: Parser


def settings() -> list[SettingInfo]:
    """Every declared setting, in declaration order (what the README table documents)."""
    return [
        SettingInfo(
            f.name,
            f.metadata["key"],
            f.metadata["raw_default"],
            f.metadata["doc"],
            f.metadata["aliases"],
            f.metadata["secret"],
            f.metadata["group"],
            f.metadata["parse"],
        )
        for f in dataclasses.fields(Config)
    ]


BASIC_AUTH_MIN_PASSWORD = 8


def parse_basic_auth(line: str) -> tuple[str, str]:
    """`user:password` (one line, surrounding whitespace ignored) -> (user, password); Invalid
    otherwise. The message never repeats the line: it holds a password."""
    user, sep, password = line.strip().partition(":")
    printable = all(ch.isprintable() for ch in user + password)
    if not sep or not user or len(password) < BASIC_AUTH_MIN_PASSWORD or not printable:
        raise Invalid(
            f"a file whose first line is user:password, the password at least {BASIC_AUTH_MIN_PASSWORD} "
            "printable characters"
        )
    return user, password


def private_file_problem(path: str) -> str | None:
    """What is wrong with `path` as a file holding a secret (None when nothing): it must be a
    regular file that neither its group nor others may read or write, so a secret never sits in a
    file another account can read (or swap for its own)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"a readable file ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "a regular file"
    if st.st_mode & 0o077:
        return f"a file only its owner can read (mode {stat.S_IMODE(st.st_mode):04o}; chmod 600 it)"
    return None


# Keys read by tools around the processes rather than by `Config` itself; known, so not typos.
OTHER_KEYS = {ENV_FILE_KEY}


def _show(info: SettingInfo, raw: str) -> str:
    return f"<hidden, {len(raw)} characters>" if info.secret else raw


def _no_passphrase() -> bytes:
    # Given to load_cert_chain so an encrypted key fails to load instead of prompting on a terminal.
    return b""


def _cross_checks(cfg: Config, given: frozenset[str] = frozenset()) -> list[tuple[set[str], str]]:
    """Contradictions between settings (and the files they name), each with the fields it
    involves; `given` names the settings a source set (rather than left to their default)."""
    found: list[tuple[set[str], str]] = []

    def bad(names: set[str], message: str) -> None:
        found.append((names, message))

    if cfg.min_instances > cfg.max_instances:
        bad(
            {"min_instances", "max_instances"},
            f"HELIX_MIN_INSTANCES={cfg.min_instances}: expected at most HELIX_MAX_INSTANCES={cfg.max_instances}",
        )
    if 0 < cfg.max_instance_lifetime < 60:
        bad(
            {"max_instance_lifetime"},
            f"HELIX_MAX_INSTANCE_LIFETIME={cfg.max_instance_lifetime:g}: expected 0 (no limit) or at least 60 seconds",
        )
    if cfg.min_healthy_percentage >= 100 and cfg.max_healthy_percentage <= 100:
        bad(
            {"min_healthy_percentage", "max_healthy_percentage"},
            f"HELIX_MIN_HEALTHY_PERCENTAGE={cfg.min_healthy_percentage:g}: expected below 100 unless "
            "HELIX_MAX_HEALTHY_PERCENTAGE is above 100 (a refresh could never take an instance out)",
        )
    if cfg.lease and cfg.lease_clock_margin * 2 >= cfg.lease_ttl:
        bad(
            {"lease_clock_margin", "lease_ttl"},
            f"HELIX_LEASE_CLOCK_MARGIN={cfg.lease_clock_margin:g}: expected below HELIX_LEASE_TTL / 2 "
            f"({cfg.lease_ttl / 2:g})",
        )
    if cfg.cpu_lower >= cfg.cpu_upper:
        bad(
            {"cpu_lower", "cpu_upper"},
            f"HELIX_CPU_LOWER={cfg.cpu_lower:g}: expected less than HELIX_CPU_UPPER={cfg.cpu_upper:g}",
        )
    if cfg.token and cfg.token_file:
        bad(
            {"token", "token_file"},
            f"HELIX_TOKEN_FILE={cfg.token_file}: expected only one of HELIX_TOKEN and HELIX_TOKEN_FILE to be set",
        )
    elif cfg.token_file:
        problem = private_file_problem(cfg.token_file)
        if problem:
            bad({"token_file"}, f"HELIX_TOKEN_FILE={cfg.token_file}: expected {problem}")
        else:
            try:
                with open(cfg.token_file, encoding="utf-8") as fh:
                    if not fh.readline().strip():
                        bad(
                            {"token_file"},
                            f"HELIX_TOKEN_FILE={cfg.token_file}: expected a file whose first line is the token",
                        )
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                bad({"token_file"}, f"HELIX_TOKEN_FILE={cfg.token_file}: expected a readable file ({reason})")
    for prefix, cert_name, key_name in (
        ("HELIX_", "tls_cert", "tls_key"),
        ("HELIX_METRICS_", "metrics_tls_cert", "metrics_tls_key"),
    ):
        cert, key = getattr(cfg, cert_name), getattr(cfg, key_name)
        if bool(cert) != bool(key):
            shown = f"{prefix}TLS_KEY={key}" if cert else f"{prefix}TLS_CERT={cert}"
            bad({cert_name, key_name}, f"{shown}: expected {prefix}TLS_CERT and {prefix}TLS_KEY to be set together")
    if cfg.tls_mode == "files" and not (cfg.tls_cert or cfg.tls_ca):
        bad({"tls_mode"}, "HELIX_TLS_MODE=files: expected HELIX_TLS_CERT and HELIX_TLS_KEY (or HELIX_TLS_CA) to be set")
    elif cfg.tls_mode in ("ca", "off") and cfg.tls_cert:
        bad(
            {"tls_mode", "tls_cert"},
            f"HELIX_TLS_MODE={cfg.tls_mode}: expected HELIX_TLS_CERT unset (it is used only with HELIX_TLS_MODE=files)",
        )
    if cfg.pki_dir and not os.path.isabs(cfg.pki_dir):
        bad({"pki_dir"}, f"HELIX_PKI_DIR={cfg.pki_dir}: expected an absolute path")
    for name, key, path in (
        ("tls_cert", "HELIX_TLS_CERT", cfg.tls_cert),
        ("tls_key", "HELIX_TLS_KEY", cfg.tls_key),
        ("tls_ca", "HELIX_TLS_CA", cfg.tls_ca),
        ("metrics_tls_cert", "HELIX_METRICS_TLS_CERT", cfg.metrics_tls_cert),
        ("metrics_tls_key", "HELIX_METRICS_TLS_KEY", cfg.metrics_tls_key),
        ("identity_cert", "HELIX_IDENTITY_CERT", cfg.identity_cert),
    ):
        if path and not os.path.isfile(path):
            bad({name}, f"{key}={path}: expected a readable PEM file")
        elif path and name.endswith("_key") and (problem := private_file_problem(path)):
            bad({name}, f"{key}={path}: expected {problem}")
    metrics_tls = {"metrics_tls_cert", "metrics_tls_key"}
    if cfg.metrics_tls_cert and cfg.metrics_tls_key and not any(names & metrics_tls for names, _ in found):
        # Load them now, so a wrong pair stops the process before it has touched anything.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                cfg.metrics_tls_cert, cfg.metrics_tls_key, password=_no_passphrase
            )
        except OSError as exc:  # ssl.SSLError is one
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            bad(
                {"metrics_tls_cert", "metrics_tls_key"},
                f"HELIX_METRICS_TLS_CERT={cfg.metrics_tls_cert}: expected a PEM certificate whose key is the "
                f"unencrypted PEM key in HELIX_METRICS_TLS_KEY ({reason})",
            )
    if cfg.metrics_basic_auth_file:
        path = cfg.metrics_basic_auth_file
        problem = private_file_problem(path)
        if not problem:
            try:
                cfg.metrics_basic_auth()
            except Invalid as exc:
                problem = str(exc)
            except (OSError, UnicodeDecodeError) as exc:
                problem = f"a readable file ({exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'})"
        if problem:
            bad({"metrics_basic_auth_file"}, f"HELIX_METRICS_BASIC_AUTH_FILE={path}: expected {problem}")
    if cfg.metrics_port is not None and "metrics_listen" in given:
        bad(
            {"metrics_port", "metrics_listen"},
            f"HELIX_METRICS_PORT={cfg.metrics_port}: expected only one of HELIX_METRICS_LISTEN and the deprecated "
            "HELIX_METRICS_PORT to be set",
        )
    if cfg.provider == "ec2" and not cfg.ec2_launch_template and not (cfg.ec2_ami and cfg.ec2_subnets):
        bad(
            {"provider", "ec2_launch_template", "ec2_ami", "ec2_subnets"},
            "HELIX_PROVIDER=ec2: expected HELIX_EC2_LAUNCH_TEMPLATE, or HELIX_EC2_AMI with HELIX_EC2_SUBNETS",
        )
    found += _external_metric_checks(cfg)
    return found


def _external_metric_checks(cfg: Config) -> list[tuple[set[str], str]]:
    """HELIX_EXTERNAL_METRIC with what it needs, and the settings that mean something only with it."""
    spec, selector = cfg.external_metric, cfg.external_metric_name
    kind, _, rest = spec.partition(":")
    found: list[tuple[set[str], str]] = []
    if not spec:
        if selector:
            found.append(
                (
                    {"external_metric_name"},
                    f"HELIX_EXTERNAL_METRIC_NAME={selector}: expected HELIX_EXTERNAL_METRIC set too",
                )
            )
        return found
    if cfg.external_target <= 0:
        found.append(
            (
                {"external_metric", "external_target"},
                f"HELIX_EXTERNAL_TARGET={cfg.external_target:g}: expected a number greater than 0 (the metric's "
                "value per instance) with HELIX_EXTERNAL_METRIC set",
            )
        )
    if kind == "sqs":
        queue = sqs_queue(rest)
        if queue and not queue.region and not cfg.sqs_endpoint_url:
            found.append(
                (
                    {"external_metric", "sqs_endpoint_url"},
                    f"HELIX_EXTERNAL_METRIC={spec}: expected an AWS queue URL, https://sqs.REGION.amazonaws.com/"
                    "ACCOUNT/NAME (another host only with HELIX_SQS_ENDPOINT_URL)",
                )
            )
        if selector:
            found.append(
                (
                    {"external_metric", "external_metric_name"},
                    f"HELIX_EXTERNAL_METRIC_NAME={selector}: expected it empty with an sqs: metric (it picks a "
                    "series from Prometheus text)",
                )
            )
    return found


def _first_line(original: str, line: int) -> int:
    # dotenv numbers a statement from the blank lines it skipped before it; count past them.
    leading = original[: len(original) - len(original.lstrip())]
    return line + leading.count("\n") + leading.replace("\r\n", "\n").count("\r")


def read_env_file(path: str) -> tuple[dict[str, str], list[str]]:
    """The .env file's values and its problems, one line each. python-dotenv silently skips a
    line it cannot parse (and keeps `KEY` with no '=' as a key without a value): here either is a
    config error naming the line, never showing it, since the line may hold a secret."""
    try:
        with open(path, encoding="utf-8") as fh:
            content = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        return {}, [f"{ENV_FILE_KEY}={path}: expected a readable .env file ({reason})"]
    errors = [
        f"{ENV_FILE_KEY}={path}: line {_first_line(b.original.string, b.original.line)}: expected KEY=VALUE, "
        "export KEY=VALUE, a # comment or a blank line (the line is not shown: it may hold a secret)"
        for b in parse_stream(io.StringIO(content))
        if b.error or (b.key is not None and b.value is None)
    ]
    if errors:
        return {}, errors
    # Parsed again by dotenv_values itself for its ${VAR} interpolation; the text is the same.
    return {k: v or "" for k, v in dotenv_values(stream=io.StringIO(content)).items()}, []


def load_config(environ: Mapping[str, str] | None = None, env_file: str | None = None) -> Config:
    """Build the Config from the environment and the .env file; raise ConfigError listing every problem."""
    environ = dict(os.environ if environ is None else environ)
    errors: list[str] = []

    explicit = env_file is not None or ENV_FILE_KEY in environ
    path = env_file if env_file is not None else environ.get(ENV_FILE_KEY, DEFAULT_ENV_FILE)
    file_values: dict[str, str] = {}
    if path and os.path.exists(path):
        file_values, file_errors = read_env_file(path)
        errors += file_errors
    elif explicit and path:
        errors.append(f"{ENV_FILE_KEY}={path}: expected an existing .env file")

    infos = settings()
    known = {info.key for info in infos} | {a for info in infos for a in info.aliases} | OTHER_KEYS
    values: dict[str, Any] = {}
    invalid: set[str] = set()
    # The environment wins over the file; within a source the HELIX_ key wins over an alias.
    for info in infos:
        for source in (environ, file_values):
            found = next(((k, source[k]) for k in (info.key, *info.aliases) if k in source), None)
            if found is not None:
                key, raw = found
                try:
                    values[info.name] = info.parse(raw)
                except Invalid as exc:
                    errors.append(f"{key}={_show(info, raw)}: expected {exc}")
                    invalid.add(info.name)
                break

    for source in (environ, file_values):
        for key in sorted(k for k in source if k.startswith("HELIX_") and k not in known):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            # Never the value: a misspelt secret key (HELIX_TOKN=…) would print the secret.
            errors.append(f"{key}=<hidden, {len(source[key])} characters>: expected a known HELIX_ setting{hint}")

    # Contradictions are checked on the valid values (defaults standing in for invalid ones), and
    # only reported when every setting they involve parsed, so one run lists every problem.
    cfg = Config(**values)
    given = frozenset(values) | invalid
    errors += [message for names, message in _cross_checks(cfg, given) if not names & invalid]
    if errors:
        raise ConfigError(errors)
    return cfg


def load_or_exit(
    environ: Mapping[str, str] | None = None, env_file: str | None = None, *, prog: str = "helix"
) -> Config:
    """load_config, or print every bad key (one line each) and exit 2 before anything is touched."""
    try:
        return load_config(environ, env_file)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{prog}: bad configuration: {line}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def main() -> int:
    """`python -m shared.config`: validate the configuration and print the effective settings."""
    cfg = load_or_exit(prog="config")
    for info in settings():
        value = getattr(cfg, info.name)
        shown = ("<hidden>" if value else "") if info.secret else value
        print(f"{info.key}={'' if shown is None else shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
