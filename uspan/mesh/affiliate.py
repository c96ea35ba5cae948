"""The affiliate each node publishes, its byte encoding, and what endpoints it announces.

The encoding is msgpack with a format version; the discovery package seals these bytes
under the cluster secret. Decoding is strict about what it knows (required keys, types,
sizes and counts), so anything another member could send that does not fit raises
``AffiliateDecodeError``, which the caller counts and ignores: one bad affiliate never
disturbs the others. Keys it does not know are skipped, as protobuf skips unknown fields
in KubeSpan's own data, so a newer member's additions never cut it off from older ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from uspan.mesh.config import KubeSpanConfig
from uspan.mesh.filters import EndpointFilters
from uspan.mesh.punch import PunchRequest
from uspan.wg.endpoint import Endpoint

FORMAT_VERSION = 1
MAX_ENCODED = 4096  # the discovery service keeps <= 2048 sealed bytes; this bounds decoding
MAX_ID = 256
MAX_NAME = 253
MAX_ITEMS = 64  # addresses, prefixes or endpoints; discovery keeps <= 64 endpoints
KEY_SIZE = 32

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AffiliateDecodeError(ValueError):
    """Bytes that are not a valid affiliate; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class KubeSpanInfo:
    public_key: bytes
    address: ipaddress.IPv6Address
    additional_prefixes: tuple[Network, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    punch: tuple[PunchRequest, ...] = ()  # hole punching (uspan.mesh.punch)


@dataclass(frozen=True, slots=True)
class Affiliate:
    """A cluster member as discovery knows it; ``kubespan`` is None without KubeSpan."""

    node_id: str
    hostname: str
    nodename: str
    addresses: tuple[Address, ...] = ()
    kubespan: KubeSpanInfo | None = None


# Encoding ----------------------------------------------------------------------------------


def encode_endpoint(endpoint: Endpoint) -> bytes:
    """Packed IP then big-endian port: 6 bytes for IPv4, 18 for IPv6."""
    return endpoint.ip_key() + endpoint.port.to_bytes(2, "big")


def decode_endpoint(data: bytes) -> Endpoint:
    """An endpoint blob back; AffiliateDecodeError for anything we could not send to."""
    if len(data) not in (6, 18):
        raise AffiliateDecodeError(f"endpoint must be 6 or 18 bytes, got {len(data)}")
    port = int.from_bytes(data[-2:], "big")
    if port == 0:
        raise AffiliateDecodeError("endpoint port 0")
    address = ipaddress.ip_address(data[:-2])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # as Endpoint.parse does: one form per endpoint
    if address.is_unspecified or address.is_multicast:
        raise AffiliateDecodeError(f"endpoint {address} is not a unicast address")
    return Endpoint(str(address), port)


def encode_affiliate(affiliate: Affiliate) -> bytes:
    kubespan = affiliate.kubespan
    document: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "id": affiliate.node_id,
        "hostname": affiliate.hostname,
        "nodename": affiliate.nodename,
        "addresses": [address.packed for address in affiliate.addresses],
        "kubespan": None
        if kubespan is None
        else {
            "key": kubespan.public_key,
            "address": kubespan.address.packed,
            "prefixes": [
                [p.network_address.packed, p.prefixlen] for p in kubespan.additional_prefixes
            ],
            "endpoints": [encode_endpoint(endpoint) for endpoint in kubespan.endpoints],
        },
    }
    if kubespan is not None and kubespan.punch:  # only then: earlier uspan refused the key
        document["kubespan"]["punch"] = [
            [r.peer_key, encode_endpoint(r.endpoint), r.seq] for r in kubespan.punch]
    data: bytes = msgpack.packb(document, use_bin_type=True)
    return data


def decode_affiliate(data: bytes, affiliate_id: str | None = None) -> Affiliate:
    """Strictly decode ``encode_affiliate``'s bytes; AffiliateDecodeError otherwise.

    With ``affiliate_id`` (the ID discovery stores the data under), the data must name
    that same node: sealed data copied to another affiliate entry is refused.
    """
    if len(data) > MAX_ENCODED:
        raise AffiliateDecodeError(f"{len(data)} bytes, more than {MAX_ENCODED}")
    try:
        document = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise AffiliateDecodeError(f"not msgpack ({exc})") from exc
    root = _fields(
        document, "affiliate", {"v", "id", "hostname", "nodename", "addresses", "kubespan"}
    )
    if root["v"] != FORMAT_VERSION or isinstance(root["v"], bool):
        raise AffiliateDecodeError(f"unsupported format version {root['v']!r}")
    node_id = _text(root["id"], "id", MAX_ID)
    if not node_id:
        raise AffiliateDecodeError("id: empty")
    if affiliate_id is not None and node_id != affiliate_id:
        raise AffiliateDecodeError(f"id: {node_id!r} stored under affiliate {affiliate_id!r}")
    addresses = tuple(
        _address(item, "addresses") for item in _items(root["addresses"], "addresses")
    )
    return Affiliate(
        node_id=node_id,
        hostname=_text(root["hostname"], "hostname", MAX_NAME),
        nodename=_text(root["nodename"], "nodename", MAX_NAME),
        addresses=addresses,
        kubespan=None if root["kubespan"] is None else _kubespan(root["kubespan"]),
    )


