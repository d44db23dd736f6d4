"""Register/Deregister input checks: every field, with a message that names it. Pure functions."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote

import grpc

from protos import helix_pb2
from shared.config import Invalid, parse_host_port

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,15}$")
MAX_ADDRESS_BYTES = 64
MAX_LABELS = 16
MAX_LABEL_VALUE_BYTES = 64
MAX_ZONE_BYTES = 32
MAX_VCPUS = 4096
MAX_REASON_BYTES = 200
MAX_SECRET_BYTES = 256
MAX_DOCUMENT_BYTES = 4096  # an EC2 identity document is about 500 bytes
MAX_CSR_BYTES = 4096  # a P-256 request in PEM is about 400 bytes
MAX_SIGNATURE_BYTES = 1024


class Refusal(Exception):
    """A refused call: the gRPC status and a one-line message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(field: str, value: object, expected: str) -> Refusal:
    shown = repr(value)[:80]
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {shown}, expected {expected}")


@dataclass(frozen=True)
class Registration:
    instance_id: str
    address: str
    host: str
    port: int
    vcpus: int
    agent_version: str
    zone: str
    app_port: int
    labels: dict[str, str]


def check_instance_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise _bad(
            "instance_id", value, "1 to 64 of letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return value


def _printable(value: str) -> bool:
    return value.isprintable()


def check_register(req: helix_pb2.RegisterRequest) -> Registration:
    """Validate a RegisterRequest; raise Refusal(INVALID_ARGUMENT) naming the first bad field."""
    instance_id = check_instance_id(req.instance_id)
    address = req.address
    if len(address.encode()) > MAX_ADDRESS_BYTES or not address.isascii():
        raise _bad("address", address, f"ASCII host:port of at most {MAX_ADDRESS_BYTES} bytes")
    try:
        host, port = parse_host_port(address)
    except Invalid as exc:
        raise _bad("address", address, str(exc)) from None
    if not 1 <= req.vcpus <= MAX_VCPUS:
        raise _bad("vcpus", req.vcpus, f"an integer from 1 to {MAX_VCPUS}")
    if req.agent_version and not VERSION_RE.fullmatch(req.agent_version):
        raise _bad("agent_version", req.agent_version, "at most 16 of letters, digits, '.', '+', '_' or '-'")
    if len(req.labels) > MAX_LABELS:
        raise _bad("labels", f"{len(req.labels)} labels", f"at most {MAX_LABELS}")
    labels: dict[str, str] = {}
    for key in sorted(req.labels):
        value = req.labels[key]
        if not LABEL_KEY_RE.fullmatch(key):
            raise _bad("labels", key, "keys of 1 to 32 letters, digits, '_', '.' or '-', starting with a letter")
        if len(value.encode()) > MAX_LABEL_VALUE_BYTES or not _printable(value):
            raise _bad(f"labels[{key}]", value, f"printable text of at most {MAX_LABEL_VALUE_BYTES} bytes")
        labels[key] = value
    zone = labels.get("zone", "")
    if len(zone.encode()) > MAX_ZONE_BYTES:
        raise _bad("labels[zone]", zone, f"at most {MAX_ZONE_BYTES} bytes")
    if len(req.identity_document) > MAX_DOCUMENT_BYTES or len(req.identity_signature) > MAX_SIGNATURE_BYTES:
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"identity_document: {len(req.identity_document)} bytes and a signature of "
            f"{len(req.identity_signature)}, expected at most {MAX_DOCUMENT_BYTES} and {MAX_SIGNATURE_BYTES}",
        )
    if len(req.csr) > MAX_CSR_BYTES:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"csr: {len(req.csr)} bytes, expected at most {MAX_CSR_BYTES}")
    if len(req.instance_secret.encode()) > MAX_SECRET_BYTES:
        # Never echoed: the value of a secret stays out of logs and status messages.
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"instance_secret: {len(req.instance_secret.encode())} bytes, expected at most {MAX_SECRET_BYTES}",
        )
    app_port = 0
    if "app_port" in labels:
        raw = labels["app_port"]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
            raise _bad("labels[app_port]", raw, "an integer from 1 to 65535")
        app_port = int(raw)
    return Registration(
        instance_id, address, host.strip("[]"), port, req.vcpus, req.agent_version, zone, app_port, labels
    )


def check_reason(value: str) -> str:
    if len(value.encode()) > MAX_REASON_BYTES or not _printable(value):
        raise _bad("reason", value, f"printable text of at most {MAX_REASON_BYTES} bytes")
    return value


def peer_ip(peer: str) -> str | None:
    """The caller's IP from grpc's peer string ('ipv4:1.2.3.4:5', 'ipv6:%5B::1%5D:5'), None if not IP."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]") or None
    return None


def normal_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def check_caller(field: str, host: str, peer: str, trust_advertised: bool) -> None:
    """The advertised host must be the caller's own IP, so no agent registers (or removes) a
    victim's address; HELIX_TRUST_ADVERTISED=1 lifts this behind NAT or a proxy."""
    if trust_advertised:
        return
    caller = peer_ip(peer)
    wanted = normal_ip(host)
    if wanted is None:
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{field}: host {host!r} is not an IP address; expected the caller's own IP {caller} "
            "(or set HELIX_TRUST_ADVERTISED=1 on MonitorS)",
        )
    caller_ip = normal_ip(caller) if caller else None
    # Loopback to loopback is one host talking to itself: the kernel picks 127.0.0.1 as the source
    # even for an agent listening on 127.0.0.2, and only a local process can reach either.
    if caller_ip is not None and caller_ip.is_loopback and wanted.is_loopback:
        return
    if caller_ip is None or caller_ip != wanted:
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{field}: host {host} is not the caller's IP {caller}; expected the agent's own address "
            "(or set HELIX_TRUST_ADVERTISED=1 on MonitorS)",
        )
