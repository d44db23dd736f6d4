"""The setting parsers of shared/config.py, one by one: every limit exactly at, and one past, its
bound; the exact 'expected …' text each gives (it completes `KEY=value: expected …`); whitespace
and case handling. The parsers are built inside each test, as `Config` builds them."""

from __future__ import annotations

import math

import pytest

from shared.config import (
    Invalid,
    app_check_spec,
    choice,
    cpu_source_spec,
    csv_list,
    flag,
    host_port,
    integer,
    label_pairs,
    number,
    parse_host_port,
    shm_segment_name,
    text,
)

HOST_PORT = "host:port with a port from 1 to 65535 (IPv6 as [addr]:port)"


def expected(parse, raw: str) -> str:
    """The 'expected …' text `parse` refuses `raw` with."""
    with pytest.raises(Invalid) as info:
        parse(raw)
    return str(info.value)


# -- text -------------------------------------------------------------------------------------------


def test_text_holds_exactly_max_len_characters():
    """Rule: text(max_len) takes up to max_len characters (not bytes), refuses one more."""
    parse = text(4)
    assert parse("abcd") == "abcd" and parse("éééé") == "éééé"
    assert expected(parse, "abcde") == "at most 4 characters"


def test_text_empty_only_when_allowed():
    """Rule: '' is a value unless allow_empty=False; the default allows it."""
    assert text()("") == "" and text(3)("") == ""
    assert expected(text(3, allow_empty=False), "") == "a non-empty value"
    assert text(3, allow_empty=False)("x") == "x"


def test_text_default_limit_is_4096():
    """Rule: text() with no limit still caps a value at 4096 characters."""
    assert text()("x" * 4096) == "x" * 4096
    assert expected(text(), "x" * 4097) == "at most 4096 characters"


# -- integer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, value", [("1", 1), ("10", 10), (" 7 ", 7), ("+3", 3), ("0005", 5)])
def test_integer_accepts_the_bounds_and_strips_spaces(raw, value):
    """Rule: integer(lo, hi) accepts lo..hi inclusive, surrounding spaces ignored."""
    assert integer(1, 10)(raw) == value


@pytest.mark.parametrize("raw", ["0", "11", "-1", "", "1.0", "one", "1e1", "0x5"])
def test_integer_refuses_outside_or_not_an_integer(raw):
    """Rule: lo - 1, hi + 1, and anything not a base-10 integer are refused, naming the range."""
    assert expected(integer(1, 10), raw) == "an integer from 1 to 10"


def test_integer_with_zero_and_negative_bounds():
    """Rule: the bounds are the factory's, including 0 and negatives."""
    assert integer(0, 0)("0") == 0
    assert integer(-5, -1)("-5") == -5 and integer(-5, -1)("-1") == -1
    assert expected(integer(-5, -1), "0") == "an integer from -5 to -1"
    assert expected(integer(-5, -1), "-6") == "an integer from -5 to -1"


# -- number -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, value", [("0", 0.0), ("1", 1.0), ("0.5", 0.5), (" 1e-3 ", 0.001), ("-0", 0.0)])
def test_number_closed_range_accepts_its_bounds(raw, value):
    """Rule: number(lo, hi) accepts lo and hi themselves."""
    assert number(0, 1)(raw) == value


@pytest.mark.parametrize("raw", ["-0.001", "1.001", "nan", "NaN", "inf", "-inf", "", "x", "1,5"])
def test_number_closed_range_refuses(raw):
    """Rule: just outside either bound, NaN, infinities and non-numbers are refused."""
    assert expected(number(0, 1), raw) == "a number from 0 to 1"


def test_number_with_an_open_lower_bound():
    """Rule: lo_open refuses lo itself (and below) but takes anything above it, up to hi."""
    parse = number(0, 1, lo_open=True)
    assert expected(parse, "0") == "a number greater than 0 to 1"
    assert expected(parse, "-0.5") == "a number greater than 0 to 1"
    assert parse("1e-9") == 1e-9 and parse("1") == 1.0
    assert expected(parse, "1.5") == "a number greater than 0 to 1"


