"""Which deferred handshake changes the node still applies after HANDSHAKE_DEFER."""

from __future__ import annotations

from uspan.node.node import still_wanted
from uspan.wg.config import PeerChange
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
