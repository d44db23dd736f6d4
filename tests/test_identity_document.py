"""EC2 agents prove who they are with the instance identity document: verified by MonitorS against
a certificate (AWS's for the region; here a test key's), bound to the instance id and the roster's
address. The IMDS answering the agent is the one fake (the real service cannot run here)."""

from __future__ import annotations

import base64
import datetime
import json

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from monitor_s.admission import admit
from monitor_s.identitydoc import DocumentVerifier
from monitor_s.validation import Refusal, Registration
from protos import helix_pb2, helix_pb2_grpc
from shared.table import Roster, RosterEntry, State
from tests.fake_imds import serve_imds
from tests.procs import free_port
from tests.test_monitor_e2e import agent_env, rows, start_monitor, wait_state
from tests.test_registration_binding import publish


def make_cert(key) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test identity documents")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CERT = make_cert(KEY)


def signed(instance_id: str, private_ip: str, key=KEY) -> tuple[bytes, str]:
    document = json.dumps(
        {"instanceId": instance_id, "privateIp": private_ip, "region": "us-east-1", "accountId": "123456789012"},
        indent=2,
    ).encode()
    signature = key.sign(document, padding.PKCS1v15(), hashes.SHA256())
    return document, base64.b64encode(signature).decode()


def reg(instance_id: str = "i-0doc", host: str = "10.0.0.7") -> Registration:
    return Registration(instance_id, f"{host}:50051", host, 50051, 1, "", "", 0, {})


ROSTER = Roster(1.0, {"i-0doc": RosterEntry("i-0doc", "10.0.0.7")})


def outcome(registration: Registration, document: bytes, signature: str) -> str:
    try:
        admit(registration, "", ROSTER, document, signature, DocumentVerifier(CERT))
    except Refusal as exc:
        return f"{exc.code.name}: {exc.message}"
    return "OK"


def test_a_signed_document_for_this_id_and_address_admits():
    assert outcome(reg(), *signed("i-0doc", "10.0.0.7")) == "OK"


def test_every_forgery_is_refused():
    doc, sig = signed("i-0doc", "10.0.0.7")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "missing": (b"", ""),
        "another key": signed("i-0doc", "10.0.0.7", other_key),
        "edited after signing": (doc.replace(b"10.0.0.7", b"10.0.0.8"), sig),
        "not base64": (doc, "%%%"),
        "another instance": signed("i-0other", "10.0.0.7"),
        "another address": signed("i-0doc", "10.0.0.9"),
    }
    for what, (document, signature) in cases.items():
        result = outcome(reg(), document, signature)
        assert result.startswith("PERMISSION_DENIED"), (what, result)
    assert "signed for 'i-0other', expected 'i-0doc'" in outcome(reg(), *cases["another instance"])
    assert "privateIp '10.0.0.9', expected '10.0.0.7'" in outcome(reg(), *cases["another address"])
    assert "does not verify" in outcome(reg(), *cases["edited after signing"])


def test_a_signed_blob_that_is_not_a_document_and_a_non_rsa_certificate():
    blob = b"not json"
    signature = base64.b64encode(KEY.sign(blob, padding.PKCS1v15(), hashes.SHA256())).decode()
    assert "not a document with instanceId" in outcome(reg(), blob, signature)
    ec_cert = make_cert(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ValueError, match="not an RSA certificate"):
        DocumentVerifier(ec_cert).verify(*signed("i-0doc", "10.0.0.7"))


@pytest.fixture
def imds():
    with serve_imds() as fake:
        yield fake


def test_an_ec2_agent_with_no_token_registers_with_its_document(procs, table_name, imds, tmp_path):
    document, signature = signed("i-0doc", "127.0.0.1")
    imds.answers = {
        "/latest/meta-data/instance-id": "i-0doc",
        "/latest/meta-data/local-ipv4": "127.0.0.1",
        "/latest/meta-data/placement/availability-zone": "us-east-1a",
        "/latest/dynamic/instance-identity/document": document.decode(),
        "/latest/dynamic/instance-identity/signature": signature,
    }
    cert = tmp_path / "aws-identity.pem"
    cert.write_bytes(CERT)
    port = free_port()
    start_monitor(procs, table_name, port, HELIX_ROSTER="required", HELIX_IDENTITY_CERT=str(cert))
    publish(table_name, RosterEntry("i-0doc", "127.0.0.1"))
    env = agent_env("", port, HELIX_IMDS_URL=imds.url, HELIX_IDENTITY_DOCUMENT=1)
    del env["HELIX_TOKEN"], env["HELIX_INSTANCE_ID"]
    procs.python("agent", ["-m", "monitor_c"], env)
    row = wait_state(table_name, "i-0doc", State.HEALTHY)
    assert row.zone == "us-east-1a"
    # Someone else at the same address, claiming the id with a document signed for another instance.
    forged_doc, forged_sig = signed("i-0mallory", "127.0.0.1")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
        helix_pb2_grpc.RegistryStub(channel).Register(
            helix_pb2.RegisterRequest(
                instance_id="i-0doc",
                address="127.0.0.1:1",
                vcpus=1,
                identity_document=forged_doc,
                identity_signature=forged_sig,
            ),
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rows(table_name)["i-0doc"].address == row.address


def test_an_oversized_document_is_an_invalid_argument():
    from monitor_s.validation import check_register

    request = helix_pb2.RegisterRequest(
        instance_id="i-0doc", address="10.0.0.7:1", vcpus=1, identity_document=b"x" * 4097
    )
    with pytest.raises(Refusal) as info:
        check_register(request)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "identity_document: 4097 bytes" in info.value.message
