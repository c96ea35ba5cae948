import ipaddress

import pytest

from uspan.mesh.address import (
    Link,
    cluster_subnet,
    first_physical_mac,
    interface_id,
    node_address,
)

NOTES_ID = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
KEY = bytes(range(32))


def test_subnet_matches_the_notes_example() -> None:
    assert cluster_subnet(NOTES_ID) == ipaddress.IPv6Network("fd7f:175a:b97c:5602::/64")


def test_id_is_hashed_as_the_string_it_is() -> None:
    standard = NOTES_ID.replace("_", "/").replace("-", "+")
    assert cluster_subnet(standard) != cluster_subnet(NOTES_ID)


def test_modified_eui64_of_the_mac() -> None:
    subnet = cluster_subnet(NOTES_ID)
    mac = bytes.fromhex("0a1b2c3d4e5f")
    address = node_address(subnet, mac, KEY)
    assert address == ipaddress.IPv6Address("fd7f:175a:b97c:5602:81b:2cff:fe3d:4e5f")
    assert address in subnet


def test_fallback_without_mac_is_stable_and_local() -> None:
    subnet = cluster_subnet(NOTES_ID)
    first = node_address(subnet, None, KEY)
    assert first == node_address(subnet, None, KEY)
    assert first != node_address(subnet, None, bytes(32))
    assert first in subnet
    assert interface_id(None, KEY)[0] & 0x02 == 0


def test_bad_mac_length() -> None:
    with pytest.raises(ValueError, match="6 bytes"):
        interface_id(b"\x01\x02", KEY)


def test_first_physical_link_in_name_order() -> None:
    links = [
        Link("eth1", bytes.fromhex("020000000001"), True),
        Link("docker0", bytes.fromhex("020000000009"), False),
        Link("eth0", bytes.fromhex("020000000000"), True),
        Link("bond0", None, True),
        Link("dummy", bytes(6), True),
    ]
    assert first_physical_mac(links) == bytes.fromhex("020000000000")
    assert first_physical_mac([Link("lo", None, False)]) is None


def test_talos_published_vector() -> None:
    """The MAC and address from Talos's own identity test."""
    subnet = cluster_subnet(NOTES_ID)
    address = node_address(subnet, bytes.fromhex("ea711bb2ccee"), KEY)
    assert address == ipaddress.IPv6Address("fd7f:175a:b97c:5602:e871:1bff:feb2:ccee")
