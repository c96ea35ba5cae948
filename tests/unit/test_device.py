"""Device-level protocol tests on an in-memory network with a fake clock."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools

import pytest

from tests.unit.deviceinfo import device_info
from tests.unit.wgnet import Net, ipv4_packet, ipv6_packet
from uspan.wg import prefix
from uspan.wg.admission import Admission
from uspan.wg.config import ConfigError, DeviceChange, PeerChange
from uspan.wg.constants import (
    INITIATION_SIZE,
    KEEPALIVE_TIMEOUT,
    MSG_INITIATION,
    MSG_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint

PSK = bytes(range(32))
# Every test runs on the compiled transport AEAD and on the pyca fallback.
pytestmark = pytest.mark.usefixtures("transport_aead")


def kinds(datagrams: list[bytes]) -> list[int]:
    return [d[0] for d in datagrams]


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def pair(net: Net):
    a = net.add("a", "192.0.2.1", 51820, seed=1)
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    net.connect(a, b, ["10.0.0.1/32", "fd00::1/128"], ["10.0.0.2/32", "fd00::2/128"], psk=PSK)
    return a, b


def test_handshake_and_data_both_ways(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2", b"hello")])
    net.run()
    assert b.tun == [ipv4_packet("10.0.0.1", "10.0.0.2", b"hello")]
    net.send(b, [ipv6_packet("fd00::2", "fd00::1", b"back")])
    net.run()
    assert a.tun == [ipv6_packet("fd00::2", "fd00::1", b"back")]
    pa, pb = net.peer(a, b), net.peer(b, a)
    assert pa.last_handshake == net.now and pb.last_handshake == net.now
    # Byte counters agree exactly across a lossless link.
    assert pa.tx_bytes == pb.rx_bytes and pb.tx_bytes == pa.rx_bytes
    assert pa.tx_bytes == sum(len(d) for d in a.sent)


def test_padding_is_multiple_of_16_and_stripped(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2", b"x")])  # 21-byte packet
    net.run()
    transport = [d for d in a.sent if d[0] == MSG_TRANSPORT]
    assert len(transport[0]) == 16 + 32 + 16  # padded to 32, plus tag
    assert b.tun[0] == ipv4_packet("10.0.0.1", "10.0.0.2", b"x")


def test_staged_packets_flush_after_handshake(net: Net, pair) -> None:
    a, b = pair
    packets = [ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i]) * 10) for i in range(5)]
    net.send(a, packets)
    assert kinds(a.sent) == [MSG_INITIATION]  # one handshake, packets wait
    net.run()
    assert b.tun == packets


def test_responder_waits_for_confirmation_before_sending(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    # Deliver only the initiation: B has a "next" session it may not use yet.
    datagram, _dst, _sender = net.wire.pop(0)
    _, out = b.device.receive([(datagram, a.endpoint)], net.now)
    pb = net.peer(b, a)
    assert pb.next is not None and pb.current is None
    assert len(out) == 1  # the response
    b.device.send([ipv4_packet("10.0.0.2", "10.0.0.1")], net.now)
    assert pb.staged  # waits for the confirming packet


def test_a_response_is_consumed_once(net: Net, pair) -> None:
    """The initiator forgets its handshake state with the first good response: the
    same response again is refused and changes nothing."""
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    initiation, _dst, _sender = net.wire.pop(0)
    _, out = b.device.receive([(initiation, a.endpoint)], net.now)
    [(response, _)] = out
    a.device.receive([(response, b.endpoint)], net.now)
    pa = net.peer(a, b)
    session, sent = pa.current, pa.tx_bytes
    assert session is not None and pa.handshake is None
    to_tun, out = a.device.receive([(response, b.endpoint)], net.now)
    assert (to_tun, out) == ([], [])
    assert a.device.counters[Drop.UNKNOWN_INDEX] == 1
    assert pa.current is session and pa.tx_bytes == sent and pa.handshakes == 1


def test_a_forged_response_leaves_the_handshake_for_the_genuine_one(net: Net, pair) -> None:
    """A response that fails (a bit flipped in its sealed part, as an attacker who saw
    our initiation could send) is counted and changes nothing: the genuine one that
    follows still completes the handshake."""
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    initiation, _dst, _sender = net.wire.pop(0)
    _, out = b.device.receive([(initiation, a.endpoint)], net.now)
    [(response, _)] = out
    forged = bytearray(response)
    forged[50] ^= 1  # inside the sealed empty payload; mac1 made valid again
    mac1_key = hashlib.blake2s(b"mac1----" + a.public).digest()
    forged[60:76] = hashlib.blake2s(bytes(forged[:60]), key=mac1_key, digest_size=16).digest()
    assert a.device.receive([(bytes(forged), b.endpoint)], net.now) == ([], [])
    pa = net.peer(a, b)
    assert a.device.counters[Drop.HANDSHAKE_FAILED] == 1
    assert pa.current is None and pa.handshake is not None
    a.device.receive([(response, b.endpoint)], net.now)
    assert pa.current is not None and pa.handshake is None and pa.handshakes == 1


def test_rekey_after_time_on_send(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    first = net.peer(a, b).current
    net.advance(REKEY_AFTER_TIME - 1)
    a.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    assert MSG_INITIATION not in kinds(a.sent)
    net.run()
    net.advance(1.5)
    a.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    assert kinds(a.sent) == [MSG_TRANSPORT, MSG_INITIATION]
    net.run()
    assert net.peer(a, b).current is not first
    assert net.peer(a, b).previous is first


def test_reject_after_time_stops_using_the_key(net: Net, pair) -> None:
    a, _b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.blocked.add("b")  # B hears nothing from now on
    net.advance(REJECT_AFTER_TIME + 1)
    a.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    assert MSG_TRANSPORT not in kinds(a.sent)


def test_retransmits_then_gives_up(net: Net, pair) -> None:
    a, b = pair
    net.blocked.add("b")
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    start = net.now
    net.advance(120)
    initiations = [d for d in a.sent if d[0] == MSG_INITIATION]
    # One initiation, then retransmits every 5 s + jitter up to 18 attempts, then silence.
    assert len(initiations) == 1 + 19
    pa = net.peer(a, b)
    assert not pa.staged and pa.handshake_attempts == 19
    assert pa.timers.retransmit_handshake is None
    assert pa.timers.zero_key_material is not None
    assert pa.timers.zero_key_material > start + 90


def initiation_times(net: Net, node, seconds: float, step: float = 0.05) -> list[float]:
    """When ``node`` sent initiations in the next ``seconds`` (to within ``step``)."""
    times = []
    for _ in range(round(seconds / step)):
        before = kinds(node.sent).count(MSG_INITIATION)
        net.advance(step)
        times += [net.now] * (kinds(node.sent).count(MSG_INITIATION) - before)
    return times


def test_persistent_keepalive_starts_new_attempts_after_giving_up(net: Net, pair) -> None:
    """As wireguard-go: every initiation rearms the persistent keepalive, so once the
    retransmissions are given up it fires 25 s after the last one, and its keepalive needs
    a session: a new round of attempts. A peer that never answers costs 20 initiations
    every ~123 s, for ever."""
    a, b = pair
    net.blocked.add("b")
    net.emit(a, a.device.apply(
        DeviceChange(peers=[PeerChange(b.public, persistent_keepalive=25)]), net.now))
    times = initiation_times(net, a, 250)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Two rounds of 1 + 19 retransmissions 5-5.33 s apart, each followed by 25 s of
    # silence; the third round has begun.
    assert len(times) == 41
    for round_ in (gaps[:19], gaps[20:39]):
        assert all(REKEY_TIMEOUT - 0.05 <= gap <= REKEY_TIMEOUT + 0.4 for gap in round_)
    assert gaps[19] == gaps[39] == pytest.approx(25, abs=0.06)
    assert net.peer(a, b).handshake_attempts == 0


def test_passive_keepalive_after_data_received(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    b.sent.clear()
    net.advance(KEEPALIVE_TIMEOUT - 0.1)
    assert b.sent == []
    net.advance(0.2)
    assert [len(d) for d in b.sent] == [32]  # one keepalive


def test_new_handshake_when_data_sent_and_nothing_received(net: Net, pair) -> None:
    a, _b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.advance(KEEPALIVE_TIMEOUT + 1)  # B's keepalive came back and disarmed the timer
    net.blocked.update({"a", "b"})
    a.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.01)
    assert MSG_INITIATION not in kinds(a.sent)
    net.advance(0.4)
    assert MSG_INITIATION in kinds(a.sent)


def test_persistent_keepalive(net: Net, pair) -> None:
    a, b = pair
    net.emit(a, a.device.apply(
        DeviceChange(peers=[PeerChange(b.public, persistent_keepalive=25)]), net.now
    ))
    net.run()
    net.advance(30)  # handshake and its echoes settle
    a.sent.clear()
    net.advance(85)  # stay below REKEY_AFTER_TIME: then a keepalive would also rekey
    # An idle link: exactly one keepalive every 25 s, nothing else.
    assert [len(d) for d in a.sent] == [32, 32, 32]
    assert net.peer(b, a).rx_bytes == net.peer(a, b).tx_bytes


def test_turning_on_persistent_keepalive_sends_at_once(net: Net, pair) -> None:
    a, b = pair
    out = a.device.apply(
        DeviceChange(peers=[PeerChange(b.public, persistent_keepalive=25)]), net.now
    )
    assert out == []  # at the next timer pass, not inside the configuration
    assert a.device.next_deadline() == net.now
    out = a.device.tick(net.now)
    assert [d[0] for d, _ in out] == [MSG_INITIATION]  # no session yet: handshake first
    net.emit(a, out)
    net.run()
    assert net.peer(a, b).last_handshake == net.now
    assert net.peer(b, a).rx_bytes > 0 and not net.peer(a, b).staged  # the keepalive went


def test_turning_on_persistent_keepalive_with_a_session_sends_a_keepalive(
        net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    a.sent.clear()
    net.emit(a, a.device.apply(
        DeviceChange(peers=[PeerChange(b.public, persistent_keepalive=25)]), net.now))
    net.advance(0.001)
    assert [len(d) for d in a.sent] == [32]


def test_last_minute_rekey_on_receive(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.advance(165.5)
    a.sent.clear()
    # B still has a valid session (it never initiated, so it does not rekey on time).
    net.send(b, [ipv4_packet("10.0.0.2", "10.0.0.1")])
    net.run()
    assert MSG_INITIATION in kinds(a.sent)
    assert net.peer(a, b).sent_last_minute_handshake is False  # handshake completed


def test_keys_zeroed_after_540s(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.blocked.update({"a", "b"})
    net.advance(539)
    assert net.peer(a, b).current is not None
    net.advance(2)
    pa = net.peer(a, b)
    assert pa.current is None and pa.previous is None and pa.next is None
    assert not a.device.keypairs


def test_transport_replay_is_dropped(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2", b"once")])
    datagram = net.wire[0][0]
    net.run()
    before = len(b.tun)
    b.device.receive([(datagram, a.endpoint)], net.now)
    assert len(b.tun) == before
    assert b.device.counters[Drop.REPLAY] == 1


def test_a_mixed_batch_is_checked_message_by_message(net: Net, pair) -> None:
    """Runs of one index opened at once still count and deliver each message as alone."""
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    packets = [ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i]) * 30) for i in range(4)]
    net.send(a, packets)
    net.send(a, [ipv4_packet("10.9.9.9", "10.0.0.2")])  # an inner source b does not allow
    out: list = []
    net.peer(a, b).send_keepalive(net.now, out)
    sealed = [d for d, _, _ in net.wire] + [d for d, _ in out]
    net.wire.clear()
    forged = sealed[1][:-1] + bytes([sealed[1][-1] ^ 1])
    unknown = b"\x04\0\0\0" + bytes([9, 9, 9, 9]) + bytes(8 + 32)
    batch = [sealed[0], forged, sealed[1], sealed[0], unknown, b"\x04\0\0\0", sealed[2],
             sealed[4], sealed[5], sealed[3]]
    rx_before = net.peer(b, a).rx_bytes
    to_tun, _ = b.device.receive([(d, a.endpoint) for d in batch], net.now)
    assert to_tun == packets
    counters = b.device.counters
    assert (counters[Drop.DECRYPT_FAILED], counters[Drop.REPLAY], counters[Drop.UNKNOWN_INDEX],
            counters[Drop.BAD_LENGTH], counters[Drop.NOT_ALLOWED_SOURCE]) == (1, 1, 1, 1, 1)
    assert net.peer(b, a).rx_bytes - rx_before == sum(map(len, sealed))


def test_sealing_stops_at_reject_after_messages(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    keypair = net.peer(a, b).current
    keypair.send_counter = REJECT_AFTER_MESSAGES - 2
    out = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i])) for i in range(5)],
                        net.now)
    transport = [d for d, _ in out if d[0] == MSG_TRANSPORT]
    assert [int.from_bytes(d[8:16], "little") for d in transport] == [
        REJECT_AFTER_MESSAGES - 2, REJECT_AFTER_MESSAGES - 1]
    assert keypair.send_counter == REJECT_AFTER_MESSAGES
    assert len(net.peer(a, b).staged) == 3  # they wait for the new session


def test_initiation_replay_is_dropped(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    initiation = net.wire[0][0]
    net.run()
    net.advance(1)
    _, out = b.device.receive([(initiation, a.endpoint)], net.now)
    assert out == []
    assert b.device.counters[Drop.STALE_INITIATION] == 1


def test_roaming_follows_authenticated_source(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    datagram = net.wire.pop()[0]
    moved = Endpoint("198.51.100.7", 40000)
    b.device.receive([(datagram, moved)], net.now)
    assert net.peer(b, a).endpoint == moved
    # An unauthenticated datagram from elsewhere does not move it.
    b.device.receive([(b"\x04\x00\x00\x00" + bytes(40), Endpoint("203.0.113.9", 1))], net.now)
    assert net.peer(b, a).endpoint == moved


def test_inner_source_must_match_allowed_ips(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.9.9.9", "10.0.0.2")])  # spoofed inner source
    net.run()
    assert b.tun == []
    assert b.device.counters[Drop.NOT_ALLOWED_SOURCE] == 1


def test_longest_prefix_picks_peer(net: Net) -> None:
    a = net.add("a", "192.0.2.1", 1, seed=11)
    b = net.add("b", "192.0.2.2", 2, seed=12)
    c = net.add("c", "192.0.2.3", 3, seed=13)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.0/24"])
    net.connect(a, c, ["10.0.0.1/32"], ["10.0.0.128/25"])
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.200"), ipv4_packet("10.0.0.1", "10.0.0.5")])
    net.run()
    assert len(c.tun) == 1 and c.tun[0][16:20] == bytes([10, 0, 0, 200])
    assert len(b.tun) == 1 and b.tun[0][16:20] == bytes([10, 0, 0, 5])


def test_cookie_reply_under_load(net: Net, pair) -> None:
    """Under load with the budget of full handshakes spent, a new source gets a cookie."""
    a, b = pair
    b.device.under_load_rate = 1  # every handshake counts as load
    b.device.admission = Admission(unproven_per_second=0)
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert b.device.counters[Drop.COOKIE_SENT] == 1
    assert b.tun == []
    # The retransmit carries a valid mac2 and gets through.
    net.advance(REKEY_TIMEOUT + 0.5)
    assert b.tun == [ipv4_packet("10.0.0.1", "10.0.0.2")]


def test_wrong_psk_gives_no_session(net: Net) -> None:
    a = net.add("a", "192.0.2.1", 1, seed=21)
    b = net.add("b", "192.0.2.2", 2, seed=22)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"], psk=PSK)
    b.device.apply(DeviceChange(peers=[PeerChange(a.public, preshared_key=bytes(32))]), net.now)
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert b.tun == [] and a.device.counters[Drop.HANDSHAKE_FAILED] == 1


def test_unknown_peer_initiation_dropped(net: Net) -> None:
    a = net.add("a", "192.0.2.1", 1, seed=31)
    b = net.add("b", "192.0.2.2", 2, seed=32)
    a.device.apply(DeviceChange(peers=[PeerChange(
        b.public, endpoint=b.endpoint, allowed_ips=[prefix.parse("10.0.0.2/32")])]),
        net.now)
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert b.device.counters[Drop.UNKNOWN_PEER] == 1 and not b.sent


def test_bad_config_changes_nothing(net: Net, pair) -> None:
    a, _b = pair
    before = device_info(a.device)
    bad = DeviceChange(
        listen_port=4000,
        peers=[
            PeerChange(bytes([7]) * 32, allowed_ips=[prefix.parse("10.7.0.0/16")]),
            PeerChange(b"short"),
        ],
    )
    with pytest.raises(ConfigError, match="public_key"):
        a.device.apply(bad, net.now)
    assert device_info(a.device) == before


@pytest.mark.parametrize("field", ["allowed_ips", "remove_allowed_ips"])
@pytest.mark.parametrize("bad", [["10.7.0.0/16"], [ipaddress.ip_network("10.7.0.0/16")],
                                 [True], None, "10.7.0.0/16"])
def test_allowed_ips_of_a_wrong_type_are_refused_before_anything_changes(
        net: Net, pair, field: str, bad: object) -> None:
    a, _b = pair
    before = device_info(a.device)
    peer = PeerChange(bytes([7]) * 32, allowed_ips=[prefix.parse("10.8.0.0/16")])
    setattr(peer, field, [prefix.parse("10.9.0.0/16"), *bad] if isinstance(bad, list) else bad)
    with pytest.raises(ConfigError, match=f"^{field}: "):
        a.device.apply(DeviceChange(listen_port=4000, peers=[peer]), net.now)
    assert device_info(a.device) == before


def test_removing_a_peer_forgets_its_routes_and_sessions(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    a.device.apply(DeviceChange(peers=[PeerChange(b.public, remove=True)]), net.now)
    assert not a.device.peers and not a.device.keypairs and not a.device.handshakes
    assert a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now) == []
    assert a.device.counters[Drop.NO_ROUTE] == 1


def test_private_key_change_forces_new_handshake(net: Net, pair) -> None:
    a, _b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    a.device.apply(DeviceChange(private_key=bytes([9]) * 32), net.now)
    net.advance(REKEY_TIMEOUT + 1)
    a.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    assert kinds(a.sent) == [MSG_INITIATION] and len(a.sent[0]) == INITIATION_SIZE


def test_big_batch_with_session_loses_nothing(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    batch = [ipv4_packet("10.0.0.1", "10.0.0.2", i.to_bytes(4, "big")) for i in range(1000)]
    net.send(a, batch)
    net.run()
    assert b.tun[1:] == batch


class _Batch(list):  # type: ignore[type-arg]
    """A list of the caller's own kind: still a batch of packets or datagrams."""


