"""TLS with client certificates (mTLS) between MonitorS and an agent, with real certificates."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest

from protos import helix_pb2, helix_pb2_grpc
from shared.table import State
from tests.procs import free_port
from tests.test_monitor_e2e import AUTH, agent_env, rows, start_monitor, wait_state

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helix test CA")])
    ca = _cert("helix test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("helix", key, ca_name, ca_key, ca=False)
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)  # Helix refuses a private key its group or others can read
    return {k: str(v) for k, v in paths.items()}


def test_mtls_both_directions(procs, table_name, pki):
    tls = dict(HELIX_TLS_CERT=pki["cert"], HELIX_TLS_KEY=pki["key"], HELIX_TLS_CA=pki["ca"])
    port = free_port()
    start_monitor(procs, table_name, port, **tls)
    procs.python("agent", ["-m", "monitor_c"], agent_env("i-tls", port, **tls))
    wait_state(table_name, "i-tls", State.HEALTHY)  # registered over TLS, then polled over TLS

    creds_with_cert = grpc.ssl_channel_credentials(
        open(pki["ca"], "rb").read(), open(pki["key"], "rb").read(), open(pki["cert"], "rb").read()
    )
    request = helix_pb2.RegisterRequest(instance_id="i-tls2", address="127.0.0.1:7000", vcpus=1)
    # Plaintext and TLS without a client certificate are both refused by MonitorS.
    for channel in (
        grpc.insecure_channel(f"127.0.0.1:{port}"),
        grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(open(pki["ca"], "rb").read())),
    ):
        with channel, pytest.raises(grpc.RpcError) as info:
            helix_pb2_grpc.RegistryStub(channel).Register(request, metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # With the client certificate it works (and the token is still required).
    with grpc.secure_channel(f"127.0.0.1:{port}", creds_with_cert) as channel:
        stub = helix_pb2_grpc.RegistryStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Register(request, metadata=AUTH, timeout=10).poll_interval > 0
    assert "i-tls2" in rows(table_name)
