"""The manager's own certificate authority: TLS both ways between MonitorS and the agents on EC2.

The scheme is Consul's auto-encrypt, cut to what Helix needs:

* `python -m shared.pki init` creates, under HELIX_PKI_DIR (default `<HELIX_STATE_DIR>/pki`, mode
  0700): the CA (`ca.crt`, `ca.key`) and MonitorS's certificate (`monitor.crt`, `monitor.key`),
  named MONITOR_NAME and usable both to serve (Register) and as a client (polls).
* The controller puts `ca.crt` (public) into every instance's user data. The agent makes a key in
  memory at start (it never touches a disk), and sends a certificate signing request with Register,
  over TLS that verifies MonitorS against that CA under MONITOR_NAME.
* MonitorS admits the agent as before (roster, address, identity document), then signs its key for
  `agent_name(instance_id)`, server use only, for AGENT_CERT_LIFETIME. The agent serves with it
  and accepts only clients whose certificate the CA issued *for client use*: MonitorS's alone, since
  agent certificates carry serverAuth only (BoringSSL enforces the extended key usage).
* MonitorS dials each agent expecting `agent_name(id)`: an address that now belongs to another
  instance, or to anything that is not an agent of this CA, fails the handshake.

Names are DNS names under `.helix` so that no agent name can ever equal MONITOR_NAME.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import stat
import sys
from dataclasses import dataclass

MONITOR_NAME = "monitor.helix"
AGENT_SUFFIX = ".agents.helix"
CA_LIFETIME = datetime.timedelta(days=3650)
MONITOR_LIFETIME = datetime.timedelta(days=825)
AGENT_CERT_LIFETIME = datetime.timedelta(days=7)
# An agent asks for a new certificate (by registering again) once this share of its life is gone.
RENEW_AFTER_SHARE = 2 / 3
CLOCK_SKEW = datetime.timedelta(minutes=5)

FILES = ("ca.crt", "ca.key", "monitor.crt", "monitor.key")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class PKIError(Exception):
    """The manager CA is missing, unreadable, not private or not one CA (one line, names the path)."""


def agent_name(instance_id: str) -> str:
    """The DNS name an agent's certificate is issued for. EC2 ids (`i-0abc…`) and local ids are DNS
    labels and stay readable; anything else is hashed into one."""
    label = instance_id.lower()
    if not _DNS_LABEL.match(label):
        label = "x-" + hashlib.sha256(instance_id.encode()).hexdigest()[:40]
    return label + AGENT_SUFFIX


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


def new_key() -> object:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _issue(
    subject: str,
    public_key: object,
    issuer: object,
    issuer_key: object,
    lifetime: datetime.timedelta,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
) -> object:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.subject)  # type: ignore[attr-defined]
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


def _private_problem(path: str, *, directory: bool = False) -> str | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return "missing"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, expected uid {os.geteuid()}"
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"mode {stat.S_IMODE(st.st_mode):o}, expected {'700' if directory else '600'}"
    return None


def init(directory: str, *, force: bool = False) -> list[str]:
    """Create the CA and MonitorS's certificate under `directory`; the paths written. Refuses to
    replace an existing CA unless `force` (every agent certificate it issued stops verifying)."""
    if not force and any(os.path.exists(os.path.join(directory, f)) for f in FILES):
        raise PKIError(f"{directory}: a manager CA is already there (init --force replaces it)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    problem = _private_problem(directory, directory=True)
    if problem:
        raise PKIError(f"{directory}: {problem}")
    ca_key = new_key()
    ca = _issue("helix manager CA", ca_key.public_key(), None, ca_key, CA_LIFETIME, ca=True)  # type: ignore[attr-defined]
    monitor_key = new_key()
    monitor = _issue(
        MONITOR_NAME,
        monitor_key.public_key(),  # type: ignore[attr-defined]
        ca,
        ca_key,
        MONITOR_LIFETIME,
        server=True,
        client=True,
    )
    written = []
    for name, data in (
        ("ca.key", _pem_key(ca_key)),
        ("monitor.key", _pem_key(monitor_key)),
        ("ca.crt", _pem_cert(ca)),
        ("monitor.crt", _pem_cert(monitor)),
    ):
        path = os.path.join(directory, name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        written.append(path)
    return written


def read_ca_certificate(directory: str) -> bytes:
    """The CA's public certificate (what user data carries); PKIError naming the file if absent."""
    path = os.path.join(directory, "ca.crt")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PKIError(f"{path}: {exc.strerror} (create it with `python -m shared.pki init`)") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PKIError(f"{path}: expected a PEM certificate")
    return data