def _kubespan(value: object) -> KubeSpanInfo:
    info = _fields(value, "kubespan", {"key", "address", "prefixes", "endpoints"})
    key = info["key"]
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise AffiliateDecodeError(f"kubespan.key: expected {KEY_SIZE} bytes")
    address = _address(info["address"], "kubespan.address")
    if not isinstance(address, ipaddress.IPv6Address):
        raise AffiliateDecodeError("kubespan.address: expected an IPv6 address")
    prefixes = []
    for item in _items(info["prefixes"], "kubespan.prefixes"):
        if not (isinstance(item, list) and len(item) == 2):
            raise AffiliateDecodeError("kubespan.prefixes: expected [address, length] pairs")
        network_address, length = _address(item[0], "kubespan.prefixes"), item[1]
        if isinstance(length, bool) or not isinstance(length, int):
            raise AffiliateDecodeError("kubespan.prefixes: length is not an integer")
        try:
            prefixes.append(ipaddress.ip_network((network_address, length), strict=True))
        except ValueError as exc:
            raise AffiliateDecodeError(f"kubespan.prefixes: {exc}") from exc
    endpoints = []
    for item in _items(info["endpoints"], "kubespan.endpoints"):
        if not isinstance(item, bytes):
            raise AffiliateDecodeError("kubespan.endpoints: expected bytes")
        endpoints.append(decode_endpoint(item))
    punch = []
    for item in _items(info.get("punch", []), "kubespan.punch"):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], bytes)
                and len(item[0]) == KEY_SIZE and isinstance(item[1], bytes)
                and isinstance(item[2], int) and not isinstance(item[2], bool)
                and 0 <= item[2] < 1 << 64):
            raise AffiliateDecodeError("kubespan.punch: expected [key, endpoint, seq] items")
        punch.append(PunchRequest(item[0], decode_endpoint(item[1]), item[2]))
    return KubeSpanInfo(key, address, tuple(prefixes), tuple(endpoints), tuple(punch))


def _fields(value: object, name: str, keys: set[str]) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise AffiliateDecodeError(f"{name}: expected a map")
    if not keys <= set(value):
        raise AffiliateDecodeError(f"{name}: missing {sorted(keys - set(value))}")
    if len(value) > MAX_ITEMS:
        raise AffiliateDecodeError(f"{name}: {len(value)} keys, more than {MAX_ITEMS}")
    return value


def _items(value: object, name: str) -> list[object]:
    if not isinstance(value, list):
        raise AffiliateDecodeError(f"{name}: expected a list")
    if len(value) > MAX_ITEMS:
        raise AffiliateDecodeError(f"{name}: {len(value)} items, more than {MAX_ITEMS}")
    return value


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise AffiliateDecodeError(f"{name}: expected a string")
    if len(value) > limit or not value.isprintable():
        raise AffiliateDecodeError(f"{name}: longer than {limit} or not printable")
    return value


def _address(value: object, name: str) -> Address:
    if not isinstance(value, bytes) or len(value) not in (4, 16):
        raise AffiliateDecodeError(f"{name}: expected 4 or 16 address bytes")
    return ipaddress.ip_address(value)


# What to publish ---------------------------------------------------------------------------


def publishable_addresses(
    addresses: Iterable[Address], kubespan_subnet: ipaddress.IPv6Network | None
) -> tuple[Address, ...]:
    """Node addresses others can route to: no loopback, link-local, multicast, KubeSpan's."""
    seen: dict[Address, None] = {}
    for address in addresses:
        if (
            address.is_loopback
            or address.is_link_local
            or address.is_multicast
            or address.is_unspecified
            or (kubespan_subnet is not None and address in kubespan_subnet)
        ):
            continue
        seen.setdefault(address, None)
    return tuple(seen)[:MAX_ITEMS]


def publishable_endpoints(
    addresses: Iterable[Address],
    port: int,
    advertise: Iterable[Endpoint],
    filters: EndpointFilters,
    reflexive: Iterable[Endpoint] = (),
) -> tuple[Endpoint, ...]:
    """The node's addresses on the KubeSpan port, then its reflexive endpoints (where the
    discovery services see it: its NAT's mapping), then extra announced endpoints.

    Every endpoint, announced ones included, must pass the filters; duplicates are dropped
    and at most 64 kept, the discovery service's limit per affiliate.
    """
    candidates = [Endpoint(str(address), port) for address in addresses]
    candidates.extend(endpoint.without_source() for endpoint in (*reflexive, *advertise))
    seen: dict[Endpoint, None] = {}
    for endpoint in candidates:
        if filters.allows(ipaddress.ip_address(endpoint.host.split("%", 1)[0])):
            seen.setdefault(endpoint, None)
    return tuple(seen)[:MAX_ITEMS]


def local_affiliate(
    *,
    node_id: str,
    hostname: str,
    nodename: str,
    addresses: Iterable[Address],
    kubespan: KubeSpanConfig,
    public_key: bytes,
    kubespan_address: ipaddress.IPv6Address,
    additional_prefixes: Iterable[Network] = (),
    reflexive: Iterable[Endpoint] = (),
    punch: Iterable[PunchRequest] = (),
) -> Affiliate:
    """This node's affiliate: its routable addresses, and KubeSpan's part when enabled."""
    subnet = ipaddress.IPv6Network((kubespan_address, 64), strict=False)
    node_addresses = publishable_addresses(addresses, subnet)
    if not kubespan.enabled:
        return Affiliate(node_id, hostname, nodename, node_addresses)
    endpoints = publishable_endpoints(
        node_addresses, kubespan.port, kubespan.advertise_endpoints, kubespan.filters,
        reflexive,
    )
    info = KubeSpanInfo(public_key, kubespan_address, tuple(additional_prefixes), endpoints,
                        tuple(punch)[:MAX_ITEMS])
    return Affiliate(node_id, hostname, nodename, node_addresses, info)
