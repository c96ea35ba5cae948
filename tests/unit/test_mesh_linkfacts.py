from uspan.mesh.linkfacts import LinkTracker
from uspan.mesh.status import LinkFacts, PeerState, PeerStatus, compute_state
from uspan.wg.endpoint import Endpoint

EP = Endpoint("192.0.2.1", 51820)


def test_attempts_count_until_answered() -> None:
    link = LinkTracker()
    link.initiation_sent(0.0)
    link.initiation_sent(5.1)
    assert link.facts(EP, 0, 0) == LinkFacts(EP, None, 2, 5.1, 0, 0)
    link.handshake_completed(5.2)
    facts = link.facts(EP, 92, 148)
    assert (facts.unanswered_attempts, facts.last_handshake, facts.last_received) == (0, 5.2, 5.2)
    link.initiation_sent(125.0)
    link.cookie_received(125.1)
    assert link.facts(EP, 0, 0).unanswered_attempts == 0


def test_endpoint_change_restarts_the_counts() -> None:
    link = LinkTracker()
    link.initiation_sent(0.0)
    link.initiation_sent(5.0)
    link.data_sent(5.0)
    link.endpoint_set()
    facts = link.facts(EP, 0, 0)
    assert facts.unanswered_attempts == 0
    assert facts.unanswered_data_since is None
    assert facts.last_attempt == 5.0


def test_data_unanswered_since_the_first_send_after_a_receive() -> None:
    link = LinkTracker()
    link.received(10.0)
    link.data_sent(10.5)
    link.data_sent(11.0)
    assert link.facts(EP, 0, 0).unanswered_data_since == 10.5
    link.received(11.2)
    assert link.facts(EP, 0, 0).unanswered_data_since is None


def test_tracker_feeds_the_traffic_rule() -> None:
    status = PeerStatus("n", PeerState.UP, EP, last_used_endpoint=EP, last_endpoint_change=0.0)
    link = LinkTracker()
    link.handshake_completed(1.0)
    link.received(99.0)  # the peer's last keepalive
    link.data_sent(100.0)
    assert compute_state(status, link.facts(EP, 0, 0), 114.9) is PeerState.UP
    assert compute_state(status, link.facts(EP, 0, 0), 115.0) is PeerState.DOWN
