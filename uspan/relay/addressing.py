"""Relay addresses, and the pseudo-endpoints that stand for them in the WireGuard core.

A node's relay address is 8 bytes: ``HMAC-SHA256(K, WireGuard public key)[0:8]`` with
``K = HKDF(cluster secret, "uspan relay address v1" 0x00 || cluster ID)``. Every member
computes every peer's address from what it already knows, and the relay learns neither
the public keys nor anything discovery holds.

The core only knows endpoints. A relayed peer's endpoint is a pseudo-endpoint: the IPv6
address ``100::/64`` + the peer's relay address (RFC 6666's discard-only prefix, never a
real destination) and the relay's port. The core treats it as any endpoint (it sends to
it, and roams to it when the peer's datagrams arrive through the relay); the node's shell
turns datagrams for it into relay frames, and relayed datagrams into datagrams from it.
When the peer's datagrams later arrive directly, the core roams to the real endpoint, as
WireGuard does, and the relay is out of the path without a lost packet.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from uspan.discovery.seal import derive_key
from uspan.relay.frames import ADDRESS
from uspan.wg.endpoint import Endpoint

_PREFIX = bytes.fromhex("0100000000000000")  # 100::/64


class RelayAddresses:
    """The relay addresses of one cluster's members."""

    def __init__(self, cluster_secret: bytes, cluster_id: str) -> None:
        self._key = derive_key(cluster_secret, b"uspan relay address v1\x00" + cluster_id.encode())
        self._cache: dict[bytes, bytes] = {}

    def of(self, public_key: bytes) -> bytes:
        address = self._cache.get(public_key)
        if address is None:
            address = hmac.new(self._key, public_key, hashlib.sha256).digest()[:ADDRESS]
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[public_key] = address
        return address


def pseudo_endpoint(address: bytes, relay: Endpoint) -> Endpoint:
    """The endpoint the core uses for a peer reached at ``address`` through ``relay``."""
    return Endpoint(str(ipaddress.IPv6Address(_PREFIX + address)), relay.port)


def is_relayed(endpoint: Endpoint) -> bool:
    return endpoint.discard_only


def relay_address(endpoint: Endpoint) -> bytes:
    """The relay address a pseudo-endpoint stands for."""
    return ipaddress.IPv6Address(endpoint.host).packed[len(_PREFIX):]


def describe(endpoint: Endpoint | None, relay: Endpoint | None) -> str | None:
    """How ``uspan get`` shows an endpoint: ``relay:HOST:PORT`` for a relayed one."""
    if endpoint is None:
        return None
    if relay is not None and is_relayed(endpoint):
        return f"relay:{relay}"
    return str(endpoint.without_source())
