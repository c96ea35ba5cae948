"""``Device.sync``: the thread's records replayed into the peers' timers and facts give
what the per-packet path gives (two devices on a fake clock, one with a fake plane)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.planenet import Node, PlaneNet
from tests.unit.wgnet import ipv4_packet
from uspan.wg.constants import KEEPALIVE_TIMEOUT, MSG_INITIATION, MSG_TRANSPORT, RESPONSE_SIZE
from uspan.wg.timers import PeerTimers

A_TO_B = ipv4_packet("10.0.0.1", "10.0.0.2", b"ab")
B_TO_A = ipv4_packet("10.0.0.2", "10.0.0.1", b"ba")
TICK = 1 / 512  # the fake clock's grain: exact in float seconds and in ns


def world(plane: bool, keepalive: int = 0) -> tuple[PlaneNet, Node, Node]:
    """A (with a plane or not) and B (without); no jitter, so deadlines are exact."""
    net = PlaneNet()
    a = net.add("a", "192.0.2.1", 51820, seed=1, plane=plane, jitter=False)
    b = net.add("b", "192.0.2.2", 51821, seed=2, plane=False, jitter=False)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"], keepalive=keepalive)
    return net, a, b


def timers_state(timers: PeerTimers) -> tuple[object, ...]:
    return (timers.retransmit_handshake, timers.send_keepalive, timers.new_handshake,
            timers.zero_key_material, timers.persistent_keepalive,
            timers.need_another_keepalive, timers.send_staged)


def peer_state(a: Node, b: Node) -> tuple[object, ...]:
    """What the per-packet path and the synced one must agree on. Not the device's
    queue: it may hold an earlier, superseded entry (it is never later than the timers)."""
    peer = a.peer(b)
    queued, deadline = a.device.next_deadline(), peer.next_deadline()
    assert deadline is None or (queued is not None and queued <= deadline)
    return (timers_state(peer.timers), peer.facts(), peer.sent_last_minute_handshake,
            peer.handshakes, deadline)


def test_two_planes_handshake_and_carry_data() -> None:
    net = PlaneNet()
    a = net.add("a", "192.0.2.1", 51820, seed=1, plane=True)
    b = net.add("b", "192.0.2.2", 51821, seed=2, plane=True)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"])
    a.from_tun([A_TO_B])
    net.run()
    for _ in range(3):
        net.now += 1
        b.from_tun([B_TO_A])
        net.run()
        net.now += 1
        a.from_tun([A_TO_B] * 2)
        net.run()
    assert b.tun == [A_TO_B] * 7 and a.tun == [B_TO_A] * 3
    net.sync()
    pa, pb = a.peer(b), b.peer(a)
    # The records flowed back: bytes, and when each last heard the other.
    assert pa.tx_bytes == pb.rx_bytes > 0 and pb.tx_bytes == pa.rx_bytes > 0
    assert pa.last_received == net.now - 1 and pb.last_received == net.now
    assert pb.timers.send_keepalive == net.now + KEEPALIVE_TIMEOUT  # data came, unanswered
    assert pa.unanswered_data_since == net.now
    assert pa.timers.new_handshake is not None and pb.timers.new_handshake is None
    # Nothing sent the core's way per packet: the thread did it.
    assert sum(d[0] == MSG_TRANSPORT for _, d in a.sent) == 7  # staged, then thread's
    net.advance(KEEPALIVE_TIMEOUT)  # B's keepalive answers A's data
    assert b.sent[-1][1][0] == MSG_TRANSPORT and len(b.sent[-1][1]) == 32
    assert pa.unanswered_data_since is not None  # until the shell syncs
    net.sync()
    assert pa.unanswered_data_since is None and pa.timers.new_handshake is None


ACTIONS = st.lists(st.tuples(
    st.sampled_from(["a_sends", "b_sends", "both", "idle"]),
    st.one_of(st.integers(0, 512), st.integers(0, 40 * 512)), st.booleans()), max_size=50)


@settings(max_examples=200, deadline=None)
@given(ACTIONS, st.sampled_from([0, 25]))
def test_synced_timers_equal_the_per_packet_path(actions: list[tuple[str, int, bool]],
                                                  keepalive: int) -> None:
    """The same random traffic through A with a plane and A without: the same datagrams
    sent at the same times (handshakes, keepalives, data), and after each sync the same
    timers, facts and deadlines. The shell syncs SYNC_DELAY after the thread's news, at
    once for punts, events and wishes to rekey, before every timer pass, and where the
    test says (``sync``): windows of many packets."""
    same_as_per_packet(actions, keepalive)


def test_rekeys_on_both_sides_as_per_packet() -> None:
    """Past REKEY_AFTER_TIME the initiator's sends (its keepalives) want a new session;
    while none comes, past REKEY_ON_RECEIVE_AGE its receives do too (B, the responder,
    sends on): the thread's wishes start what the per-packet path starts, when it
    starts it."""
    second = 512
    actions = [("a_sends", 0, True), ("a_sends", 121 * second, True), ("both", 1, True)]
    actions += [("b_sends", 10 * second, True)] * 17  # the last at an age of 170 s

    def lose(datagram: bytes, sender: Node) -> bool:  # no third session
        return datagram[0] == MSG_INITIATION and sender.net.now > 1200

    worlds = same_as_per_packet(actions, keepalive=0, lose=lose, tail=0.0)
    rekeyed = 1000.0 + 121 + TICK
    for a, b in worlds:
        initiations = [at for at, datagram in a.sent if datagram[0] == MSG_INITIATION]
        assert initiations[:3] == [1000.0, 1000.0 + 121, rekeyed + 120]  # sends
        assert a.peer(b).sent_last_minute_handshake  # and the receive side's wish


def same_as_per_packet(actions: list[tuple[str, int, bool]], keepalive: int,
                       lose: Callable[[bytes, Node], bool] | None = None,
                       tail: float = 600.0) -> list[tuple[Node, Node]]:
    """Run ``actions`` in both worlds, comparing as it goes, then ``tail`` seconds of
    what the timers still do (keepalives, retries, zeroing); A and B of each."""
    worlds = [world(plane, keepalive) for plane in (False, True)]
    for net, _, _ in worlds:
        if lose is not None:
            net.lose = lose
    (_, direct, direct_b), (synced_net, synced, synced_b) = worlds
    for kind, ticks, sync in actions:
        for net, a, b in worlds:
            net.advance(ticks * TICK)
            if kind in ("a_sends", "both"):
                a.from_tun([A_TO_B])
            if kind in ("b_sends", "both"):
                b.from_tun([B_TO_A])
            net.run()
        assert synced.sent == direct.sent and synced_b.sent == direct_b.sent
        assert synced.tun == direct.tun and synced_b.tun == direct_b.tun
        if sync:
            synced_net.sync()
            assert peer_state(synced, synced_b) == peer_state(direct, direct_b)
    for net, _, _ in worlds:
        net.advance(tail)
    synced_net.sync()
    assert peer_state(synced, synced_b) == peer_state(direct, direct_b)
    assert synced.sent == direct.sent and synced_b.sent == direct_b.sent
    return [(direct, direct_b), (synced, synced_b)]


def test_a_busy_window_is_one_record() -> None:
    """A ping every 10 ms for a second reaches the core as one record, which leaves the
    timers and facts as the 100 pings would have."""
    net, a, b = world(plane=True)
    a.from_tun([A_TO_B])
    net.run()
    plane = a.plane
    assert plane is not None
    source = (b.endpoint.ip_key(), b.endpoint.port, b"", 0)
    for _ in range(100):
        net.now += 5 * TICK
        for datagram, _ in plane.tun_read([A_TO_B]):
            b.device.receive([(datagram, a.endpoint)], net.now)
        for datagram, _ in b.device.send([B_TO_A], net.now):
            a.tun += plane.udp_read([(datagram, source)])
    records, punts, events = plane.collect()
    assert len(records) == 1 and not punts and not events
    assert a.device.sync(records, net.now) == []
    peer = a.peer(b)
    assert len(a.tun) == 100 and peer.last_received == net.now
    assert peer.timers.send_keepalive == net.now + KEEPALIVE_TIMEOUT
    assert peer.timers.new_handshake is None and peer.unanswered_data_since is None
    assert peer.rx_bytes == 100 * 64 + RESPONSE_SIZE  # 100 pings of 64 bytes, the response
