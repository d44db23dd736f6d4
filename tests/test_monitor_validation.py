"""Register/Deregister input checks, and the caller-address rule."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor_s.validation import Refusal, check_caller, check_register, peer_ip
from protos import helix_pb2
from shared.rpc_security import check_bearer


def req(**change):
    fields = dict(instance_id="i-0abc", address="10.0.0.5:50051", vcpus=4, agent_version="0.1.0",
                  labels={"zone": "us-east-1a", "app_port": "8080"})
    fields.update(change)
    return helix_pb2.RegisterRequest(**fields)


def test_a_good_registration():
    reg = check_register(req())
    assert (reg.instance_id, reg.host, reg.port, reg.vcpus, reg.zone, reg.app_port) == \
        ("i-0abc", "10.0.0.5", 50051, 4, "us-east-1a", 8080)
    assert check_register(req(address="[::1]:5", labels={})).host == "::1"


@settings(max_examples=200, deadline=None)
@given(instance_id=st.text(max_size=80), address=st.text(max_size=80), vcpus=st.integers(0, 2**32 - 1),
       labels=st.dictionaries(st.text(max_size=40), st.text(max_size=80), max_size=20))
def test_anything_is_accepted_cleanly_or_refused_naming_a_field(instance_id, address, vcpus, labels):
    try:
        reg = check_register(req(instance_id=instance_id, address=address, vcpus=vcpus, labels=labels))
    except Refusal as refusal:
        assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refusal.message.split(":")[0].split("[")[0] in ("instance_id", "address", "vcpus", "labels")
        assert "\n" not in refusal.message
    else:
        # Whatever passes fits the table's fixed-size columns.
        assert len(reg.instance_id.encode()) <= 64 and len(reg.address.encode()) <= 64
        assert len(reg.zone.encode()) <= 32 and 1 <= reg.vcpus <= 4096 and 0 <= reg.app_port <= 65535


@pytest.mark.parametrize("peer, ip", [
    ("ipv4:127.0.0.1:5555", "127.0.0.1"), ("ipv6:[::1]:5555", "::1"), ("ipv6:%5B::1%5D:5555", "::1"),
    ("unix:/tmp/sock", None),
])
def test_peer_ip(peer, ip):
    assert peer_ip(peer) == ip


def test_caller_must_be_the_advertised_host():
    check_caller("address", "127.0.0.1", "ipv4:127.0.0.1:4000", False)
    check_caller("address", "127.0.0.1", "ipv6:[::ffff:127.0.0.1]:4000", False)  # v4-mapped
    for host, peer in (("10.0.0.9", "ipv4:127.0.0.1:4000"), ("localhost", "ipv4:127.0.0.1:1"), ("::1", "unix:x")):
        with pytest.raises(Refusal) as info:
            check_caller("address", host, peer, False)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and info.value.message.startswith("address")
    check_caller("address", "10.0.0.9", "ipv4:127.0.0.1:4000", True)  # HELIX_TRUST_ADVERTISED=1
    check_caller("address", "127.0.0.2", "ipv4:127.0.0.1:4000", False)  # loopback to loopback: same host
    with pytest.raises(Refusal):
        check_caller("address", "127.0.0.2", "ipv4:10.0.0.1:4000", False)  # a remote caller never claims loopback


def test_check_bearer():
    assert check_bearer([("authorization", "Bearer s3cret-token")], "s3cret-token")
    assert not check_bearer([("authorization", "Bearer s3cret-tokeN")], "s3cret-token")
    assert not check_bearer([("authorization", "s3cret-token")], "s3cret-token")
    assert not check_bearer([], "s3cret-token") and not check_bearer(None, "s3cret-token")
    assert check_bearer([], "")  # insecure mode: nothing to check
