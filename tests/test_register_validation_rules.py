"""Register/Deregister validation (monitor_s/validation.py), limit by limit: every field exactly at
its limit is accepted and one past it is refused, with the exact one-line message; and the
caller-address rule for callers that are not on loopback."""

from __future__ import annotations

import grpc
import pytest

from monitor_s.validation import (
    MAX_ADDRESS_BYTES,
    Refusal,
    check_caller,
    check_instance_id,
    check_reason,
    check_register,
    peer_ip,
)
from protos import helix_pb2

GOOD = dict(
    instance_id="i-0abc",
    address="10.0.0.5:50051",
    vcpus=4,
    agent_version="0.1.0",
    labels={"zone": "us-east-1a", "app_port": "8080"},
)


def req(**change):
    return helix_pb2.RegisterRequest(**{**GOOD, **change})


def refused(**change) -> Refusal:
    with pytest.raises(Refusal) as info:
        check_register(req(**change))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value) == info.value.message and "\n" not in info.value.message
    return info.value


def labels(**extra):
    return {**GOOD["labels"], **extra}


# -- what an accepted registration carries ---------------------------------------------------------


def test_an_accepted_registration_carries_every_field():
    """Rule: the Registration holds exactly what was sent (host split from the port)."""
    reg = check_register(req(labels=labels(rack="r1")))
    assert reg.instance_id == "i-0abc" and reg.address == "10.0.0.5:50051"
    assert (reg.host, reg.port, reg.vcpus, reg.agent_version) == ("10.0.0.5", 50051, 4, "0.1.0")
    assert (reg.zone, reg.app_port) == ("us-east-1a", 8080)
    assert reg.labels == {"zone": "us-east-1a", "app_port": "8080", "rack": "r1"}


def test_host_brackets_are_stripped_and_nothing_else():
    """Rule: only the IPv6 brackets come off the host; a name that starts or ends with any other
    character keeps it."""
    assert check_register(req(address="[2001:db8::5]:443")).host == "2001:db8::5"
    assert check_register(req(address="X-box.X:443")).host == "X-box.X"


def test_no_zone_and_no_app_port_labels_mean_empty_and_zero():
    """Rule: without a zone label the zone is '', without app_port the port is 0 (unknown)."""
    reg = check_register(req(labels={}))
    assert (reg.zone, reg.app_port, reg.labels) == ("", 0, {})
    assert check_register(req(agent_version="")).agent_version == ""  # optional field


# -- instance_id: 1 to 64 characters -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["i", "a" * 64, "i-0123456789abcdef0", "Node_1.local:2-x", "9"])
def test_instance_ids_accepted(value):
    """Rule: 1 to 64 of letters, digits, '.', '_', ':', '-', starting with a letter or digit."""
    assert check_instance_id(value) == value
    assert check_register(req(instance_id=value)).instance_id == value


@pytest.mark.parametrize("value", ["", "a" * 65, "-i", ".i", "i d", "i/d", "ié"])
def test_instance_ids_refused(value):
    """Rule: empty, 65 characters, a leading '-' or '.', or any other character is refused."""
    assert refused(instance_id=value).message == (
        f"instance_id: {value!r}, expected 1 to 64 of letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
    )


def test_a_long_value_is_shown_cut_at_80_characters():
    """Rule: the message shows the value's repr cut at 80 characters, never the whole input."""
    value = "x" * 30 + "/" + "y" * 200
    message = refused(instance_id=value).message
    assert message.startswith(f"instance_id: {repr(value)[:80]}, expected ")
    assert len(message.split(", expected")[0]) == len("instance_id: ") + 80


# -- address: ASCII host:port of at most 64 bytes ------------------------------------------------------


def test_an_address_of_exactly_64_bytes_is_accepted_and_65_refused():
    """Rule: the address column holds 64 bytes: 64 is accepted, 65 refused with the limit named."""
    at_limit = "h" * (MAX_ADDRESS_BYTES - len(":50051")) + ":50051"
    assert len(at_limit) == 64 == MAX_ADDRESS_BYTES
    assert check_register(req(address=at_limit)).address == at_limit
    over = "h" + at_limit
    assert refused(address=over).message == f"address: {over!r}, expected ASCII host:port of at most 64 bytes"


def test_a_short_non_ascii_address_is_refused_by_the_ascii_rule():
    """Rule: an address must be ASCII, however short (a valid IDN-looking host included)."""
    assert (
        refused(address="hé.local:80").message == "address: 'hé.local:80', expected ASCII host:port of at most 64 bytes"
    )


@pytest.mark.parametrize("value", ["10.0.0.5", "10.0.0.5:0", "10.0.0.5:65536", ":80", "[::1]80", "a b:80"])
def test_a_malformed_address_is_refused_naming_host_port(value):
    """Rule: not host:port with a port from 1 to 65535 is refused with the parser's expectation."""
    assert (
        refused(address=value).message
        == f"address: {value!r}, expected host:port with a port from 1 to 65535 (IPv6 as [addr]:port)"
    )