def test_number_open_bound_away_from_zero():
    """Rule: the open bound is lo, whatever lo is."""
    parse = number(2, 5, lo_open=True)
    assert expected(parse, "2") == "a number greater than 2 to 5"
    assert parse("2.01") == 2.01 and parse("5") == 5.0


def test_number_names_its_unit_and_formats_bounds_compactly():
    """Rule: the expectation reads 'a number from LO to HI UNIT' with %g bounds (0.05, 3600)."""
    parse = number(0.05, 3600, unit="seconds")
    assert parse("0.05") == 0.05 and parse("3600") == 3600.0
    assert expected(parse, "0.049") == "a number from 0.05 to 3600 seconds"
    assert expected(parse, "3600.5") == "a number from 0.05 to 3600 seconds"
    assert expected(number(-1, 86400, unit="seconds"), "-2") == "a number from -1 to 86400 seconds"


def test_number_nan_is_refused_even_in_an_unbounded_range():
    """Rule: NaN compares false with every bound, so it is refused explicitly."""
    parse = number(-math.inf, math.inf)
    assert parse("1e300") == 1e300
    assert expected(parse, "nan") == "a number from -inf to inf"


# -- flag -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["1", "true", "yes", "on", "TRUE", " Yes ", "On"])
def test_flag_true_words(raw):
    """Rule: 1, true, yes, on (any case, spaces ignored) are true."""
    assert flag(raw) is True


@pytest.mark.parametrize("raw", ["0", "false", "no", "off", "", "  ", "FALSE", " Off"])
def test_flag_false_words(raw):
    """Rule: 0, false, no, off and empty (any case, spaces ignored) are false."""
    assert flag(raw) is False


@pytest.mark.parametrize("raw", ["2", "y", "n", "enable", "truee", "-1"])
def test_flag_refuses_anything_else(raw):
    """Rule: any other word is refused, listing the accepted ones."""
    assert expected(flag, raw) == "one of 1, 0, true, false, yes, no, on, off"


# -- choice -----------------------------------------------------------------------------------------


def test_choice_is_case_and_space_insensitive_and_returns_the_option():
    """Rule: choice() lowercases and strips, then returns the matching option."""
    parse = choice("poll", "stream")
    assert parse("poll") == "poll" and parse(" STREAM ") == "stream" and parse("Poll") == "poll"


@pytest.mark.parametrize("raw", ["", "polls", "pol", "push", "poll,stream"])
def test_choice_refuses_anything_else_listing_the_options_in_order(raw):
    """Rule: anything else is refused, naming the options in their declared order."""
    assert expected(choice("poll", "stream"), raw) == "one of poll, stream"


# -- host_port and parse_host_port --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, parts",
    [
        ("h:1", ("h", 1)),
        ("h:65535", ("h", 65535)),
        ("10.0.0.5:50051", ("10.0.0.5", 50051)),
        ("my-host.example.com:443", ("my-host.example.com", 443)),
        ("Web-1.Example.COM:443", ("Web-1.Example.COM", 443)),
        ("[::1]:80", ("::1", 80)),
        ("[2001:db8::5]:8080", ("2001:db8::5", 8080)),
        ("0.0.0.0:00080", ("0.0.0.0", 80)),
        ("h" * 253 + ":1", ("h" * 253, 1)),
    ],
)
def test_parse_host_port_accepts(raw, parts):
    """Rule: host:port with a port from 1 to 65535 and a host of 1 to 253 of letters, digits, '.',
    '-'; an IPv6 host in brackets. Returns (host without brackets, port)."""
    assert parse_host_port(raw) == parts


