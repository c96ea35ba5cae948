"""The node's handling of applied changes: which deferred handshake changes it still
applies after HANDSHAKE_DEFER, and which endpoints the device kept elsewhere."""

from __future__ import annotations

from uspan.node.node import kept_elsewhere, still_wanted
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint
from uspan.wg.facts import PeerFacts

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def facts(handshakes: int) -> PeerFacts:
    return PeerFacts(endpoint=None, last_handshake=None, handshakes=handshakes, attempts=0,
                     attempts_on_endpoint=0, last_attempt=None, gave_up=None, last_received=None,
                     unanswered_data_since=None, rx_bytes=0, tx_bytes=0)


def handshake(key: bytes) -> PeerChange:
    return PeerChange(key, update_only=True, handshake=True)


def test_a_handshake_completed_meanwhile_cancels_ours() -> None:
    assert still_wanted([handshake(A)], {A: 3}, {A: facts(4)}) == []


def test_no_handshake_meanwhile_keeps_ours() -> None:
    change = handshake(A)
    assert still_wanted([change], {A: 3}, {A: facts(3)}) == [change]


def test_a_peer_still_in_the_change_queue_keeps_its_handshake() -> None:
    change = handshake(B)
    assert still_wanted([change], {}, {}) == [change]


def test_a_peer_added_since_counts_from_zero() -> None:
    fresh, done = handshake(B), handshake(C)
    assert still_wanted([fresh, done], {}, {B: facts(0), C: facts(1)}) == [fresh]


def test_keepalive_changes_always_go_through() -> None:
    keepalive = PeerChange(A, update_only=True, persistent_keepalive=25)
    assert still_wanted([keepalive], {A: 0}, {A: facts(5)}) == [keepalive]


def test_an_endpoint_the_device_did_not_take_is_reported_with_where_it_is() -> None:
    """After a change is applied, its endpoints that the device does not show were
    skipped for a roam (``unless_roamed_after``): the node tells the controller."""
    device = Device()
    device.apply(DeviceChange(private_key=bytes(range(1, 33))), 0.0)
    roamed, pushed = Endpoint("203.0.113.9", 41000), Endpoint("192.0.2.2", 51820)
    device.apply(DeviceChange(peers=[PeerChange(A, endpoint=pushed)]), 0.0)
    device.peers[A].roam(roamed)  # as an authenticated packet from there would
    stale = DeviceChange(peers=[PeerChange(A, endpoint=pushed, unless_roamed_after=0),
                                PeerChange(B, endpoint=pushed)])
    device.apply(stale, 1.0)
    assert kept_elsewhere(stale, device.peers) == [(A, pushed, roamed)]
    taken = DeviceChange(peers=[PeerChange(A, endpoint=pushed)])
    device.apply(taken, 2.0)
    assert kept_elsewhere(taken, device.peers) == []