@pytest.mark.parametrize("value", ["h:1", "h:65535"])
def test_ports_at_the_limits_are_accepted(value):
    """Rule: ports 1 and 65535 are valid."""
    assert check_register(req(address=value)).port == int(value.split(":")[1])


# -- vcpus: 1 to 4096 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 2, 4095, 4096])
def test_vcpus_at_the_limits_are_accepted(value):
    """Rule: vcpus from 1 to 4096 inclusive."""
    assert check_register(req(vcpus=value)).vcpus == value


@pytest.mark.parametrize("value", [0, 4097, 2**32 - 1])
def test_vcpus_past_the_limits_are_refused(value):
    """Rule: 0 and 4097 are refused, with the range named."""
    assert refused(vcpus=value).message == f"vcpus: {value}, expected an integer from 1 to 4096"


# -- agent_version: empty or up to 16 --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "1", "v" * 16, "1.2.3+build_4-rc"])
def test_agent_versions_accepted(value):
    """Rule: empty (unknown), or 1 to 16 of letters, digits, '.', '+', '_', '-'."""
    assert check_register(req(agent_version=value)).agent_version == value


@pytest.mark.parametrize("value", ["v" * 17, ".1", "1 2", "1/2"])
def test_agent_versions_refused(value):
    """Rule: 17 characters, a leading punctuation mark or another character is refused."""
    assert (
        refused(agent_version=value).message
        == f"agent_version: {value!r}, expected at most 16 of letters, digits, '.', '+', '_' or '-'"
    )


# -- labels ------------------------------------------------------------------------------------------


def test_sixteen_labels_are_accepted_and_seventeen_refused():
    """Rule: at most 16 labels."""
    sixteen = {f"k{n}": "v" for n in range(16)}
    assert len(check_register(req(labels=sixteen)).labels) == 16
    assert refused(labels={**sixteen, "k16": "v"}).message == "labels: '17 labels', expected at most 16"


@pytest.mark.parametrize("key", ["a", "k" * 32, "Zone_1.b-c"])
def test_label_keys_accepted(key):
    """Rule: keys of 1 to 32 of letters, digits, '_', '.', '-', starting with a letter."""
    assert key in check_register(req(labels={key: "v"})).labels


@pytest.mark.parametrize("key", ["k" * 33, "1k", "_k", "k k", ""])
def test_label_keys_refused(key):
    """Rule: 33 characters, a leading digit or '_', a space, or an empty key is refused."""
    assert (
        refused(labels={key: "v"}).message
        == f"labels: {key!r}, expected keys of 1 to 32 letters, digits, '_', '.' or '-', starting with a letter"
    )


def test_label_values_are_limited_in_bytes_not_characters():
    """Rule: a label value holds at most 64 bytes of UTF-8: 64 bytes (32 × 'é') pass, 65 bytes
    fail, as does 33 × 'é' (33 characters, 66 bytes)."""
    assert check_register(req(labels={"k": "v" * 64})).labels["k"] == "v" * 64
    assert check_register(req(labels={"k": "é" * 32})).labels["k"] == "é" * 32
    for value in ("v" * 65, "é" * 33):
        assert (
            refused(labels={"k": value}).message == f"labels[k]: {value!r}, expected printable text of at most 64 bytes"
        )


@pytest.mark.parametrize("value", ["a\nb", "\x00", "tab\there", "\x7f"])
def test_a_non_printable_label_value_is_refused(value):
    """Rule: label values are printable text (no newline, NUL, tab, DEL), however short."""
    assert refused(labels={"k": value}).message == f"labels[k]: {value!r}, expected printable text of at most 64 bytes"


def test_the_zone_holds_32_bytes():
    """Rule: the zone label fits the 32-byte zone column: 32 accepted, 33 refused."""
    assert check_register(req(labels={"zone": "z" * 32})).zone == "z" * 32
    assert refused(labels={"zone": "z" * 33}).message == f"labels[zone]: {'z' * 33!r}, expected at most 32 bytes"


@pytest.mark.parametrize("value, port", [("1", 1), ("65535", 65535), ("08080", 8080)])
def test_app_ports_accepted(value, port):
    """Rule: app_port is an ASCII integer from 1 to 65535."""
    assert check_register(req(labels=labels(app_port=value))).app_port == port


@pytest.mark.parametrize("value", ["0", "65536", "-1", "80x", "", "８０８０", " 80"])
def test_app_ports_refused(value):
    """Rule: 0, 65536, a sign, letters, empty, non-ASCII digits (fullwidth '８０８０') and spaces
    are refused, with the range named."""
    assert (
        refused(labels=labels(app_port=value)).message
        == f"labels[app_port]: {value!r}, expected an integer from 1 to 65535"
    )


