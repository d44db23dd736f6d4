"""Who this agent is and where MonitorS can reach it.

Instance id: HELIX_INSTANCE_ID, else EC2 instance metadata (IMDSv2: a token PUT, then GETs, each
with a short timeout), else the hostname. Advertised address: HELIX_ADVERTISE_ADDR, else the
metadata's local-ipv4 with the listen port, else the listen address (an unspecified listen host
such as 0.0.0.0 becomes the local IP this host uses to reach MonitorS, the one MonitorS sees).
The zone label comes from the metadata's placement/availability-zone when not set.
IMDS is asked only when something is missing, at most once.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from shared.config import Config, parse_host_port

IMDS_TIMEOUT = 0.5
TOKEN_TTL = "21600"


def imds_lookup(base_url: str, timeout: float = IMDS_TIMEOUT, document: bool = False) -> dict[str, str]:
    """instance-id, local-ipv4 and availability-zone from IMDSv2; {} when it does not answer.
    `document`: also the instance identity document and its signature (the agent's proof of who
    it is, which MonitorS checks against AWS's public certificate)."""
    import http.client  # only when IMDS is needed: it drags in the email package

    url = urlsplit(base_url)
    if not url.hostname:
        return {}
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    found: dict[str, str] = {}
    try:
        conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL})
        resp = conn.getresponse()
        token = resp.read().decode("ascii", "replace").strip()
        if resp.status != 200 or not token:
            return {}
        paths = [
            ("instance_id", "/latest/meta-data/instance-id"),
            ("local_ipv4", "/latest/meta-data/local-ipv4"),
            ("zone", "/latest/meta-data/placement/availability-zone"),
        ]
        if document:
            paths += [
                ("document", "/latest/dynamic/instance-identity/document"),
                ("signature", "/latest/dynamic/instance-identity/signature"),
            ]
        for key, path in paths:
            conn.request("GET", path, headers={"X-aws-ec2-metadata-token": token})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
            if key != "document":  # the document is signed byte for byte: kept exactly as served
                body = body.strip()
            if resp.status == 200 and body:
                found[key] = body
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()
    return found


def _route_ip(target: str) -> str:
    """The local IP the kernel would use to reach `target` (no packet is sent)."""
    host, port = parse_host_port(target)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass
class Identity:
    instance_id: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    source: str = "config"
    document: bytes = b""  # EC2 instance identity document (HELIX_IDENTITY_DOCUMENT=1)
    signature: str = ""


def resolve_identity(cfg: Config, listen_port: int) -> Identity:
    labels = dict(cfg.labels)
    need_imds = not cfg.instance_id or not cfg.advertise_addr or "zone" not in labels or cfg.identity_document
    meta = imds_lookup(cfg.imds_url, document=cfg.identity_document) if need_imds and cfg.imds_url else {}
    if "zone" not in labels and meta.get("zone"):
        labels["zone"] = meta["zone"]
    instance_id, source = cfg.instance_id, "config"
    if not instance_id:
        instance_id, source = (
            (meta["instance_id"], "imds") if meta.get("instance_id") else (socket.gethostname(), "hostname")
        )
    if cfg.advertise_addr:
        address = cfg.advertise_addr
    elif meta.get("local_ipv4"):
        address = f"{meta['local_ipv4']}:{listen_port}"
    else:
        host, _ = parse_host_port(cfg.agent_listen)
        if host in ("0.0.0.0", "::", ""):
            host = _route_ip(cfg.monitor_addrs[0])  # the first MonitorS: all are on the managers' network
        address = f"[{host}]:{listen_port}" if ":" in host else f"{host}:{listen_port}"
    return Identity(
        instance_id=instance_id,
        address=address,
        labels=labels,
        source=source,
        document=meta.get("document", "").encode(),
        signature=meta.get("signature", ""),
    )