@dataclass(frozen=True)
class ManagerCA:
    """What MonitorS holds: the CA (to sign agents) and its own certificate (to serve and to poll)."""

    ca_pem: bytes
    monitor_cert_pem: bytes
    monitor_key_pem: bytes
    _ca: object
    _ca_key: object

    @classmethod
    def load(cls, directory: str) -> ManagerCA:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        problem = _private_problem(directory, directory=True)
        if problem:
            raise PKIError(f"HELIX_PKI_DIR={directory}: {problem} (create it with `python -m shared.pki init`)")
        data = {}
        for name in FILES:
            path = os.path.join(directory, name)
            if name.endswith(".key") and (problem := _private_problem(path)):
                raise PKIError(f"{path}: {problem}")
            try:
                with open(path, "rb") as fh:
                    data[name] = fh.read()
            except OSError as exc:
                raise PKIError(f"{path}: {exc.strerror} (create it with `python -m shared.pki init`)") from None
        try:
            ca = x509.load_pem_x509_certificate(data["ca.crt"])
            ca_key = serialization.load_pem_private_key(data["ca.key"], password=None)
            monitor = x509.load_pem_x509_certificate(data["monitor.crt"])
            serialization.load_pem_private_key(data["monitor.key"], password=None)
        except ValueError as exc:
            raise PKIError(f"{directory}: expected PEM certificates and unencrypted keys ({exc})") from None
        if ca.public_key() != ca_key.public_key():
            raise PKIError(f"{directory}/ca.key: not the key of ca.crt")
        from cryptography.exceptions import InvalidSignature

        try:
            monitor.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise PKIError(f"{directory}/monitor.crt: not issued by ca.crt") from None
        if monitor.not_valid_after_utc <= _now():
            raise PKIError(f"{directory}/monitor.crt: expired on {monitor.not_valid_after_utc:%Y-%m-%d}")
        return cls(data["ca.crt"], data["monitor.crt"], data["monitor.key"], ca, ca_key)

    def issue_agent(self, csr_pem: bytes, instance_id: str) -> bytes:
        """Sign the key in `csr_pem` for `instance_id`: server use only. ValueError (one line) when the
        request is not a PEM CSR whose signature verifies (the agent holds the key it asks for)."""
        from cryptography import x509
        from cryptography.exceptions import UnsupportedAlgorithm

        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            public_key, signed = csr.public_key(), csr.is_signature_valid
        # cryptography parses lazily: a damaged key or algorithm surfaces here, not at load.
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("csr: expected a PEM certificate signing request") from None
        if not signed:
            raise ValueError("csr: its signature does not verify (the request must be signed by its own key)")
        cert = _issue(agent_name(instance_id), public_key, self._ca, self._ca_key, AGENT_CERT_LIFETIME, server=True)
        return _pem_cert(cert)


class AgentKey:
    """An agent's key (in memory only) and what it needs to enrol: a CSR, and a check that the
    certificate MonitorS returns is for this key, from the CA, for this instance. The request names
    no one: MonitorS issues for the instance it admitted, whatever a request asks for."""

    def __init__(self, ca_pem: bytes):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        self.ca_pem = ca_pem
        try:
            self._ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError:
            raise PKIError("HELIX_TLS_CA: expected the manager CA's PEM certificate") from None
        self._key = new_key()
        self.key_pem = _pem_key(self._key)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helix agent")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(self._key, hashes.SHA256())  # type: ignore[arg-type]
        self.csr_pem = _pem_cert(csr)
        # What the agent serves before enrolment: trusted by no one, so nothing can poll it yet.
        public = self._key.public_key()  # type: ignore[attr-defined]
        self.self_signed_pem = _pem_cert(
            _issue("unenrolled" + AGENT_SUFFIX, public, None, self._key, AGENT_CERT_LIFETIME, server=True)
        )

    def accept(self, cert_pem: bytes, instance_id: str) -> float:
        """Check a returned certificate; its expiry (epoch seconds). ValueError naming what is wrong."""
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ValueError("certificate: expected a PEM certificate") from None
        if cert.public_key() != self._key.public_key():  # type: ignore[attr-defined]
            raise ValueError("certificate: not for this agent's key")
        from cryptography.exceptions import InvalidSignature

        try:
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError("certificate: not issued by HELIX_TLS_CA") from None
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if agent_name(instance_id) not in names.get_values_for_type(x509.DNSName):
            raise ValueError(f"certificate: not issued for {agent_name(instance_id)}")
        return cert.not_valid_after_utc.timestamp()


def renew_at(issued_at: float, expires_at: float) -> float:
    """When an agent should ask for a new certificate: RENEW_AFTER_SHARE of its life in."""
    return issued_at + (expires_at - issued_at) * RENEW_AFTER_SHARE


def main(argv: list[str] | None = None) -> int:
    from shared.config import EXIT_BAD_CONFIG, load_or_exit

    parser = argparse.ArgumentParser(prog="python -m shared.pki", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init_p = sub.add_parser("init", help="create the manager CA and MonitorS's certificate under HELIX_PKI_DIR")
    init_p.add_argument("--force", action="store_true", help="replace an existing CA (every agent must re-enrol)")
    sub.add_parser("show", help="print the CA's fingerprint and the certificates' expiry dates")
    args = parser.parse_args(argv)
    cfg = load_or_exit(prog="shared.pki")
    directory = cfg.effective_pki_dir
    try:
        if args.command == "init":
            for path in init(directory, force=args.force):
                print(f"wrote {path}")
            return 0
        manager = ManagerCA.load(directory)
    except (PKIError, OSError) as exc:
        print(f"shared.pki: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    for label, pem in (("ca.crt", manager.ca_pem), ("monitor.crt", manager.monitor_cert_pem)):
        cert = x509.load_pem_x509_certificate(pem)
        print(
            f"{label}: {cert.subject.rfc4514_string()}, sha256 {cert.fingerprint(hashes.SHA256()).hex()}, "
            f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
