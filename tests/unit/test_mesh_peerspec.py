import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from uspan.mesh.affiliate import Affiliate, KubeSpanInfo
from uspan.mesh.peerspec import (
    PERSISTENT_KEEPALIVE,
    AppliedPeer,
    PeerSpec,
    build_peer_specs,
    plan_device_change,
)
from uspan.wg.config import PeerChange
from uspan.wg.endpoint import Endpoint
from uspan.wg.prefix import of

net = ipaddress.ip_network
ip = ipaddress.ip_address
LOCAL_KEY = b"L" * 32
PSK = b"S" * 32


def affiliate(
    node_id: str,
    key: bytes | None,
    *,
    addresses: tuple[str, ...] = (),
    prefixes: tuple[str, ...] = (),
    endpoints: tuple[str, ...] = (),
    nodename: str | None = None,
) -> Affiliate:
    number = int(node_id[-1], 36)
    return Affiliate(
        node_id=node_id,
        hostname=f"{node_id}.example",
        nodename=node_id if nodename is None else nodename,
        addresses=tuple(ip(a) for a in addresses),
        kubespan=None
        if key is None
        else KubeSpanInfo(
            public_key=key,
            address=ipaddress.IPv6Address(f"fd00::{number:x}"),
            additional_prefixes=tuple(net(p) for p in prefixes),
            endpoints=tuple(Endpoint.parse(e) for e in endpoints),
        ),
    )


def test_every_other_kubespan_affiliate_becomes_a_peer() -> None:
    affiliates = [
        affiliate("node3", b"3" * 32, addresses=("192.0.2.3",), endpoints=("192.0.2.3:51820",)),
        affiliate("node1", None),
        affiliate("node0", LOCAL_KEY),
        affiliate(
            "node2", b"2" * 32, addresses=("192.0.2.2", "2001:db8::2"), prefixes=("10.2.0.0/16",)
        ),
    ]
    specs, warnings = build_peer_specs(affiliates, "node0", LOCAL_KEY, {})
    assert warnings == []
    assert [s.label for s in specs] == ["node2", "node3"]
    two = specs[0]
    assert two.id == "MjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjI="
    assert two.affiliate_id == "node2"
    assert two.address == ipaddress.IPv6Address("fd00::2")
    assert two.allowed_ips == (
        net("10.2.0.0/16"),
        net("192.0.2.2/32"),
        net("2001:db8::2/128"),
        net("fd00::2/128"),
    )
    assert specs[1].endpoints == (Endpoint("192.0.2.3", 51820),)


def test_label_falls_back_to_node_id() -> None:
    specs, _ = build_peer_specs([affiliate("node1", b"1" * 32, nodename="")], "x", LOCAL_KEY, {})
    assert specs[0].label == "node1"


def test_observed_endpoints_are_added_once() -> None:
    affiliates = [affiliate("node1", b"1" * 32, endpoints=("192.0.2.1:51820",))]
    observed = {
        "node1": [Endpoint("203.0.113.1", 4000), Endpoint("192.0.2.1", 51820, local="192.0.2.9")],
        "other": [Endpoint("203.0.113.2", 1)],
    }
    specs, _ = build_peer_specs(affiliates, "node0", LOCAL_KEY, observed)
    assert specs[0].endpoints == (Endpoint("192.0.2.1", 51820), Endpoint("203.0.113.1", 4000))


def test_overlaps_with_earlier_peers_are_removed_with_a_warning() -> None:
    affiliates = [
        affiliate("node2", b"2" * 32, prefixes=("10.0.0.0/16",), addresses=("192.0.2.2",)),
        affiliate("node1", b"1" * 32, prefixes=("10.0.5.0/24",), addresses=("192.0.2.1",)),
        affiliate("node3", b"3" * 32, prefixes=("10.0.0.0/8",), addresses=("192.0.2.1",)),
    ]
    specs, warnings = build_peer_specs(affiliates, "node0", LOCAL_KEY, {})
    by_label = {s.label: s for s in specs}
    assert net("10.0.5.0/24") in by_label["node1"].allowed_ips
    # node2 (later by node ID) loses the /24 that node1 already routes
    two = by_label["node2"].allowed_ips
    assert net("10.0.0.0/16") not in two
    assert net("10.0.4.0/24") in two and net("10.0.6.0/23") in two
    assert not any(n.overlaps(net("10.0.5.0/24")) for n in two)
    # node3 loses both earlier ranges and node1's address
    three = by_label["node3"].allowed_ips
    assert net("192.0.2.1/32") not in three
    assert not any(n.overlaps(net("10.0.0.0/16")) for n in three if n.version == 4)
    assert sum(n.num_addresses for n in three if n.version == 4) == 2**24 - 2**16
    assert len(warnings) == 2
    assert "'node2'" in warnings[0] and "10.0.5.0/24 (peer 'node1')" in warnings[0]
    assert "'node3'" in warnings[1] and "192.0.2.1/32 (peer 'node1')" in warnings[1]


def test_order_of_delivery_does_not_matter() -> None:
    affiliates = [
        affiliate("node2", b"2" * 32, prefixes=("10.0.0.0/16",)),
        affiliate("node1", b"1" * 32, prefixes=("10.0.5.0/24",)),
    ]
    forward = build_peer_specs(affiliates, "node0", LOCAL_KEY, {})
    backward = build_peer_specs(reversed(affiliates), "node0", LOCAL_KEY, {})
    assert forward == backward


