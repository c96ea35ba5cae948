"""The controller driven like the node shell drives it, with explicit ``now`` values."""

import base64
import ipaddress
from typing import Any

from uspan.mesh.affiliate import Affiliate, KubeSpanInfo
from uspan.mesh.config import NodeConfig, config_from_dict
from uspan.mesh.controller import DIRECT_RETRY, PeerController, Transition
from uspan.mesh.resources import (
    AFFILIATE,
    KUBESPAN_ENDPOINT,
    KUBESPAN_PEER_SPEC,
    KUBESPAN_PEER_STATUS,
    MEMBER,
    Store,
)
from uspan.mesh.status import LinkFacts, PeerState
from uspan.wg.config import PeerChange
from uspan.wg.endpoint import Endpoint

SECRET = base64.b64encode(b"S" * 32).decode()
LOCAL_KEY = b"L" * 32
K1, K2 = b"1" * 32, b"2" * 32
ID1, ID2 = (base64.b64encode(k).decode() for k in (K1, K2))
E1 = Endpoint("192.0.2.1", 51820)
E2A, E2B = Endpoint("192.0.2.2", 51820), Endpoint("198.51.100.2", 51820)
UP, DOWN, UNKNOWN = PeerState.UP, PeerState.DOWN, PeerState.UNKNOWN


def config(**kubespan: Any) -> NodeConfig:
    return config_from_dict(
        {
            "kubespan": {"enabled": True, **kubespan},
            "discovery": {"enabled": True, "registries": {"service": {"endpoints": ["d:1"]}}},
            "cluster": {"id": "aWQ=", "secret": SECRET},
        }
    )


def member(n: int, key: bytes | None, *endpoints: Endpoint) -> Affiliate:
    return Affiliate(
        node_id=f"node{n}",
        hostname=f"h{n}.example",
        nodename=f"h{n}",
        addresses=(ipaddress.ip_address(f"192.0.2.{n}"),),
        kubespan=None
        if key is None
        else KubeSpanInfo(key, ipaddress.IPv6Address(f"fd00::{n}"), (), tuple(endpoints)),
    )


AFFILIATES = [
    member(0, LOCAL_KEY, Endpoint("192.0.2.10", 51820)),
    member(1, K1, E1),
    member(2, K2, E2A, E2B),
    member(3, None),
]


def started() -> tuple[PeerController, Store]:
    store = Store(wall_offset=1_700_000_000.0)
    controller = PeerController("node0", LOCAL_KEY, config(), store)
    return controller, store


def test_affiliates_become_configured_peers() -> None:
    controller, store = started()
    out = controller.set_affiliates(AFFILIATES, {}, now=100.0)
    assert out.warnings == []
    psk = b"S" * 32
    assert [p.public_key for p in out.device_change.peers] == [K1, K2]
    first = out.device_change.peers[0]
    assert (first.endpoint, first.preshared_key, first.persistent_keepalive) == (E1, psk, 25)
    assert out.device_change.peers[1].endpoint == E2A
    assert out.routes == ()  # nobody is up yet: node addresses bypass the mesh
    assert out.deadline == 115.0  # EndpointConnectionTimeout after the endpoints were set
    assert out.transitions == []
    assert [r.metadata.id for r in store.list(KUBESPAN_PEER_SPEC)] == [ID1, ID2]
    assert [r.spec["state"] for r in store.list(KUBESPAN_PEER_STATUS)] == ["unknown"] * 2
    assert [r.metadata.id for r in store.list(MEMBER)] == ["h0", "h1", "h2", "h3"]
    assert len(store.list(AFFILIATE)) == 4
    # the same affiliates again: nothing to apply
    again = controller.set_affiliates(AFFILIATES, {}, now=101.0)
    assert again.device_change.peers == []


def test_handshake_brings_a_peer_up_and_reports_its_endpoint() -> None:
    controller, store = started()
    controller.set_affiliates(AFFILIATES, {}, now=100.0)
    out = controller.set_facts({K1: LinkFacts(E1, 100.2, 0, 100.0, 148, 92)}, now=100.2)
    assert out.transitions == [Transition(ID1, "h1", UNKNOWN, UP, E1)]
    assert out.routes == (ipaddress.ip_network("192.0.2.1/32"), ipaddress.ip_network("fd00::1/128"))
    assert [(o.affiliate_id, o.endpoint) for o in out.observed] == [("node1", E1)]
    assert store.get(KUBESPAN_ENDPOINT, ID1).spec == {
        "affiliateID": "node1",
        "endpoint": "192.0.2.1:51820",
    }
    status = store.get(KUBESPAN_PEER_STATUS, ID1)
    assert (status.spec["state"], status.spec["receiveBytes"], status.metadata.version) == (
        "up",
        148,
        2,
    )
    assert out.device_change.peers == []


