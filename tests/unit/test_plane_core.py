"""The core's side of the data plane: what it mirrors into a plane (``uspan.wg.plane``) at
every change of roles, routes and endpoints, on a fake plane and a fake clock."""

from __future__ import annotations

import socket

import pytest

from tests.unit.fakeplane import FakePlane
from tests.unit.planenet import Node, PlaneNet
from tests.unit.wgnet import ipv4_packet
from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.constants import (
    MSG_INITIATION,
    MSG_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    ZERO_KEYS_AFTER,
)
from uspan.wg.device import APPLY_STEP, Device
from uspan.wg.endpoint import Endpoint
from uspan.wg.keypair import PlaneKeypair
from uspan.wg.plane import NO_KEYPAIR, WANTS_SEND, PuntKind, endpoint_of, mirror_endpoint

A_TO_B = ipv4_packet("10.0.0.1", "10.0.0.2", b"ab")
B_TO_A = ipv4_packet("10.0.0.2", "10.0.0.1", b"ba")


def mirrored(node: Node) -> None:
    """The plane holds what the core holds: each peer's roles, routes and endpoint, and
    no keypair the core has forgotten."""
    plane, device = node.plane, node.device
    assert plane is not None
    assert plane.installed() == set(device.keypairs)
    assert set(plane.peers) == {peer.plane_id for peer in device.peers.values()}
    for peer in device.peers.values():
        assert plane.roles(peer.plane_id) == tuple(
            NO_KEYPAIR if keypair is None else keypair.local_index
            for keypair in (peer.previous, peer.current, peer.next))
        assert plane.prefixes(peer.plane_id) == set(device.allowed_ips.prefixes(peer))
        endpoint = plane.peers[peer.plane_id].endpoint
        if peer.endpoint is None:
            assert endpoint is None
        else:
            assert endpoint is not None
            assert (endpoint[0], endpoint[1]) == (peer.endpoint.ip_key(), peer.endpoint.port)


@pytest.fixture
def net() -> PlaneNet:
    return PlaneNet()


def pair(net: PlaneNet, a_plane: bool = True, b_plane: bool = True) -> tuple[Node, Node]:
    a = net.add("a", "192.0.2.1", 51820, seed=1, plane=a_plane)
    b = net.add("b", "192.0.2.2", 51821, seed=2, plane=b_plane)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"])
    return a, b


def test_initiator_session_is_installed_as_current(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])  # punted: no session; the core stages it and initiates
    assert [d[0] for _, d in a.sent] == [MSG_INITIATION]
    net.run()
    peer = a.peer(b)
    assert isinstance(peer.current, PlaneKeypair) and peer.next is None
    assert b.tun == [A_TO_B]  # sent by the core through the plane once the session came
    mirrored(a)
    mirrored(b)


