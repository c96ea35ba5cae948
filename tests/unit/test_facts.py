"""The facts the core reports for the mesh, on a fake monotonic clock."""

from __future__ import annotations

import pytest

from tests.unit.wgnet import Net, ipv4_packet
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.constants import MSG_INITIATION
from uspan.wg.endpoint import Endpoint


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def pair(net: Net):
    a = net.add("a", "192.0.2.1", 51820, seed=1)
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"], b_endpoint=False)
    return a, b


def test_a_new_peer_has_no_facts_yet(pair) -> None:
    a, b = pair
    facts = a.device.peer_facts()[b.public]
    assert (facts.last_handshake, facts.handshakes, facts.attempts, facts.last_attempt,
            facts.gave_up, facts.rx_bytes, facts.tx_bytes) == (None, 0, 0, None, None, 0, 0)
    assert facts.endpoint == b.endpoint
    assert b.device.peer_facts()[a.public].endpoint is None


def test_handshake_completed_on_both_sides(net: Net, pair) -> None:
    a, b = pair
    events = a.device.peer_events, b.device.peer_events
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    fa, fb = a.device.peer_facts()[b.public], b.device.peer_facts()[a.public]
    assert fa.last_handshake == fb.last_handshake == net.now
    assert fa.handshakes == fb.handshakes == 1
    assert fa.attempts == 0 and fa.last_attempt == net.now  # answered, so counted down
    assert fb.endpoint == a.endpoint  # learned from the initiation
    assert fa.tx_bytes == fb.rx_bytes > 0
    assert a.device.peer_events > events[0] and b.device.peer_events > events[1]


def test_unanswered_attempts_count_then_give_up(net: Net, pair) -> None:
    a, b = pair
    net.blocked.add("b")
    start = net.now
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    facts = a.device.peer_facts()[b.public]
    assert (facts.attempts, facts.attempts_on_endpoint, facts.last_attempt) == (1, 1, start)
    events = a.device.peer_events
    net.advance(60)
    facts = a.device.peer_facts()[b.public]
    sent = [d for d in a.sent if d[0] == MSG_INITIATION]
    assert facts.attempts == len(sent) > 10 and facts.gave_up is None
    assert facts.last_attempt is not None and start + 55 < facts.last_attempt <= start + 60
    assert a.device.peer_events == events  # attempts alone wake nobody
    net.advance(60)
    facts = a.device.peer_facts()[b.public]
    assert facts.attempts == 1 + 19
    # Given up one retransmit timeout after the 20th attempt (REKEY_ATTEMPT_TIME).
    assert facts.gave_up is not None and facts.last_attempt is not None
    assert 5 <= facts.gave_up - facts.last_attempt <= 5.334 and facts.gave_up > start + 90
    assert a.device.peer_events == events + 1


def test_attempts_on_endpoint_restart_when_the_endpoint_changes(net: Net, pair) -> None:
    a, b = pair
    net.blocked.add("b")
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.advance(12)
    assert a.device.peer_facts()[b.public].attempts_on_endpoint == 3
    a.device.apply(DeviceChange(peers=[PeerChange(
        b.public, endpoint=Endpoint("192.0.2.9", 51821))]), net.now)
    facts = a.device.peer_facts()[b.public]
    assert (facts.attempts, facts.attempts_on_endpoint) == (3, 0)
    net.advance(6)
    facts = a.device.peer_facts()[b.public]
    assert (facts.attempts, facts.attempts_on_endpoint) == (4, 1)


def test_a_completed_handshake_clears_giving_up(net: Net, pair) -> None:
    a, b = pair
    net.blocked.add("b")
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.advance(120)
    assert a.device.peer_facts()[b.public].gave_up is not None
    net.blocked.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    facts = a.device.peer_facts()[b.public]
    assert facts.gave_up is None and facts.attempts == 0 and facts.last_handshake == net.now