@pytest.mark.parametrize("kind", [_Batch, tuple, iter])
def test_send_and_receive_take_any_iterable(net: Net, pair, kind) -> None:
    """``send`` and ``receive`` take an Iterable: a list subclass, a tuple or an iterator
    is read as the same list would be (the compiled sorting wants an exact list)."""
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    packets = [ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i]) * 30) for i in range(3)]
    sealed = a.device.send(kind([*packets, b"", ipv4_packet("10.0.0.1", "10.9.9.9")]), net.now)
    assert len(sealed) == 3
    assert (a.device.counters[Drop.BAD_INNER_PACKET], a.device.counters[Drop.NO_ROUTE]) == (1, 1)
    to_tun, _ = b.device.receive(kind([(d, a.endpoint) for d, _ in sealed]), net.now)
    assert to_tun == packets


def test_staged_queue_is_bounded_without_session(net: Net, pair) -> None:
    a, b = pair
    net.blocked.add("b")
    batch = [ipv4_packet("10.0.0.1", "10.0.0.2", i.to_bytes(4, "big")) for i in range(300)]
    net.send(a, batch)
    peer = net.peer(a, b)
    assert list(peer.staged) == batch[-128:]
    assert a.device.counters[Drop.STAGED_OVERFLOW] == 300 - 128


