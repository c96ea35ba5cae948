import ipaddress

from uspan.mesh.peerspec import PeerSpec
from uspan.mesh.routing import routed_prefixes
from uspan.mesh.status import PeerState, PeerStatus

net = ipaddress.ip_network


def spec(n: int, *allowed: str) -> PeerSpec:
    return PeerSpec(
        bytes([n]) * 32,
        f"node{n}",
        f"n{n}",
        ipaddress.IPv6Address(f"fd00::{n}"),
        tuple(net(a) for a in allowed),
        (),
    )


SPECS = [
    spec(1, "192.0.2.1/32", "fd00::1/128"),
    spec(2, "192.0.2.2/32", "fd00::2/128"),
    spec(3, "192.0.2.3/32", "fd00::3/128"),
]
STATUSES = {
    SPECS[0].public_key: PeerStatus("n1", PeerState.UP),
    SPECS[1].public_key: PeerStatus("n2", PeerState.DOWN),
}


def test_only_up_peers_are_routed_with_bypass() -> None:
    assert routed_prefixes(SPECS, STATUSES, True) == (net("192.0.2.1/32"), net("fd00::1/128"))


def test_every_peer_is_routed_without_bypass() -> None:
    assert routed_prefixes(SPECS, STATUSES, False) == (
        net("192.0.2.1/32"),
        net("192.0.2.2/31"),
        net("fd00::1/128"),
        net("fd00::2/127"),
    )