def test_a_replaced_device_gets_every_peer_whole_again() -> None:
    """A new interface (apply-config of kubespan.interface or the relay) holds no peer:
    each must come back with its preshared key and allowed IPs, not as a bare endpoint."""
    controller, _ = started()
    controller.set_affiliates(AFFILIATES, {}, now=100.0)
    controller.set_facts({K1: LinkFacts(E1, 100.2, 0, 100.0, 148, 92)}, now=100.2)
    controller.device_replaced()
    out = controller.tick(now=101.0)
    assert [p.public_key for p in out.device_change.peers] == [K1, K2]
    assert all(p.preshared_key == b"S" * 32 and p.replace_allowed_ips
               for p in out.device_change.peers)
    assert controller.statuses[K1].state is UNKNOWN  # the old link's facts are void


def test_dead_first_endpoint_is_cycled_by_the_faster_rule() -> None:
    controller, store = started()
    controller.set_affiliates(AFFILIATES, {}, now=0.0)
    # two initiations to E2A (at 0 and 5.1), no answer
    out = controller.set_facts({K2: LinkFacts(E2A, None, 2, 5.1, 0, 296)}, now=5.1)
    assert out.deadline == 11.1
    out = controller.tick(11.1)
    assert out.transitions == [
        Transition(ID2, "h2", UNKNOWN, DOWN, E2A),
        Transition(ID2, "h2", DOWN, UNKNOWN, E2B),
    ]
    assert out.device_change.peers == [PeerChange(public_key=K2, endpoint=E2B, handshake=True)]
    assert out.deadline == 15.0  # peer 1's timeout comes first; peer 2's is at 26.1
    spec = store.get(KUBESPAN_PEER_STATUS, ID2).spec
    assert (spec["endpoint"], spec["lastUsedEndpoint"], spec["state"]) == (
        "198.51.100.2:51820",
        "198.51.100.2:51820",
        "unknown",
    )
    # until the core reports on E2B, the stale facts about E2A are not used
    quiet = controller.tick(12.0)
    assert quiet.transitions == [] and quiet.device_change.peers == []
    assert store.get(KUBESPAN_PEER_STATUS, ID2).spec["endpoint"] == "198.51.100.2:51820"
    # the shell applied E2B and restarted the attempt count; the handshake completes
    out = controller.set_facts({K2: LinkFacts(E2B, 11.15, 0, 11.1, 92, 444)}, now=11.15)
    assert out.transitions == [Transition(ID2, "h2", UNKNOWN, UP, E2B)]


def test_talos_timeout_marks_a_silent_peer_down_and_a_single_endpoint_stays() -> None:
    controller, _ = started()
    controller.set_affiliates(AFFILIATES, {}, now=0.0)
    controller.set_facts({K1: LinkFacts(E1, None, 0, None, 0, 0)}, now=1.0)
    out = controller.tick(15.0)
    assert Transition(ID1, "h1", UNKNOWN, DOWN, E1) in out.transitions
    assert all(p.public_key != K1 for p in out.device_change.peers)  # nothing else to try


def test_roamed_endpoint_is_kept() -> None:
    controller, store = started()
    controller.set_affiliates(AFFILIATES, {}, now=0.0)
    roamed = Endpoint("203.0.113.7", 40000)
    out = controller.set_facts({K1: LinkFacts(roamed, 0.5, 0, None, 1, 1)}, now=0.5)
    assert out.device_change.peers == []
    assert store.get(KUBESPAN_PEER_STATUS, ID1).spec["endpoint"] == "203.0.113.7:40000"
    assert [o.endpoint for o in out.observed] == [roamed]