@pytest.mark.parametrize(
    "raw",
    [
        "h:0",
        "h:65536",
        "h:",
        ":80",
        "h",
        "",
        "h:-1",
        "h:+80",
        "h: 80",
        "h:8o",
        "a:b:80",  # a bare IPv6-ish host without brackets
        "::1:80",
        "[::1]80",
        "[::1]",
        "[zz::1]:80",
        "[1.2.3.4]:80",
        "[]:80",
        "h h:80",
        "h_1:80",
        "hé:80",
        "h/x:80",
        "h" * 254 + ":1",
    ],
)
def test_parse_host_port_refuses(raw):
    """Rule: port 0 or 65536, a missing or signed port, a missing host, an unbracketed ':' in the
    host, a bracketed non-IPv6, another character in the host, or a 254-character host."""
    assert expected(parse_host_port, raw) == HOST_PORT


def test_host_port_setting_strips_and_returns_the_text():
    """Rule: the host_port() setting strips spaces and keeps the text (not the split parts)."""
    assert host_port()(" 10.0.0.5:9 ") == "10.0.0.5:9"
    assert host_port(optional=True)("[::1]:5") == "[::1]:5"


def test_host_port_empty_only_when_optional():
    """Rule: empty (or only spaces) is '' for an optional address, refused for a required one."""
    assert host_port(optional=True)("") == "" and host_port(optional=True)("   ") == ""
    assert expected(host_port(), "") == HOST_PORT
    assert expected(host_port(optional=True), "nope") == HOST_PORT


# -- csv_list -----------------------------------------------------------------------------------------


def test_csv_list_strips_items_and_drops_empty_ones():
    """Rule: comma-separated, each item stripped, empty items dropped, order kept."""
    assert csv_list()(" a , b,,c ,") == ("a", "b", "c")
    assert csv_list()("") == () and csv_list()(" , ,") == ()


def test_csv_list_counts_only_real_items_against_the_limit():
    """Rule: at most max_items items (empty ones not counted); one more is refused."""
    parse = csv_list(max_items=3)
    assert parse("a,b,c") == ("a", "b", "c")
    assert parse("a,,b,,c,,") == ("a", "b", "c")
    assert expected(parse, "a,b,c,d") == "at most 3 comma-separated items"


def test_csv_list_default_limit_is_256():
    """Rule: the default limit is 256 items."""
    assert len(csv_list()(",".join(["x"] * 256))) == 256
    assert expected(csv_list(), ",".join(["x"] * 257)) == "at most 256 comma-separated items"


def test_csv_list_checks_every_item_with_the_item_parser():
    """Rule: each item goes through the item parser; the first bad one refuses the list with
    the item parser's expectation. The parsed value is the stripped text."""
    parse = csv_list(text(3, allow_empty=False))
    assert parse("abc, de") == ("abc", "de")
    assert expected(parse, "abc, defg") == "at most 3 characters"
    assert expected(csv_list(integer(1, 2)), "1, 3") == "an integer from 1 to 2"


# -- shm_segment_name ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["a", "helix-metrics", "A1._-z", "9" + "x" * 200])
def test_segment_names_accepted(raw):
    """Rule: 1 to 201 of letters, digits, '.', '_', '-', starting with a letter or digit."""
    assert shm_segment_name(raw) == raw


@pytest.mark.parametrize("raw", ["", "9" + "x" * 201, "a/b", "/a", ".a", "-a", "_a", "a b", "é"])
def test_segment_names_refused(raw):
    """Rule: empty, 202 characters, a '/', a leading '.', '-' or '_', or another character."""
    assert expected(shm_segment_name, raw) == (
        "a segment name of letters, digits, '.', '_' or '-' (no '/'), 1 to 201 characters"
    )


# -- cpu_source_spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, value",
    [
        ("host", "host"),
        (" host ", "host"),
        ("tree:1", "tree:1"),
        ("tree:4242", "tree:4242"),
        ("cgroup:/", "cgroup:/"),
        ("cgroup:/sys/fs/cgroup/app.slice", "cgroup:/sys/fs/cgroup/app.slice"),
    ],
)
def test_cpu_sources_accepted(raw, value):
    """Rule: 'host', 'tree:<pid>' with a pid > 0, or 'cgroup:<absolute path>'; spaces stripped."""
    assert cpu_source_spec(raw) == value


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "HOST",
        "hosts",
        "tree:",
        "tree:0",
        "tree:-1",
        "tree:x",
        "tree:1.5",
        "cgroup:",
        "cgroup:rel/path",
        "tree 1",
        "cgroup/",
    ],
)
def test_cpu_sources_refused(raw):
    """Rule: pid 0, no pid, a relative cgroup path, or another word is refused."""
    assert expected(cpu_source_spec, raw) == "'host', 'tree:<pid>' or 'cgroup:<absolute path>'"


