"""IP prefixes as ints: parsed as wireguard-go parses ``allowed_ip``, shown as it shows them.

The accepted and refused forms are what both wireguard-go builds (0.0.20220316 and
0.0.20250522) answered to ``set=1`` with that ``allowed_ip``, and the text is what their
``get=1`` then reported."""

from __future__ import annotations

import errno
import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uspan.wg import prefix
from uspan.wg.config import ConfigError
from uspan.wg.uapi import parse_set

ACCEPTED = [
    ("10.1.2.3/8", "10.0.0.0/8"),  # host bits masked off
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("FD00::1/64", "fd00::/64"),
    ("fd00:0000::/16", "fd00::/16"),
    ("::ffff:10.0.0.1/128", "::ffff:10.0.0.1/128"),
    ("::ffff:10.0.0.1/96", "::ffff:0.0.0.0/96"),
    ("::10.0.0.1/128", "::a00:1/128"),  # not inet_ntop's ::10.0.0.1
    ("::a00:1/128", "::a00:1/128"),
    ("::1:0/128", "::1:0/128"),
    ("fd00::1.2.3.4/128", "fd00::102:304/128"),
]

# A length only in canonical decimal, as Go's netip.ParsePrefix since Go 1.22: a sign or
# leading zeros (which old builds took, making 10.0.0.0/-0 the catch-all) are refused.
REFUSED = ["10.0.0.0/00", "10.0.0.0/032", "10.0.0.0/+8", "10.0.0.0/-0", "10.0.0.0/+0",
           "10.0.0.0/00000008", "fd00::/0128", "fd00::/+128", "f00::/-0", "fe80::/+0",
           "010.0.0.0/8", "10.0.0.00/8", "10.0.0.256/32", "1.2.3/24", "10.0.0.0/33",
           "fd00::1/129", "fe80::1%eth0/64", "10.0.0.0", "10.0.0.0/", "/8", "10.0.0.0/ 8",
           " 10.0.0.0/8", "10.0.0.0/8 ", "10.0.0.0/-1", "10.0.0.0/+-8", "10.0.0.0/\u0668",
           "10.0.0.0/8_", "10.0.0.0/0x8", "1::2::3/64", "[fd00::]/64", "fd00::/1_0",
           "10.0.0.0/255.0.0.0", "10.0.0.0/+", "10.0.0.0/-", "1.2.3.4\x00/32", "\u0661.2.3.4/32",
           "10.0.0.0/" + "0" * 5000 + "1" * 5000]


@pytest.mark.parametrize(("text", "shown"), ACCEPTED)
def test_accepted_and_shown_as_wireguard_go_shows(text: str, shown: str) -> None:
    parsed = prefix.parse(text)
    assert prefix.texts([parsed]) == [shown]
    assert parsed == prefix.of(ipaddress.ip_network(shown))


@pytest.mark.parametrize("text", REFUSED)
def test_refused(text: str) -> None:
    with pytest.raises(ValueError):
        prefix.parse(text)
    with pytest.raises(ConfigError) as info:  # the UAPI's reply: errno=-22
        parse_set(["public_key=" + "ab" * 32, f"allowed_ip={text}"])
    assert info.value.field == "allowed_ip" and info.value.errno == errno.EINVAL
    with pytest.raises(ConfigError):
        parse_set(["public_key=" + "ab" * 32, f"allowed_ip=-{text}"])


def test_a_cached_head_does_not_make_a_bad_last_octet_good() -> None:
    assert prefix.texts([prefix.parse("10.7.7.1/32")]) == ["10.7.7.1/32"]
    for bad in ("10.7.7.01/32", "10.7.7.256/32", "10.7.7./32", "10.7.7.1.1/32"):
        with pytest.raises(ValueError):
            prefix.parse(bad)


@given(st.integers(0, (1 << 32) - 1), st.integers(0, 32))
def test_ipv4_matches_ipaddress(number: int, length: int) -> None:
    network = ipaddress.IPv4Network((number, length), strict=False)
    text = f"{ipaddress.IPv4Address(number)}/{length}"
    assert prefix.parse(text) == prefix.of(network)
    assert prefix.texts([prefix.parse(text)]) == [str(network)]
    assert prefix.network(prefix.parse(text)) == network