def test_vanished_affiliate_is_removed_everywhere() -> None:
    controller, store = started()
    controller.set_affiliates(AFFILIATES, {}, now=0.0)
    controller.set_facts({K1: LinkFacts(E1, 0.5, 0, None, 1, 1)}, now=0.5)
    out = controller.set_affiliates(AFFILIATES[:1] + AFFILIATES[2:], {}, now=1.0)
    assert out.device_change.peers == [PeerChange(public_key=K1, remove=True)]
    assert [r.metadata.id for r in store.list(KUBESPAN_PEER_STATUS)] == [ID2]
    assert store.list(KUBESPAN_ENDPOINT) == []
    assert K1 not in controller.facts


def test_observed_endpoints_from_discovery_extend_the_spec() -> None:
    controller, store = started()
    extra = Endpoint("203.0.113.1", 51820)
    controller.set_affiliates(AFFILIATES, {"node1": [extra]}, now=0.0)
    assert store.get(KUBESPAN_PEER_SPEC, ID1).spec["endpoints"] == [
        "192.0.2.1:51820",
        "203.0.113.1:51820",
    ]


def test_overlap_warnings_come_out_once() -> None:
    controller, _ = started()
    clash = Affiliate(
        "node9", "h9", "h9", (ipaddress.ip_address("192.0.2.1"),), member(9, b"9" * 32).kubespan
    )
    out = controller.set_affiliates([*AFFILIATES, clash], {}, now=0.0)
    assert len(out.warnings) == 1 and "'h9'" in out.warnings[0]
    assert controller.tick(1.0).warnings == []


def test_config_changes() -> None:
    controller, store = started()
    controller.set_affiliates(AFFILIATES, {}, now=0.0)
    controller.set_facts({K1: LinkFacts(E1, 0.5, 0, None, 1, 1)}, now=0.5)
    new_secret = base64.b64encode(b"T" * 32).decode()
    changed = config_from_dict(
        {
            "kubespan": {
                "enabled": True,
                "allowDownPeerBypass": False,
                "harvestExtraEndpoints": False,
            },
            "discovery": {"enabled": True, "registries": {"service": {"endpoints": ["d:1"]}}},
            "cluster": {"id": "aWQ=", "secret": new_secret},
        }
    )
    out = controller.set_config(changed, now=1.0)
    assert [(p.public_key, p.preshared_key) for p in out.device_change.peers] == [
        (K1, b"T" * 32),
        (K2, b"T" * 32),
    ]
    assert len(out.routes) == 4  # every peer routed, up or not
    assert out.observed == []
    off = controller.set_config(_kubespan_off(), now=2.0)
    assert sorted(p.public_key for p in off.device_change.peers if p.remove) == [K1, K2]
    assert store.list(KUBESPAN_PEER_STATUS) == []
    assert len(store.list(MEMBER)) == 4  # discovery keeps working without KubeSpan


def _kubespan_off() -> NodeConfig:
    return config_from_dict(
        {
            "kubespan": {"enabled": False},
            "discovery": {"enabled": True, "registries": {"service": {"endpoints": ["d:1"]}}},
            "cluster": {"id": "aWQ=", "secret": SECRET},
        }
    )


def test_a_silent_up_peer_is_probed_with_a_handshake_and_not_declared_down() -> None:
    """On an idle pair one side legitimately hears nothing (persistent keepalives re-arm
    on receive): after 30 s of silence it asks for a handshake instead of a verdict."""
    controller, _ = started()
    controller.set_affiliates([member(0, LOCAL_KEY), member(1, K1, E1)], {}, now=100.0)
    up = LinkFacts(E1, last_handshake=101.0, unanswered_attempts=0, last_attempt=100.5,
                   rx_bytes=92, tx_bytes=148, last_received=101.0)
    out = controller.set_facts({K1: up}, now=101.0)
    assert controller.statuses[K1].state is UP and out.device_change.peers == []
    assert out.deadline == 115.0  # Talos's boundary: nothing changes for an up peer
    out = controller.tick(now=115.0)
    assert out.deadline == 131.0  # the probe: 30 s after the last packet from the peer
    out = controller.tick(now=131.0)
    assert controller.statuses[K1].state is UP  # silence is no verdict
    assert out.device_change.peers == [PeerChange(K1, update_only=True, handshake=True)]
    assert controller.tick(now=131.5).device_change.peers == []  # asked once
    # The probe went out (last attempt 131): answered, the next one is 30 s later.
    answered = LinkFacts(E1, last_handshake=131.01, unanswered_attempts=0, last_attempt=131.0,
                         rx_bytes=184, tx_bytes=296, last_received=131.01)
    out = controller.set_facts({K1: answered}, now=131.02)
    assert out.deadline == 161.01 and out.device_change.peers == []
    # Unanswered: the handshake rule says down ~11 s after the probe, then cycling.
    dead = LinkFacts(E1, last_handshake=131.01, unanswered_attempts=2, last_attempt=166.0,
                     rx_bytes=184, tx_bytes=444, last_received=131.01)
    controller.set_facts({K1: dead}, now=166.0)
    assert controller.tick(now=172.0).transitions[0].new is DOWN