def test_responder_next_confirmed_by_a_core_receive(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    initiation = net.wire.pop()[0]
    b.from_udp(initiation, a.endpoint)  # punted up, answered by the core
    next_ = b.peer(a).next
    assert next_ is not None and b.peer(a).current is None
    mirrored(b)
    response = net.wire.pop()[0]
    a.from_udp(response, b.endpoint)
    staged = net.wire.pop()[0]  # A's packet, sent once its session came
    # A relay delivers it: the core receives it itself, through the plane.
    to_tun, _ = b.device.receive([(staged, a.endpoint)], net.now)
    assert to_tun == [A_TO_B]
    assert b.peer(a).current is next_ and b.peer(a).next is None
    assert b.plane is not None and b.plane.send_counter(next_.local_index) == 0
    assert not b.plane.accept(next_.local_index, 0)  # the core's accept was the plane's
    mirrored(b)


def test_confirm_reported_by_the_thread_sends_what_was_staged(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    b.from_udp(net.wire.pop()[0], a.endpoint)  # the initiation, punted up and answered
    peer = b.peer(a)
    pending = peer.next
    assert pending is not None and peer.handshakes == 0
    peer.staged.append(B_TO_A)  # waits for a session
    a.from_udp(net.wire.pop()[0], b.endpoint)  # the response: A sends what it staged
    b.from_udp(net.wire.pop()[0], a.endpoint)  # B's thread confirms: rotation, event
    assert peer.current is pending and peer.next is None and peer.handshakes == 1
    assert b.tun == [A_TO_B] and not peer.staged
    assert b.sent[-1][1][0] == MSG_TRANSPORT  # the staged packet, sealed at once
    mirrored(b)
    net.run()
    assert a.tun == [B_TO_A]


def test_rekeys_drop_previous_and_leak_nothing(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    for _ in range(100):
        net.advance(REKEY_AFTER_TIME + 1)
        a.from_tun([A_TO_B])  # past REKEY_AFTER_TIME: the thread wants a handshake
        net.run()
        b.from_tun([B_TO_A])
        net.run()
        mirrored(a)
        mirrored(b)
    assert a.peer(b).handshakes > 90 and a.peer(b).previous is not None
    assert a.plane is not None and len(a.plane.installed()) <= 3
    assert b.plane is not None and len(b.plane.installed()) <= 3


def test_zero_keys_after_540_s_drop_every_keypair(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    net.advance(ZERO_KEYS_AFTER + 1)
    for node in (a, b):
        assert node.plane is not None and node.plane.installed() == set()
        mirrored(node)
    assert a.plane is not None and a.plane.roles(a.peer(b).plane_id) == (NO_KEYPAIR,) * 3


def test_private_key_change_expires_sending_in_the_plane(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    current = a.peer(b).current
    assert current is not None and a.plane is not None
    a.device.apply(DeviceChange(private_key=bytes(range(1, 33))), net.now)
    assert a.plane.send_counter(current.local_index) == REJECT_AFTER_MESSAGES
    a.from_tun([A_TO_B])  # punted by the thread: a new handshake at once
    assert a.sent[-1][1][0] == MSG_INITIATION
    mirrored(a)


def test_removed_peer_leaves_nothing_in_the_plane(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    plane_id = a.peer(b).plane_id
    a.device.apply(DeviceChange(peers=[PeerChange(b.public, remove=True)]), net.now)
    assert a.plane is not None
    assert plane_id not in a.plane.peers and a.plane.installed() == set()
    assert a.plane.route(bytes([10, 0, 0, 2])) is None
    mirrored(a)
    # A record or punt about it that was in flight is stale: ignored.
    assert a.device.sync([(plane_id, 1, 1, 0, 0, False, False, 10, 10, None, 1)],
                         net.now) == []


def test_second_handshake_while_next_is_pending(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    first = net.wire.pop()[0]
    b.from_udp(first, a.endpoint)
    pending = b.peer(a).next
    net.wire.clear()
    net.now += REKEY_TIMEOUT  # A retries before the response arrived
    a.peer(b).send_initiation(net.now, out := [], retry=True)
    b.from_udp(out[0][0], a.endpoint)
    assert b.peer(a).next is not pending and pending is not None
    assert b.plane is not None and pending.local_index not in b.plane.installed()
    mirrored(b)


def test_roam_reported_by_the_thread(net: PlaneNet) -> None:
    """The thread roams on an authenticated packet from a new source; the core learns
    it at the sync, and does not set it back in the plane."""
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    assert a.plane is not None
    peer, events = a.peer(b), a.device.peer_events
    moved = (bytes([192, 0, 2, 3]), 4000, bytes([192, 0, 2, 1]), 2)
    (datagram, _), = b.device.send([B_TO_A], net.now)
    a.tun += a.plane.udp_read([(datagram, moved)])
    assert peer.endpoint == b.endpoint  # until the sync
    calls = a.plane.endpoint_calls
    net.sync()
    assert peer.endpoint == Endpoint("192.0.2.3", 4000, "192.0.2.1", 2)
    assert peer.roamed == a.device.peer_events == events + 1
    assert a.plane.peers[peer.plane_id].endpoint == (*moved, False)
    assert a.plane.endpoint_calls == calls  # the thread's roam is not set back
    mirrored(a)


def test_forgetting_the_source_keeps_a_roam_the_core_has_not_heard_of(net: PlaneNet) -> None:
    """A retransmit forgets the sticky source; the thread roamed since the last sync,
    and the plane keeps that newer address (the sync then tells the core, sourceless)."""
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    assert a.plane is not None
    peer = a.peer(b)
    moved = (bytes([192, 0, 2, 3]), 4000, bytes([192, 0, 2, 1]), 2)
    (datagram, _), = b.device.send([B_TO_A], net.now)
    a.tun += a.plane.udp_read([(datagram, moved)])
    peer._forget_source()
    assert a.plane.peers[peer.plane_id].endpoint == (*moved[:2], b"", 0, False)
    net.sync()
    assert peer.endpoint == Endpoint("192.0.2.3", 4000)
    mirrored(a)


def test_plane_seal_is_the_keypairs_counter(net: PlaneNet) -> None:
    """One counter per keypair, whoever seals: the thread's packets and the core's
    keepalive are numbered in one sequence."""
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    a.from_tun([A_TO_B, A_TO_B])
    a.peer(b).send_keepalive(net.now, out := [])
    numbers = [int.from_bytes(d[8:16], "little") for _, d in a.sent if d[0] == MSG_TRANSPORT]
    numbers.append(int.from_bytes(out[0][0][8:16], "little"))
    assert numbers == [0, 1, 2, 3]


def test_wants_start_a_handshake_once_per_rekey_timeout(net: PlaneNet) -> None:
    a, b = pair(net)
    a.from_tun([A_TO_B])
    net.run()
    net.advance(REKEY_AFTER_TIME + 1)
    record = (a.peer(b).plane_id, 0, 0, 0, 0, False, False, 0, 0, None, WANTS_SEND)
    sent = [a.device.sync([record], net.now + t / 8) for t in range(80)]
    assert [[d[0] for d, _ in out] for out in sent] == (
        [[MSG_INITIATION]] + [[]] * 39 + [[MSG_INITIATION]] + [[]] * 39)  # 10 s: two


def test_punts_of_each_kind(net: PlaneNet) -> None:
    a, b = pair(net)
    assert a.plane is not None
    peer = a.peer(b)
    relay = Endpoint("100::1", 7)
    a.device.apply(DeviceChange(peers=[PeerChange(b.public, endpoint=relay)]), net.now)
    assert a.plane.peers[peer.plane_id].endpoint == (
        relay.ip_key(), 7, b"", 0, True)  # relayed: the thread hands its datagrams up
    out = a.device.punted([(PuntKind.EGRESS, peer.plane_id, b"sealed", None),
                           (PuntKind.TUN, peer.plane_id, A_TO_B, None)],
                          net.now)
    assert out[0] == (b"sealed", relay) and out[1][0][0] == MSG_INITIATION
    assert list(peer.staged) == [A_TO_B]


def test_routes_and_endpoints_follow_apply_steps_slices() -> None:
    now = 1000.0
    plane = FakePlane(lambda: now)
    device = Device(plane=plane)
    device.apply(DeviceChange(private_key=bytes(range(32))), now)
    keys = [bytes([k]) * 32 for k in (1, 2)]
    first = [prefix.parse(f"10.1.{i >> 8}.{i & 255}/32") for i in range(1000)]
    second = [prefix.parse(f"10.2.{i >> 8}.{i & 255}/32") for i in range(600)]

    def check() -> None:
        for key in keys:
            peer = device.peers.get(key)
            if peer is not None:
                assert plane.prefixes(peer.plane_id) == set(device.allowed_ips.prefixes(peer))
                endpoint = plane.peers[peer.plane_id].endpoint
                assert (endpoint is None) == (peer.endpoint is None)

    changes = [
        DeviceChange(peers=[PeerChange(keys[0], allowed_ips=first,
                                       endpoint=Endpoint("192.0.2.9", 9)),
                            PeerChange(keys[1], allowed_ips=first[:300])]),  # takes over
        DeviceChange(peers=[PeerChange(keys[0], replace_allowed_ips=True, allowed_ips=second)]),
        DeviceChange(peers=[PeerChange(keys[1], remove_allowed_ips=first[:100])]),
        DeviceChange(peers=[PeerChange(keys[0], remove=True)]),
    ]
    for change in changes:
        steps = 0
        for _ in device.apply_steps(change, now, []):
            check()
            steps += 1
        assert steps > 1
    assert max(plane.route_calls) <= APPLY_STEP
    peer = device.peers[keys[1]]
    assert plane.route(bytes([10, 1, 0, 200])) == peer.plane_id
    assert plane.route(bytes([10, 1, 0, 50])) is None
    peer.roam(Endpoint("192.0.2.7", 7, "192.0.2.1", 3))
    assert plane.peers[peer.plane_id].endpoint == (
        bytes([192, 0, 2, 7]), 7, bytes([192, 0, 2, 1]), 3, False)


def test_100k_prefixes_still_yield_in_slices() -> None:
    plane = FakePlane(lambda: 0.0)
    device = Device(plane=plane)
    many = [prefix.parse(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32") for i in range(100_000)]
    steps = sum(1 for _ in device.apply_steps(
        DeviceChange(peers=[PeerChange(bytes([5]) * 32, allowed_ips=many)]), 0.0, []))
    assert steps >= 100_000 // APPLY_STEP
    assert max(plane.route_calls) <= APPLY_STEP and sum(plane.route_calls) == 100_000
    assert len(plane.prefixes(device.peers[bytes([5]) * 32].plane_id)) == 100_000


def test_a_link_local_endpoint_keeps_its_scope_both_ways() -> None:
    """fe80::/10 is ambiguous without its interface (review L2): the plane is told the
    scope as ifindex, and a source it reports comes back as ``host%ifindex``."""
    plane = FakePlane(lambda: 0.0)
    peer = plane.add_peer()
    mirror_endpoint(plane, peer, Endpoint("fe80::1%3", 51820))
    address = socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert plane.peers[peer].endpoint == (address, 51820, b"", 3, False)
    assert endpoint_of(address, 51820, b"", 3) == Endpoint("fe80::1%3", 51820, None, 3)
    assert endpoint_of(socket.inet_aton("192.0.2.1"), 1, b"", 3).host == "192.0.2.1"
