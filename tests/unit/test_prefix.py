"""IP prefixes as ints: parsed as wireguard-go parses ``allowed_ip``, shown as it shows them.

The accepted and refused forms are what both wireguard-go builds (0.0.20220316 and
0.0.20250522) answered to ``set=1`` with that ``allowed_ip``, and the text is what their
``get=1`` then reported."""

from __future__ import annotations

import errno
import ipaddress

import pytest
from hypothesis import given
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