def test_the_first_bad_field_in_order_is_the_one_named():
    """Rule: fields are checked in order instance_id, address, vcpus, agent_version, labels."""
    assert refused(instance_id="", address="x", vcpus=0).message.startswith("instance_id:")
    assert refused(address="x", vcpus=0, agent_version=".").message.startswith("address:")
    assert refused(vcpus=0, agent_version=".").message.startswith("vcpus:")
    assert refused(agent_version=".", labels={"1": "x"}).message.startswith("agent_version:")


# -- Deregister's reason ------------------------------------------------------------------------------


def test_a_reason_holds_200_printable_bytes():
    """Rule: a Deregister reason is printable text of at most 200 bytes."""
    assert check_reason("") == ""
    assert check_reason("r" * 200) == "r" * 200
    assert check_reason("é" * 100) == "é" * 100  # 200 bytes
    for value in ("r" * 201, "é" * 101, "line\nbreak"):
        with pytest.raises(Refusal) as info:
            check_reason(value)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message == f"reason: {repr(value)[:80]}, expected printable text of at most 200 bytes"


# -- the caller must be the advertised host, loopback or not ---------------------------------------------


@pytest.mark.parametrize(
    "host, peer",
    [
        ("10.0.0.5", "ipv4:10.0.0.5:40000"),
        ("192.168.1.20", "ipv6:[::ffff:192.168.1.20]:40000"),  # v4-mapped caller
        ("2001:db8::5", "ipv6:[2001:db8::5]:40000"),
        ("2001:db8::5", "ipv6:%5B2001:db8::5%5D:40000"),  # URL-quoted brackets
        ("fe80::1", "ipv6:[fe80::1%25eth0]:40000"),  # link-local caller with a zone id
        ("fe80::1%eth0", "ipv6:[fe80::1]:40000"),
    ],
)
def test_a_remote_caller_registering_its_own_address_is_accepted(host, peer):
    """Rule: a caller that is not on loopback registers (or removes) its own IP: accepted. Zone
    ids and v4-mapped forms compare as the address they name."""
    assert check_caller("address", host, peer, False) is None


@pytest.mark.parametrize(
    "host, peer, shown",
    [
        ("10.0.0.6", "ipv4:10.0.0.5:40000", "10.0.0.5"),
        ("10.0.0.5", "ipv6:[2001:db8::5]:40000", "2001:db8::5"),
        ("127.0.0.1", "ipv4:10.0.0.5:40000", "10.0.0.5"),
        ("10.0.0.5", "unix:/run/x.sock", "None"),
    ],
)
def test_a_caller_claiming_another_address_is_denied(host, peer, shown):
    """Rule: an advertised host that is not the caller's own IP is PERMISSION_DENIED, naming the
    field, the host and the caller, and the setting that lifts the rule."""
    with pytest.raises(Refusal) as info:
        check_caller("address", host, peer, False)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.message == (
        f"address: host {host} is not the caller's IP {shown}; expected the agent's own "
        "address (or set HELIX_TRUST_ADVERTISED=1 on MonitorS)"
    )


def test_a_host_name_is_denied_with_its_own_message():
    """Rule: the advertised host must be an IP address, named as such."""
    with pytest.raises(Refusal) as info:
        check_caller("instance", "db.internal", "ipv4:10.0.0.5:1", False)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.message == (
        "instance: host 'db.internal' is not an IP address; expected the caller's own IP "
        "10.0.0.5 (or set HELIX_TRUST_ADVERTISED=1 on MonitorS)"
    )


def test_trust_advertised_lifts_the_rule_for_remote_callers():
    """Rule: HELIX_TRUST_ADVERTISED=1 accepts any advertised host (behind NAT or a proxy)."""
    assert check_caller("address", "10.9.9.9", "ipv4:10.0.0.5:1", True) is None
    assert check_caller("address", "not-an-ip", "unix:x", True) is None


@pytest.mark.parametrize(
    "peer, ip",
    [
        ("ipv4:10.1.2.3:50051", "10.1.2.3"),
        ("ipv6:[fe80::1%25ethX]:7", "fe80::1%ethX"),  # a zone id is kept whole
        ("ipv6:[2001:db8::1]:7", "2001:db8::1"),
        ("ipv4:", None),
        ("ipv6:[]:5", None),
        ("unix:/tmp/s", None),
        ("", None),
    ],
)
def test_peer_ip_of_remote_and_odd_peers(peer, ip):
    """Rule: the caller's IP from grpc's peer string; None when it names no IP."""
    assert peer_ip(peer) == ip


# -- a trailing newline (the patterns once ended in `$`, which matches before one) -------------------


@pytest.mark.parametrize(
    "change",
    [dict(instance_id="i-1\n"), dict(agent_version="1.0\n"), dict(labels={"zone\n": "a"}), dict(address="h\n:80")],
)
def test_a_trailing_newline_is_refused(change):
    """Rule: identities are one line; a trailing newline is refused (was accepted: `$` matched before it)."""
    refused(**change)
