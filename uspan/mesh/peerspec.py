"""Peer specs from affiliates, and the device configuration that makes them peers.

Every affiliate but ourselves that carries a KubeSpan key becomes a peer (Talos's rules):
ID = public key, label = nodename, allowed IPs = KubeSpan address /128 + node addresses as
host routes + additional prefixes, endpoints = advertised + observed by other members.
Affiliates are taken in node-ID order, and ranges already routed to an earlier peer are
removed from later ones with a warning: one address is never routed to two peers, and
the outcome does not depend on the order discovery delivered them in.

``plan_device_change`` turns specs into the same ``DeviceChange`` the UAPI produces,
touching only what changed: an endpoint is pushed only when the chosen one changes, so an
endpoint the core learned by roaming is kept; a known peer given a new endpoint also gets
a handshake at once, which proves the new path within a round trip.
"""

from __future__ import annotations

import base64
import bisect
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from uspan.mesh.affiliate import Affiliate, Network
from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.endpoint import Endpoint

PERSISTENT_KEEPALIVE = 25  # seconds


@dataclass(frozen=True, slots=True)
class PeerSpec:
    public_key: bytes
    affiliate_id: str
    label: str
    address: ipaddress.IPv6Address
    allowed_ips: tuple[Network, ...]
    endpoints: tuple[Endpoint, ...]

    @property
    def id(self) -> str:
        """The resource ID: the base64 public key, as WireGuard tools print it."""
        return base64.b64encode(self.public_key).decode()


def build_peer_specs(
    affiliates: Iterable[Affiliate],
    local_node_id: str,
    local_public_key: bytes,
    observed: Mapping[str, Sequence[Endpoint]],
) -> tuple[list[PeerSpec], list[str]]:
    """Peer specs (in node-ID order) and warnings to log.

    ``observed`` maps an affiliate's node ID to endpoints other members saw it use.
    """
    specs: list[PeerSpec] = []
    warnings: list[str] = []
    taken = _RoutedRanges()
    keys: dict[bytes, str] = {local_public_key: "this node"}
    for affiliate in sorted(affiliates, key=lambda a: a.node_id):
        kubespan = affiliate.kubespan
        if affiliate.node_id == local_node_id or kubespan is None:
            continue
        label = affiliate.nodename or affiliate.node_id
        if kubespan.public_key in keys:
            warnings.append(
                f"peer {label!r} (affiliate {affiliate.node_id}) ignored: its public key is "
                f"already used by {keys[kubespan.public_key]!r}"
            )
            continue
        keys[kubespan.public_key] = label
        wanted = [ipaddress.ip_network(kubespan.address)]
        wanted += [ipaddress.ip_network(address) for address in affiliate.addresses]
        wanted += kubespan.additional_prefixes
        allowed, overlaps = taken.subtract(_collapse(wanted))
        if overlaps:
            listed = ", ".join(f"{network} (peer {other!r})" for network, other in overlaps)
            warnings.append(f"peer {label!r}: removed allowed IPs overlapping {listed}")
        taken.add(allowed, label)
        endpoints = dict.fromkeys(kubespan.endpoints)
        endpoints.update(
            dict.fromkeys(e.without_source() for e in observed.get(affiliate.node_id, ()))
        )
        specs.append(
            PeerSpec(
                public_key=kubespan.public_key,
                affiliate_id=affiliate.node_id,
                label=label,
                address=kubespan.address,
                allowed_ips=tuple(allowed),
                endpoints=tuple(endpoints),
            )
        )
    return specs, warnings


def _collapse(networks: Iterable[Network]) -> list[Network]:
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


