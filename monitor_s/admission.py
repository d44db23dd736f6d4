"""Who may register: the controller's roster, the instance's proof of identity, and a rate limit.
Pure (the roster, the caller and the time come in), beside its tests.

Rules, in the order they act (HELIX_ROSTER=required, the default):
1. A registration from a source address that has spent its budget (HELIX_REGISTER_RATE per
   second, bursts of 5 s worth) is refused RESOURCE_EXHAUSTED: a flood never gets as far as the
   table, so it can never displace a real instance.
2. An instance id not on the roster is refused UNAVAILABLE (retryable: a new instance registers
   a moment before the controller's next publish lists it; its agent retries with back-off). An
   unknown id never takes a row: the table cannot be filled with junk.
3. The advertised address must be the instance's address on the roster: its host always (the
   cloud's private address), its port too when the roster names one (the local provider does).
   Otherwise PERMISSION_DENIED naming both: a token holder cannot re-point a victim's row at
   itself. (That the caller really is at the advertised host is `validation.check_caller`'s rule,
   which HELIX_TRUST_ADVERTISED relaxes for NAT; nothing relaxes this one.)
4. When the roster holds a secret digest for the instance, the request must carry the secret
   (compared in constant time): PERMISSION_DENIED otherwise. Another instance's agent, which
   knows the fleet token but not this instance's secret, cannot register as it.
5. Otherwise (EC2), with HELIX_IDENTITY_CERT set, the request must carry the instance identity
   document and its signature (`identitydoc.py`), signed for this instance id and the roster's
   private address: PERMISSION_DENIED otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import grpc

from monitor_s.identitydoc import DocumentVerifier
from monitor_s.validation import Refusal, Registration, normal_ip
from shared.table import Roster

BURST_SECONDS = 5.0
MAX_SOURCES = 10_000  # buckets kept before the full ones are forgotten


def admit(
    reg: Registration,
    secret: str,
    roster: Roster,
    document: bytes = b"",
    signature: str = "",
    verifier: DocumentVerifier | None = None,
) -> None:
    """Raise Refusal unless `reg` may register against `roster` (rules 2 to 5 above)."""
    if roster.published_at <= 0:
        raise Refusal(
            grpc.StatusCode.UNAVAILABLE,
            f"instance_id: {reg.instance_id!r} cannot be checked yet: the controller has not published "
            "its roster (is ControllerASG running?); retry",
        )
    entry = roster.entries.get(reg.instance_id)
    if entry is None:
        raise Refusal(
            grpc.StatusCode.UNAVAILABLE,
            f"instance_id: {reg.instance_id!r} is not on the controller's roster of this group's "
            "instances (yet); retry",
        )
    wanted, got = normal_ip(entry.host), normal_ip(reg.host)
    same_host = wanted == got if wanted is not None and got is not None else entry.host == reg.host
    if not same_host or (entry.port is not None and entry.port != reg.port):
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"address: {reg.address!r}, expected {entry.address!r}, where the cloud says {reg.instance_id} is",
        )
    if entry.secret_digest:
        presented = hashlib.sha256(secret.encode()).digest()
        if not hmac.compare_digest(presented, entry.secret_digest):
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"instance_secret: {'missing' if not secret else 'wrong'} for {reg.instance_id}, expected "
                "the secret its provider gave it",
            )
    elif verifier is not None:
        try:
            claims = verifier.verify(document, signature)
        except ValueError as exc:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{exc} (for {reg.instance_id})") from None
        if claims.instance_id != reg.instance_id:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity_document: signed for {claims.instance_id!r}, expected {reg.instance_id!r}",
            )
        claimed, wanted_ip = normal_ip(claims.private_ip), normal_ip(entry.host)
        if claimed is None or claimed != wanted_ip:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity_document: privateIp {claims.private_ip!r}, expected {entry.host!r} (the roster's)",
            )


@dataclass
class RateLimiter:
    """Token buckets per source address: `rate` per second, up to BURST_SECONDS worth saved."""

    rate: float
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # source -> (tokens, at)

    def allow(self, source: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        burst = max(1.0, self.rate * BURST_SECONDS)
        tokens, at = self.buckets.get(source, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.buckets) > MAX_SOURCES:
            # A spray of sources: forget those whose bucket has refilled (they are at the default).
            self.buckets = {k: (t, a) for k, (t, a) in self.buckets.items() if t + (now - a) * self.rate < burst}
        return allowed
