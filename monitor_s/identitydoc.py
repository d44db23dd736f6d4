"""The EC2 instance identity document: an agent's proof of which instance it runs on.

IMDS serves every instance its identity document (JSON: instanceId, privateIp, region, accountId,
…) and an RSA-SHA256 signature of it by AWS (`/latest/dynamic/instance-identity/signature`,
base64), which anyone can check with AWS's public certificate for the region (HELIX_IDENTITY_CERT).
Only a process on that instance can read them, so a document that verifies, names instance X and
X's private address, and comes from that address, is X speaking. A document is the same for an
instance's whole life, so it proves *where*, not *when*: that is why the caller's address must
also be the one the roster names (`admission.admit`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

MAX_DOCUMENT_BYTES = 4096


@dataclass(frozen=True)
class IdentityDocument:
    instance_id: str
    private_ip: str
    region: str
    account_id: str


class DocumentVerifier:
    def __init__(self, cert_pem: bytes):
        from cryptography import x509  # only MonitorS with HELIX_IDENTITY_CERT needs it

        self._key = x509.load_pem_x509_certificate(cert_pem).public_key()

    @classmethod
    def from_file(cls, path: str) -> DocumentVerifier:
        with open(path, "rb") as fh:
            return cls(fh.read())

    def verify(self, document: bytes, signature_b64: str) -> IdentityDocument:
        """The document's claims, once its signature checks out; ValueError with one line otherwise."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        if not document:
            raise ValueError("identity_document: missing, expected the instance identity document from IMDS")
        if len(document) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"identity_document: {len(document)} bytes, expected at most {MAX_DOCUMENT_BYTES}")
        try:
            signature = base64.b64decode(signature_b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("identity_signature: not base64, expected IMDS's `signature`") from None
        if not isinstance(self._key, rsa.RSAPublicKey):
            raise ValueError("HELIX_IDENTITY_CERT: not an RSA certificate, expected AWS's RSA certificate")
        try:
            self._key.verify(signature, document, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise ValueError("identity_signature: does not verify against HELIX_IDENTITY_CERT") from None
        try:
            claims = json.loads(document)
            return IdentityDocument(
                str(claims["instanceId"]),
                str(claims["privateIp"]),
                str(claims.get("region", "")),
                str(claims.get("accountId", "")),
            )
        except (ValueError, KeyError, TypeError):
            raise ValueError("identity_document: signed, but not a document with instanceId and privateIp") from None