def test_remove_one_allowed_ip(net: Net, pair) -> None:
    a, b = pair
    a.device.apply(DeviceChange(peers=[PeerChange(
        b.public, remove_allowed_ips=[prefix.parse("fd00::2/128")])]), net.now)
    assert device_info(a.device).peers[0].allowed_ips == ["10.0.0.2/32"]


def test_responder_does_not_initiate_right_after_responding(net: Net, pair) -> None:
    """Answering an initiation counts as a handshake sent: no competing initiation."""
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    initiation = net.wire.pop(0)[0]
    b.device.receive([(initiation, a.endpoint)], net.now)
    b.sent.clear()
    net.now += 0.001
    net.send(b, [ipv4_packet("10.0.0.2", "10.0.0.1")])
    assert MSG_INITIATION not in kinds(b.sent)


def test_private_key_change_rehandshakes_at_once(net: Net, pair) -> None:
    a, _b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.advance(1)
    a.device.apply(DeviceChange(private_key=bytes([9]) * 32), net.now)
    a.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    assert kinds(a.sent) == [MSG_INITIATION]


def test_under_load_cannot_be_hidden_by_mixing_in_other_traffic(net: Net, pair) -> None:
    """The load signal counts handshakes over time, so junk in every batch doesn't hide
    a flood of initiations with valid mac1 (it needs only our public key)."""
    a, b = pair
    b.device.under_load_rate = 50
    initiations = []
    for _ in range(60):
        a.device.peers[b.public].last_sent_handshake = None
        out = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now)
        initiations += [d for d, _ in out if d[0] == MSG_INITIATION]
    junk = (b"\x04\x00\x00\x00" + bytes(40), a.endpoint)
    for start in range(0, 60, 3):  # batches of 3 initiations and 1 junk datagram
        batch = [(d, a.endpoint) for d in initiations[start:start + 3]] + [junk]
        b.device.receive(batch, net.now)
        net.now += 0.001
    assert b.device.counters[Drop.COOKIE_SENT] > 0  # a's known endpoint, over its limit