# -- app_check_spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, value",
    [
        ("", ""),
        ("   ", ""),
        ("http://ab", "http://ab"),
        ("https://a", "https://a"),
        (" http://127.0.0.1:8080/health ", "http://127.0.0.1:8080/health"),
        ("tcp://127.0.0.1:8080", "tcp://127.0.0.1:8080"),
        ("tcp://[::1]:80", "tcp://[::1]:80"),
        ("process:nginx", "process:nginx"),
        ("process:x", "process:x"),
    ],
)
def test_app_checks_accepted(raw, value):
    """Rule: empty, http(s):// with something after the scheme, tcp://host:port, or
    process:NAME; spaces stripped."""
    assert app_check_spec(raw) == value


@pytest.mark.parametrize("raw", ["http://", "https://", "ftp://x", "HTTP://x", "process:", "nginx", "tcp:/h:80"])
def test_app_checks_refused(raw):
    """Rule: a bare scheme, another scheme, an empty process name, or a plain word is refused."""
    assert expected(app_check_spec, raw) == "empty, 'http(s)://…', 'tcp://host:port' or 'process:NAME'"


@pytest.mark.parametrize("raw", ["tcp://", "tcp://h", "tcp://h:0", "tcp://h:65536"])
def test_a_tcp_check_needs_a_real_host_and_port(raw):
    """Rule: tcp:// is followed by a valid host:port, or it is refused with host:port's expectation."""
    assert expected(app_check_spec, raw) == HOST_PORT


# -- label_pairs -------------------------------------------------------------------------------------------


def test_label_pairs_parse_and_strip():
    """Rule: comma-separated key=value pairs; keys and values stripped; the value may be empty
    or hold '='; empty parts are skipped; a later key wins."""
    assert label_pairs("") == {} and label_pairs(" , ,") == {}
    assert label_pairs(" zone = us-east-1a , rack=r1,") == {"zone": "us-east-1a", "rack": "r1"}
    assert label_pairs("a=,b=x=y") == {"a": "", "b": "x=y"}
    assert label_pairs("a=1,a=2") == {"a": "2"}
    assert label_pairs("a=1,,b=2, ,c=3") == {"a": "1", "b": "2", "c": "3"}  # an empty part mid-list


@pytest.mark.parametrize("raw", ["zone", "a=1,b", "=x", " =x", "a=1, =2"])
def test_label_pairs_refuse_a_part_without_key_or_equals(raw):
    """Rule: every non-empty part needs '=' and a non-blank key."""
    assert expected(label_pairs, raw) == "comma-separated key=value pairs"


# -- a trailing newline (the patterns once ended in `$`, which matches before one) -------------------


@pytest.mark.parametrize("parse, raw", [(parse_host_port, "h\n:80"), (shm_segment_name, "seg\n")])
def test_a_trailing_newline_is_refused(parse, raw):
    """Rule: a host or segment name never ends in a newline (was accepted: `$` matched before it)."""
    expected(parse, raw)


def test_a_port_is_ascii_digits_and_a_url_has_a_host():
    """Rule: 'h:٨٠' (Arabic-Indic digits) is not port 80; 'https://' alone is no URL (was accepted)."""
    assert expected(parse_host_port, "h:\u0668\u0660") == "host:port with a port from 1 to 65535 (IPv6 as [addr]:port)"
    assert "http(s)" in expected(app_check_spec, "https://")
    assert app_check_spec("http://x") == "http://x"