def test_relay_is_tried_after_the_direct_endpoint_and_shows_as_relay() -> None:
    store = Store(wall_offset=1_700_000_000.0)
    controller = PeerController("node0", LOCAL_KEY, config(relay="192.0.2.254:3001"), store)
    controller.set_affiliates(AFFILIATES, {}, now=0.0)
    out = controller.set_facts({K1: LinkFacts(E1, None, 2, 5.1, 0, 296)}, now=5.1)
    out = controller.tick(11.1)
    (change,) = [p for p in out.device_change.peers if p.public_key == K1]
    pseudo = change.endpoint
    assert pseudo is not None and pseudo.host.startswith("100::") and pseudo.port == 3001
    assert Transition(ID1, "h1", DOWN, UNKNOWN, pseudo) in out.transitions
    # the handshake through the relay completes: up, shown as the relay, never reported
    out = controller.set_facts({K1: LinkFacts(pseudo, 11.3, 0, 11.1, 92, 148)}, now=11.3)
    assert Transition(ID1, "h1", UNKNOWN, UP, pseudo) in out.transitions
    spec = store.get(KUBESPAN_PEER_STATUS, ID1).spec
    assert (spec["state"], spec["endpoint"]) == ("up", "relay:192.0.2.254:3001")
    assert out.observed == []
    # every DIRECT_RETRY a handshake, which the shell also sends to the direct endpoints
    assert not any(p.public_key == K1 for p in controller.tick(11.3 + DIRECT_RETRY - 1)
                   .device_change.peers)
    out = controller.tick(11.3 + DIRECT_RETRY)
    assert PeerChange(K1, update_only=True, handshake=True) in out.device_change.peers
    # a direct path found later (the core roamed to it) is kept and reported again
    out = controller.set_facts({K1: LinkFacts(E1, 42.0, 0, None, 200, 300)}, now=42.0)
    assert all(p.public_key != K1 for p in out.device_change.peers)
    assert store.get(KUBESPAN_PEER_STATUS, ID1).spec["endpoint"] == "192.0.2.1:51820"
    assert [o.endpoint for o in out.observed] == [E1]


def test_every_member_derives_the_same_relay_address_for_a_peer() -> None:
    mine, _ = started()
    other = PeerController("node1", K1, config(), Store(wall_offset=0.0))
    assert mine.relay_addresses.of(K2) == other.relay_addresses.of(K2)
    assert mine.relay_addresses.of(K1) != mine.relay_addresses.of(K2)


def test_a_roam_that_beat_a_pushed_endpoint_is_where_cycling_goes_on_from() -> None:
    """The device kept the endpoint the peer roamed to over the one we pushed (its
    change was decided before the roam): that one counts as pushed and last used, so a
    later pick of the endpoint we had pushed is pushed again, not taken as applied."""
    controller, _ = started()
    controller.set_affiliates(AFFILIATES, {}, now=0.0)  # K2 aimed at E2A
    roamed = Endpoint("203.0.113.9", 41000)
    controller.endpoint_kept(K2, E2B, roamed)  # not what we pushed: nothing changes
    assert controller.statuses[K2].last_used_endpoint == E2A
    controller.endpoint_kept(K2, E2A, roamed)
    assert controller.statuses[K2].last_used_endpoint == roamed
    # the roamed path dies: two unanswered initiations there
    controller.set_facts({K2: LinkFacts(roamed, None, 2, 5.1, 0, 296)}, now=5.1)
    out = controller.tick(11.1)
    assert Transition(ID2, "h2", DOWN, UNKNOWN, E2A) in out.transitions
    assert out.device_change.peers == [PeerChange(public_key=K2, endpoint=E2A, handshake=True)]