def test_unknown_static_is_refused_before_the_last_dh(net: Net, pair) -> None:
    """An initiation from a key that isn't a peer costs one DH, not two."""
    a, b = pair
    calls = []
    original = b.device._static_static
    b.device._static_static = lambda key: calls.append(key) or original(key)
    b.device.apply(DeviceChange(peers=[PeerChange(a.public, remove=True)]), net.now)
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert calls == [a.public]
    assert b.device.counters[Drop.UNKNOWN_PEER] == 1


def test_the_timers_of_a_removed_peer_never_arm_its_successor() -> None:
    """Timers call the device with the peer's key: a removed peer's must not queue a
    deadline for a new peer of the same key."""
    from uspan.wg.device import Device

    device = Device()
    device.apply(DeviceChange(private_key=bytes(range(1, 33))), 0.0)
    key = bytes(range(2, 34))
    device.apply(DeviceChange(peers=[PeerChange(key)]), 0.0)
    old = device.peers[key]
    device.apply(DeviceChange(peers=[PeerChange(key, remove=True)]), 1.0)
    device.apply(DeviceChange(peers=[PeerChange(key)]), 1.0)
    new = device.peers[key]
    queued = list(device._timer_queue)
    old.timers.handshake_initiated(2.0)
    assert new.timer_seq == -1 and device._timer_queue == queued


def test_pings_draw_jitter_in_blocks(net: Net) -> None:
    """Each ping's first packet arms the new-handshake timer with jitter; with
    ``os.urandom`` a draw per ping was a getrandom system call on the ping's way out."""
    draws: list[int] = []
    a = net.add("a", "192.0.2.1", 51820, seed=1, draws=draws)
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"])
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    draws.clear()
    for _ in range(300):  # more than a block's draws: the jitter is drawn, in blocks
        net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
        net.send(b, [ipv4_packet("10.0.0.2", "10.0.0.1")])
        net.run()
        assert net.peer(a, b).timers.new_handshake is None  # answered: armed again next
    assert 1 <= len(draws) <= 3  # a block per 128 pings, not a draw per ping