def test_roaming_is_an_event(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    events = b.device.peer_events
    moved = Endpoint("198.51.100.7", 4000)
    net.nodes[("198.51.100.7", 4000)] = a
    a.endpoint = moved
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert b.device.peer_facts()[a.public].endpoint == moved
    assert b.device.peer_events == events + 1


def test_last_received_and_unanswered_data(net: Net, pair) -> None:
    """What the mesh's faster down rules read: data sent with no answer, and silence."""
    a, b = pair
    start = net.now
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    fa = a.device.peer_facts()[b.public]
    assert fa.last_received == start and fa.unanswered_data_since == start
    assert b.device.peer_facts()[a.public].last_received == net.now
    net.advance(10.5)  # b's passive keepalive (KEEPALIVE_TIMEOUT) answers the data
    fa = a.device.peer_facts()[b.public]
    answered = fa.last_received
    assert answered is not None and 10 <= answered - start <= 10.5
    assert fa.unanswered_data_since is None
    net.blocked.add("b")
    net.advance(2)
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    sent = net.now
    net.advance(3)
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])  # still the first unanswered one
    fa = a.device.peer_facts()[b.public]
    assert fa.unanswered_data_since == sent and fa.last_received == answered
    net.blocked.clear()
    net.send(b, [ipv4_packet("10.0.0.2", "10.0.0.1")])  # b answers: a hears from it
    net.run()
    fa = a.device.peer_facts()[b.public]
    assert fa.unanswered_data_since is None and fa.last_received == net.now


def test_a_requested_handshake_goes_out_at_once(net: Net, pair) -> None:
    """The mesh's check of a new endpoint: past the once-per-REKEY_TIMEOUT limit."""
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    handshakes = a.device.peer_facts()[b.public].handshakes
    net.advance(1)  # well within REKEY_TIMEOUT of the last initiation
    net.emit(a, a.device.apply(DeviceChange(peers=[PeerChange(
        b.public, endpoint=b.endpoint, handshake=True)]), net.now))
    net.run()
    assert len([d for d in a.sent if d[0] == MSG_INITIATION]) == 2
    assert a.device.peer_facts()[b.public].handshakes == handshakes + 1


def test_data_unanswered_long_enough_to_rehandshake_is_an_event(net: Net, pair) -> None:
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.advance(11)  # b's passive keepalive answered the data
    net.blocked.add("b")
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    events = a.device.peer_events
    net.advance(14.9)
    assert a.device.peer_events == events  # still within KEEPALIVE + REKEY_TIMEOUT
    net.advance(0.5)  # + jitter of at most 333 ms
    assert a.device.peer_events == events + 1
    assert a.device.peer_facts()[b.public].attempts == 1  # WireGuard's own rehandshake


def test_a_change_decided_before_a_roam_does_not_undo_it(net: Net, pair) -> None:
    """A mesh decides on facts, then its change waits in a queue: if the peer roamed in
    between (its packets proved another path), the change's endpoint and handshake are
    skipped; decided on facts that include the roam, they apply."""
    a, b = pair
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    seen = b.device.peer_facts()[a.public].roamed
    assert seen > 0  # learning a's first address is a roam
    moved = Endpoint("198.51.100.7", 4000)
    net.nodes[("198.51.100.7", 4000)] = a
    a.endpoint = moved
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert b.device.peer_facts()[a.public].roamed > seen
    sent = len(b.sent)
    aimed = Endpoint("203.0.113.5", 51820)
    b.device.apply(DeviceChange(peers=[PeerChange(
        a.public, endpoint=aimed, handshake=True, unless_roamed_after=seen)]), net.now)
    assert b.device.peer_facts()[a.public].endpoint == moved
    assert len(b.sent) == sent  # no handshake either
    b.device.apply(DeviceChange(peers=[PeerChange(
        a.public, endpoint=aimed, handshake=True,
        unless_roamed_after=b.device.peer_facts()[a.public].roamed)]), net.now)
    assert b.device.peer_facts()[a.public].endpoint == aimed
    assert b.device.peer_facts()[a.public].roamed == b.device.peer_events  # a set is no roam