class _RoutedRanges:
    """Ranges already routed to a peer, pairwise disjoint, as sorted integer intervals.

    Disjoint intervals sorted by start are sorted by end too, so the ones overlapping a
    range are found by two bisections: building specs stays linear in the cluster size
    (about 0.3 s for 1024 nodes here, where comparing every pair took 13 s).
    """

    def __init__(self) -> None:
        # per IP version: starts, ends, and (network, label) in the same order
        self.starts: dict[int, list[int]] = {4: [], 6: []}
        self.ends: dict[int, list[int]] = {4: [], 6: []}
        self.items: dict[int, list[tuple[Network, str]]] = {4: [], 6: []}

    def overlapping(self, network: Network) -> list[tuple[Network, str]]:
        start, end = int(network.network_address), int(network.broadcast_address)
        version = network.version
        first = bisect.bisect_left(self.ends[version], start)
        last = bisect.bisect_right(self.starts[version], end)
        return self.items[version][first:last]

    def subtract(self, networks: list[Network]) -> tuple[list[Network], list[tuple[Network, str]]]:
        """``networks`` (collapsed) minus every routed range, and the ranges that overlapped."""
        remaining: list[Network] = []
        overlaps: list[tuple[Network, str]] = []
        for network in networks:
            pieces = [network]
            for other, label in self.overlapping(network):
                if (other, label) not in overlaps:
                    overlaps.append((other, label))
                pieces = [part for piece in pieces for part in _exclude(piece, other)]
            remaining.extend(pieces)
        return (_collapse(remaining) if overlaps else remaining), overlaps

    def add(self, networks: Iterable[Network], label: str) -> None:
        for network in networks:
            version, start = network.version, int(network.network_address)
            index = bisect.bisect_left(self.starts[version], start)
            self.starts[version].insert(index, start)
            self.ends[version].insert(index, int(network.broadcast_address))
            self.items[version].insert(index, (network, label))


def _exclude(network: Network, other: Network) -> Iterable[Network]:
    """``network`` minus ``other`` (prefixes overlap only by one containing the other)."""
    if not network.overlaps(other):
        return (network,)
    if network.subnet_of(other):  # type: ignore[arg-type]
        return ()
    return network.address_exclude(other)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class AppliedPeer:
    """What the device was last told about a peer."""

    spec: PeerSpec
    preshared_key: bytes
    endpoint: Endpoint | None


def plan_device_change(
    specs: Sequence[PeerSpec],
    chosen: Mapping[bytes, Endpoint | None],
    applied: Mapping[bytes, AppliedPeer],
    preshared_key: bytes,
) -> tuple[DeviceChange, dict[bytes, AppliedPeer]]:
    """The change that brings the device from ``applied`` to ``specs``, and the new state.

    ``chosen`` is each peer's endpoint as cycling picked it (``PeerStatus.last_used``).
    An empty ``change.peers`` means there is nothing to apply.
    """
    change = DeviceChange()
    now_applied: dict[bytes, AppliedPeer] = {}
    for spec in specs:
        endpoint = chosen.get(spec.public_key)
        endpoint = None if endpoint is None else endpoint.without_source()
        before = applied.get(spec.public_key)
        peer = PeerChange(public_key=spec.public_key)
        if before is None:
            peer.persistent_keepalive = PERSISTENT_KEEPALIVE
        if before is None or before.preshared_key != preshared_key:
            peer.preshared_key = preshared_key
        if before is None or before.spec.allowed_ips != spec.allowed_ips:
            peer.replace_allowed_ips = True
            peer.allowed_ips = [prefix.of(network) for network in spec.allowed_ips]
        pushed = None if before is None else before.endpoint
        if endpoint is not None and endpoint != pushed:
            peer.endpoint = endpoint
            # A known peer moved to another endpoint: check it with a handshake now, or
            # it would stay unproven until the session's next rekey (up to 2 minutes).
            peer.handshake = before is not None
            pushed = endpoint
        if peer != PeerChange(public_key=spec.public_key):
            change.peers.append(peer)
        now_applied[spec.public_key] = AppliedPeer(spec, preshared_key, pushed)
    for public_key in applied:
        if public_key not in now_applied:
            change.peers.append(PeerChange(public_key=public_key, remove=True))
    return change, now_applied
