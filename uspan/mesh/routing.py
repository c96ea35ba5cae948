"""Which destinations the mesh routing table sends into the tunnel.

As Talos does it: a peer's allowed IPs are routed through the mesh only while the peer is
``up``, so traffic to the node addresses of a peer that is down or not yet reached takes
the normal routes (the "down peer bypass"). With ``allowDownPeerBypass: false`` every
peer's allowed IPs are routed through the mesh whatever its state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from uspan.mesh.affiliate import Network
from uspan.mesh.peerspec import PeerSpec
from uspan.mesh.status import PeerState, PeerStatus


def routed_prefixes(
    specs: Sequence[PeerSpec], statuses: Mapping[bytes, PeerStatus], allow_down_peer_bypass: bool
) -> tuple[Network, ...]:
    """The prefixes to route into the mesh, collapsed, IPv4 first."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for spec in specs:
        status = statuses.get(spec.public_key)
        if allow_down_peer_bypass and (status is None or status.state is not PeerState.UP):
            continue
        for network in spec.allowed_ips:
            if isinstance(network, ipaddress.IPv4Network):
                v4.append(network)
            else:
                v6.append(network)
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))
