"""Register/Deregister input checks, and the caller-address rule."""

from __future__ import annotations

import string
from collections import Counter

import grpc
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from monitor_s.validation import Refusal, check_caller, check_register, peer_ip
from protos import helix_pb2
from shared.rpc_security import check_bearer
from shared.table import InstanceRow


def req(**change):
    fields = dict(
        instance_id="i-0abc",
        address="10.0.0.5:50051",
        vcpus=4,
        agent_version="0.1.0",
        labels={"zone": "us-east-1a", "app_port": "8080"},
    )
    fields.update(change)
    return helix_pb2.RegisterRequest(**fields)


def test_a_good_registration():
    reg = check_register(req())
    assert (reg.instance_id, reg.host, reg.port, reg.vcpus, reg.zone, reg.app_port) == (
        "i-0abc",
        "10.0.0.5",
        50051,
        4,
        "us-east-1a",
        8080,
    )
    assert check_register(req(address="[::1]:5", labels={})).host == "::1"


def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """Three draws in four from `valid` (well-formed, with lengths around the limits), one from
    anything at all: so both accepted and refused requests really occur."""
    return st.integers(0, 3).flatmap(lambda n: valid if n else anything)


_ID_CHARS = string.ascii_letters + string.digits + "._:-"
_HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.text(string.ascii_letters + string.digits + ".-", min_size=1, max_size=70),
)
_VALUES = mostly(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=70), st.text(max_size=80))
REQUESTS = st.fixed_dictionaries(
    {
        "instance_id": mostly(st.text(_ID_CHARS, min_size=1, max_size=70), st.text(max_size=80)),
        "address": mostly(st.builds("{}:{}".format, _HOSTS, st.integers(0, 70_000)), st.text(max_size=80)),
        "vcpus": mostly(st.integers(0, 4100), st.integers(0, 2**32 - 1)),
        "agent_version": mostly(
            st.text(string.ascii_letters + string.digits + ".+_-", max_size=18), st.text(max_size=20)
        ),
        "labels": st.builds(
            lambda free, known: {**free, **known},
            st.dictionaries(
                mostly(
                    st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=36), st.text(max_size=40)
                ),
                _VALUES,
                max_size=20,
            ),
            st.fixed_dictionaries(
                {},
                optional={
                    "zone": _VALUES,
                    "app_port": mostly(st.integers(-1, 70_000).map(str), st.text(max_size=6)),
                },
            ),
        ),
    }
)
FIELDS = ("instance_id", "address", "vcpus", "agent_version", "labels")


def test_anything_is_accepted_cleanly_or_refused_naming_a_field():
    """Rule: any request is either accepted, and then fits the table's fixed-size columns, or
    refused with INVALID_ARGUMENT and one line naming the field. Both outcomes must really occur
    (and every field be named at least once): a property whose "accepted" branch never runs
    checks nothing."""
    accepted: list[int] = []
    refused_fields: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(fields=REQUESTS)
    def check(fields):
        try:
            reg = check_register(req(**fields))
        except Refusal as refusal:
            assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT
            field = refusal.message.split(":")[0].split("[")[0]
            assert field in FIELDS
            assert "\n" not in refusal.message
            refused_fields[field] += 1
            event(f"refused: {field}")
        else:
            # What passes is what was sent, and fits the table's fixed-size columns: the real
            # record encoder refuses anything too long (or holding a NUL).
            assert (reg.instance_id, reg.address, reg.vcpus, reg.agent_version) == (
                fields["instance_id"],
                fields["address"],
                fields["vcpus"],
                fields["agent_version"],
            )
            assert reg.labels == fields["labels"] and reg.zone == fields["labels"].get("zone", "")
            InstanceRow(
                reg.instance_id,
                reg.address,
                zone=reg.zone,
                agent_version=reg.agent_version,
                vcpus=reg.vcpus,
                app_port=reg.app_port,
            ).to_record()
            assert 1 <= reg.vcpus <= 4096 and 0 <= reg.app_port <= 65535
            accepted.append(1)
            event("accepted")

    check()
    assert len(accepted) >= 10, f"only {len(accepted)} of 300 examples were accepted"
    assert sum(refused_fields.values()) >= 10 and set(refused_fields) == set(FIELDS), refused_fields


@pytest.mark.parametrize(
    "peer, ip",
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B::1%5D:5555", "::1"),
        ("unix:/tmp/sock", None),
    ],
)
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