@given(st.integers(0, (1 << 128) - 1) | st.integers(0, 1 << 40), st.integers(0, 128))
def test_ipv6_matches_ipaddress(number: int, length: int) -> None:
    network = ipaddress.IPv6Network((number, length), strict=False)
    text = f"{ipaddress.IPv6Address(number)}/{length}"
    assert prefix.parse(text) == prefix.of(network)
    assert prefix.network(prefix.parse(text)) == network
    shown = prefix.texts([prefix.parse(text)])[0]
    assert ipaddress.IPv6Network(shown) == network
    if not network.network_address.ipv4_mapped:  # Go: ::ffff:1.2.3.4, Python: ::ffff:102:304
        assert shown == str(network)


def test_families_and_lengths_are_distinct() -> None:
    texts = ["0.0.0.0/0", "::/0", "0.0.0.0/32", "::/32", "::/128", "10.0.0.0/8", "10.0.0.0/9"]
    assert len({prefix.parse(text) for text in texts}) == len(texts)


def test_compiled_scan_is_used_when_required() -> None:
    """CI sets USPAN_REQUIRE_COMPILED=1 (scripts/test): a silent fallback fails here."""
    if os.environ.get("USPAN_REQUIRE_COMPILED") != "1":
        pytest.skip("USPAN_REQUIRE_COMPILED is not set")
    assert prefix.COMPILED, "uspan.wg._prefix did not build or import"


# Each way a line can be almost an IPv4 allowed_ip line (one part replaced by a bad one).
_BAD = {
    "head": ["allowed_ip", "allowed_ip=--", "public_key=", "", "allowed_ip =", "ALLOWED_IP="],
    "octet": ["256", "300", "01", "00", "000", "1000", "", "-", "+1", "\u0661", "a", " 1", "1 "],
    "dots": ["1.2.3", "1.2.3.4.5", "1..2.3"],
    "length": ["33", "032", "00", "", "3.2", "99", "-0", "+8", "8 ", "\u0668"],
    "end": ["\r\n", "", "/8\n", "\x00\n", " \n"],
}


@st.composite
def near_lines(draw: st.DrawFn) -> str:
    """A line ``scan`` reads, often with one part made bad."""
    head = draw(st.sampled_from(["allowed_ip=", "allowed_ip=-"]))
    octets = [str(draw(st.integers(0, 255))) for _ in range(4)]
    length, end = str(draw(st.integers(0, 32))), "\n"
    address = ".".join(octets)
    bad = draw(st.sampled_from([None, None, *_BAD]))
    if bad == "head":
        head = draw(st.sampled_from(_BAD["head"]))
    elif bad == "octet":
        octets[draw(st.integers(0, 3))] = draw(st.sampled_from(_BAD["octet"]))
        address = ".".join(octets)
    elif bad == "dots":
        address = draw(st.sampled_from(_BAD["dots"]))
    elif bad == "length":
        length = draw(st.sampled_from(_BAD["length"]))
    elif bad == "end":
        end = draw(st.sampled_from(_BAD["end"]))
    return f"{head}{address}/{length}{end}"


@settings(max_examples=300)
@given(st.lists(near_lines() | st.text(max_size=30).map(lambda text: text + "\n"), max_size=12),
       st.integers(1, 20))
def test_scan_in_c_and_in_python_agree(lines: list[str], limit: int) -> None:
    _prefix = pytest.importorskip("uspan.wg._prefix")  # (else scan is scan_py)
    data = "".join(lines).encode()
    starts = [0, *(index + 1 for index, byte in enumerate(data) if byte == ord("\n"))]
    for pos in starts:
        for key in (b"allowed_ip=", b"allowed_ip=-"):
            expected = prefix.scan_py(data, pos, limit, key)
            assert _prefix.scan(data, pos, limit, key) == expected
            assert _prefix.scan(bytearray(data), pos, limit, key) == expected


@given(st.integers(0, (1 << 32) - 1), st.integers(0, 32))
def test_scan_reads_what_parse_parses(number: int, length: int) -> None:
    text = f"{ipaddress.IPv4Address(number)}/{length}"
    data = f"public_key=x\nallowed_ip={text}\nallowed_ip=-{text}\n".encode()
    assert prefix.scan(data, 13, 5, b"allowed_ip=") == ([prefix.parse(text)], 14 + len(text) + 11)
    assert prefix.scan(data, 0, 5, b"allowed_ip=") == ([], 0)
