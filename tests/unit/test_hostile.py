"""Hostile input: random and mutated datagrams never raise and never change device state."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.deviceinfo import device_info
from tests.unit.wgnet import Net, ipv4_packet
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint

ATTACKER = Endpoint("203.0.113.66", 6666)


def established():
    net = Net()
    a = net.add("a", "192.0.2.1", 51820, seed=1)
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"], psk=bytes(32))
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2", b"sample")])
    sample = net.wire[0][0]
    net.run()
    return net, a, b, sample


def snapshot(node) -> tuple:
    device = node.device
    peers = []
    for peer in device.peers.values():
        t = peer.timers
        peers.append((
            peer.endpoint, peer.rx_bytes, peer.tx_bytes, peer.last_handshake,
            peer.latest_timestamp, peer.handshake_index, id(peer.current), id(peer.next),
            id(peer.previous), len(peer.staged), t.retransmit_handshake, t.send_keepalive,
            t.new_handshake, t.zero_key_material, t.persistent_keepalive,
        ))
    windows = {
        index: (kp.send_counter, kp.replay._top, tuple(kp.replay._words))
        for index, kp in device.keypairs.items()
    }
    return device_info(device), sorted(device.handshakes), windows, peers


NET, A, B, SAMPLE = established()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=8))
def test_random_datagrams(datagrams: list[bytes]) -> None:
    before = snapshot(B)
    to_tun, out = B.device.receive([(d, ATTACKER) for d in datagrams], NET.now)
    assert to_tun == [] and out == []
    assert snapshot(B) == before


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 2, 3, 4]),
    st.binary(min_size=0, max_size=160),
)
def test_typed_garbage(kind: int, body: bytes) -> None:
    before = snapshot(B)
    datagram = kind.to_bytes(4, "little") + body
    to_tun, out = B.device.receive([(datagram, ATTACKER)], NET.now)
    assert to_tun == [] and out == []
    assert snapshot(B) == before


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7), st.data())
def test_bit_flipped_transport(position: int, bit: int, data) -> None:
    mutated = bytearray(SAMPLE)
    index = position % len(mutated)
    mutated[index] ^= 1 << bit
    truncate = data.draw(st.booleans())
    if truncate:
        mutated = mutated[: data.draw(st.integers(min_value=0, max_value=len(mutated) - 1))]
    before = snapshot(B)
    to_tun, out = B.device.receive([(bytes(mutated), ATTACKER)], NET.now)
    assert to_tun == [] and out == []
    assert snapshot(B) == before


@pytest.mark.parametrize("size", [0, 1, 3, 4, 31, 32, 147, 149, 91, 93, 63, 65, 65535])
def test_wrong_sizes_are_counted(size: int) -> None:
    for kind in (1, 2, 3, 4):
        datagram = (kind.to_bytes(4, "little") + bytes(size))[:size]
        B.device.receive([(datagram, ATTACKER)], NET.now)
    assert sum(B.device.counters.values()) > 0


def test_flood_of_initiations_does_not_grow_state() -> None:
    before = snapshot(B)
    junk = [(b"\x01\x00\x00\x00" + bytes(144), Endpoint(f"198.51.100.{i % 250}", i))
            for i in range(2000)]
    B.device.receive(junk, NET.now)
    assert B.device.counters[Drop.BAD_MAC1] >= 2000
    assert snapshot(B) == before
