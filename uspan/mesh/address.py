"""KubeSpan subnet and node address, derived exactly as Talos does.

The subnet comes from the cluster ID alone, so every node computes the same one; the node
address is the subnet plus the modified EUI-64 of the MAC of the first physical link. When
a node has no MAC (containers, some tunnels), the interface ID is taken from SHA-256 of its
WireGuard public key instead: persisted with the key, so it is stable across restarts, and
with the EUI-64 universal/local bit cleared to mark it as locally assigned.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

PURPOSE_KUBESPAN = 0x02


@dataclass(frozen=True, slots=True)
class Link:
    """A network link as the shell sees it: only what address derivation needs."""

    name: str
    mac: bytes | None
    physical: bool


def cluster_subnet(cluster_id: str) -> ipaddress.IPv6Network:
    """The cluster's /64: SHA-256 of the ID string, bytes 16..31, fd prefix, purpose 0x02."""
    prefix = bytearray(hashlib.sha256(cluster_id.encode()).digest()[16:32])
    prefix[0] = 0xFD
    prefix[7] = PURPOSE_KUBESPAN
    return ipaddress.IPv6Network((bytes(prefix[:8]) + bytes(8), 64))


def first_physical_mac(links: Iterable[Link]) -> bytes | None:
    """The MAC of the first physical link in name order, as Talos picks it."""
    for link in sorted(links, key=lambda link: link.name):
        if link.physical and link.mac is not None and len(link.mac) == 6 and any(link.mac):
            return link.mac
    return None


def interface_id(mac: bytes | None, public_key: bytes) -> bytes:
    """The low 64 bits: modified EUI-64 of the MAC, or the public-key fallback."""
    if mac is not None:
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return bytes([mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]])
    digest = bytearray(hashlib.sha256(b"uspan kubespan address\x00" + public_key).digest()[:8])
    digest[0] &= ~0x02 & 0xFF
    return bytes(digest)


def node_address(
    subnet: ipaddress.IPv6Network, mac: bytes | None, public_key: bytes
) -> ipaddress.IPv6Address:
    """This node's KubeSpan address (a /128 in peers' allowed IPs, a /64 on the link)."""
    return ipaddress.IPv6Address(subnet.network_address.packed[:8] + interface_id(mac, public_key))