def test_duplicate_and_own_keys_are_ignored_with_warnings() -> None:
    affiliates = [
        affiliate("node1", b"1" * 32),
        affiliate("node2", b"1" * 32),
        affiliate("node3", LOCAL_KEY),
    ]
    specs, warnings = build_peer_specs(affiliates, "node0", LOCAL_KEY, {})
    assert [s.label for s in specs] == ["node1"]
    assert "already used by 'node1'" in warnings[0]
    assert "already used by 'this node'" in warnings[1]


def spec(key: bytes, *allowed: str, endpoints: tuple[str, ...] = ()) -> PeerSpec:
    return PeerSpec(
        public_key=key,
        affiliate_id=key.decode()[:1],
        label=key.decode()[:1],
        address=ipaddress.IPv6Address("fd00::1"),
        allowed_ips=tuple(net(a) for a in allowed),
        endpoints=tuple(Endpoint.parse(e) for e in endpoints),
    )


A, B = b"A" * 32, b"B" * 32
EP1, EP2 = Endpoint("192.0.2.1", 51820), Endpoint("192.0.2.2", 51820)


def test_new_peers_get_everything() -> None:
    change, applied = plan_device_change([spec(A, "fd00::1/128")], {A: EP1}, {}, PSK)
    assert change.peers == [
        PeerChange(
            public_key=A,
            preshared_key=PSK,
            endpoint=EP1,
            persistent_keepalive=PERSISTENT_KEEPALIVE,
            replace_allowed_ips=True,
            allowed_ips=[of(net("fd00::1/128"))],
        )
    ]
    assert applied[A] == AppliedPeer(spec(A, "fd00::1/128"), PSK, EP1)


def test_nothing_changed_nothing_to_apply() -> None:
    specs = [spec(A, "fd00::1/128")]
    _, applied = plan_device_change(specs, {A: EP1}, {}, PSK)
    change, again = plan_device_change(specs, {A: EP1}, applied, PSK)
    assert change.peers == []
    assert again == applied


def test_endpoint_pushed_only_when_the_choice_changes() -> None:
    specs = [spec(A, "fd00::1/128")]
    _, applied = plan_device_change(specs, {A: None}, {}, PSK)
    assert applied[A].endpoint is None
    change, applied = plan_device_change(specs, {A: EP1}, applied, PSK)
    # a known peer given an endpoint: a handshake proves it at once
    assert change.peers == [PeerChange(public_key=A, endpoint=EP1, handshake=True)]
    # the core roamed to another endpoint meanwhile: choosing the same one again keeps it
    change, applied = plan_device_change(specs, {A: EP1}, applied, PSK)
    assert change.peers == []
    # a sticky source in the choice is not a change
    sticky = Endpoint("192.0.2.1", 51820, local="10.0.0.1", ifindex=3)
    change, applied = plan_device_change(specs, {A: sticky}, applied, PSK)
    assert change.peers == []
    change, applied = plan_device_change(specs, {A: EP2}, applied, PSK)
    assert change.peers == [PeerChange(public_key=A, endpoint=EP2, handshake=True)]


def test_allowed_ips_and_psk_changes_and_removal() -> None:
    _, applied = plan_device_change([spec(A, "fd00::1/128"), spec(B)], {}, {}, PSK)
    new_psk = b"T" * 32
    change, applied = plan_device_change(
        [spec(A, "fd00::1/128", "10.0.0.0/8")], {}, applied, new_psk
    )
    assert change.peers == [
        PeerChange(
            public_key=A,
            preshared_key=new_psk,
            replace_allowed_ips=True,
            allowed_ips=[of(net("fd00::1/128")), of(net("10.0.0.0/8"))],
        ),
        PeerChange(public_key=B, remove=True),
    ]
    assert list(applied) == [A]


prefixes = st.builds(
    lambda a, n: ipaddress.ip_network((a, n), strict=False),
    st.ip_addresses(v=4, network="10.0.0.0/14"),
    st.integers(12, 32),
)


@given(st.lists(st.lists(prefixes, max_size=4), min_size=1, max_size=6))
def test_no_address_is_routed_to_two_peers(wanted: list[list[ipaddress.IPv4Network]]) -> None:
    affiliates = [
        Affiliate(
            node_id=f"node{i}",
            hostname="",
            nodename=f"n{i}",
            kubespan=KubeSpanInfo(
                bytes([i + 1]) * 32, ipaddress.IPv6Address(f"fd00::{i + 1}"), tuple(p)
            ),
        )
        for i, p in enumerate(wanted)
    ]
    specs, _ = build_peer_specs(affiliates, "self", LOCAL_KEY, {})
    routed = [(n, s.label) for s in specs for n in s.allowed_ips]
    for i, (a, la) in enumerate(routed):
        for b, lb in routed[i + 1 :]:
            assert not (a.version == b.version and a.overlaps(b)), (a, la, b, lb)
    # what a peer lost is routed to an earlier one: together they cover all that was wanted
    routed_v4 = [n for n, _ in routed if isinstance(n, ipaddress.IPv4Network)]
    wanted_v4 = [n for each in wanted for n in each]
    assert list(ipaddress.collapse_addresses(routed_v4)) == list(
        ipaddress.collapse_addresses(wanted_v4)
    )
