import ipaddress

import pytest

from uspan.mesh.cycling import (
    HARVEST_PEER_LIMIT,
    ObservedEndpoint,
    cycle,
    observed_endpoints,
    pick_endpoint,
)
from uspan.mesh.peerspec import PeerSpec
from uspan.mesh.status import LinkFacts, PeerState, PeerStatus, update_status
from uspan.wg.endpoint import Endpoint

E0, E1, E2 = (Endpoint(f"192.0.2.{i}", 51820) for i in range(3))


def test_pick_order_is_talos() -> None:
    endpoints = [E0, E1, E2]
    assert pick_endpoint([], None) is None
    assert pick_endpoint(endpoints, None) == E0
    assert pick_endpoint(endpoints, E0) == E1
    assert pick_endpoint(endpoints, E1) == E2
    assert pick_endpoint(endpoints, E2) == E0
    assert pick_endpoint(endpoints, Endpoint("203.0.113.1", 1)) == E0  # vanished
    assert pick_endpoint([E0], E0) is None  # a single endpoint in use is not re-picked
    assert pick_endpoint([E0], E1) == E0
    sticky = Endpoint("192.0.2.1", 51820, local="10.0.0.1", ifindex=2)
    assert pick_endpoint(endpoints, sticky) == E2


def test_cycle_only_when_down_or_without_endpoint() -> None:
    fresh = PeerStatus(label="n")
    started = cycle(fresh, [E0, E1], now=10.0)
    assert started == PeerStatus(
        label="n",
        state=PeerState.UNKNOWN,
        endpoint=E0,
        last_used_endpoint=E0,
        last_endpoint_change=10.0,
    )
    assert cycle(started, [E0, E1], now=11.0) is None  # unknown with an endpoint: wait
    up = PeerStatus(label="n", state=PeerState.UP, endpoint=E0, last_used_endpoint=E0)
    assert cycle(up, [E0, E1], now=11.0) is None
    down = PeerStatus(
        label="n", state=PeerState.DOWN, endpoint=E0, last_used_endpoint=E0, last_endpoint_change=1
    )
    moved = cycle(down, [E0, E1], now=30.0)
    assert moved is not None
    assert (moved.state, moved.endpoint, moved.last_endpoint_change) == (PeerState.UNKNOWN, E1, 30)
    assert cycle(down, [E0], now=30.0) is None
    assert cycle(PeerStatus(label="n"), [], now=1.0) is None


def test_dead_first_endpoint_comes_up_on_the_second_within_20_s() -> None:
    """First endpoint dead, second alive: the faster rule moves on after ~11 s."""
    status = cycle(PeerStatus(label="n"), [E0, E1], now=0.0)
    assert status is not None
    # the core sends an initiation at 0 and retransmits at 5.1: no answer
    facts = LinkFacts(E0, None, 2, 5.1, 0, 0)
    update = update_status(status, facts, 5.1)
    assert update.status.state is PeerState.UNKNOWN
    assert update.deadline == 5.1 + 6
    update = update_status(update.status, facts, update.deadline)
    assert update.status.state is PeerState.DOWN and update.changed
    now = update.deadline or 0.0
    status = cycle(update.status, [E0, E1], now)
    assert status is not None and status.endpoint == E1
    # new endpoint: the shell reset the attempt count; a handshake completes 0.05 s later
    up = update_status(status, LinkFacts(E1, now + 0.05, 0, now, 0, 0), now + 0.05)
    assert up.status.state is PeerState.UP
    assert now + 0.05 < 20


def test_endpoint_dying_under_traffic_is_replaced_within_20_s() -> None:
    """Up on E0 since t=0; E0 dies at t=100 while data flows: up on E1 by t=120."""
    status = PeerStatus(
        label="n", state=PeerState.UP, endpoint=E0, last_used_endpoint=E0, last_endpoint_change=0
    )
    died = 100.0
    facts = LinkFacts(E0, 1.0, 0, None, 0, 0, last_received=99.9, unanswered_data_since=100.0)
    update = update_status(status, facts, died)
    assert update.status.state is PeerState.UP
    assert update.deadline == 115.0
    down = update_status(update.status, facts, update.deadline)
    assert down.status.state is PeerState.DOWN
    moved = cycle(down.status, [E0, E1], 115.0)
    assert moved is not None and moved.endpoint == E1
    up = update_status(moved, LinkFacts(E1, 115.05, 0, 115.0, 0, 0, 115.05), 115.05)
    assert up.status.state is PeerState.UP
    assert 115.05 - died < 20


def test_endpoint_dying_with_keepalives_only_is_found_at_the_next_rekey() -> None:
    """Silence alone is not death: on an idle pair our keepalives keep the peer quiet
    (WireGuard re-arms its keepalive timer on what it receives). The next rekey, at most
    180 s after the last handshake, goes unanswered, and the handshake rule cycles."""
    status = PeerStatus(
        label="n", state=PeerState.UP, endpoint=E0, last_used_endpoint=E0, last_endpoint_change=0
    )
    died = 100.0
    quiet = LinkFacts(E0, 1.0, 0, None, 0, 0, last_received=died - 0.001)
    assert update_status(status, quiet, died + 60).status.state is PeerState.UP
    rekey = LinkFacts(E0, 1.0, 2, 186.0, 0, 0, last_received=died - 0.001)
    deadline = update_status(status, rekey, 186.0).deadline
    assert deadline == pytest.approx(186.0 + 6)
    down = update_status(status, rekey, deadline)
    assert down.status.state is PeerState.DOWN
    moved = cycle(down.status, [E0, E1], deadline)
    assert moved is not None and moved.endpoint == E1


def spec(n: int) -> PeerSpec:
    return PeerSpec(
        public_key=bytes([n]) * 32,
        affiliate_id=f"node{n}",
        label=f"n{n}",
        address=ipaddress.IPv6Address(f"fd00::{n + 1}"),
        allowed_ips=(),
        endpoints=(),
    )


def test_observed_endpoints_of_up_peers() -> None:
    specs = [spec(1), spec(2), spec(3)]
    sticky = Endpoint("198.51.100.1", 4000, local="10.0.0.1", ifindex=2)
    statuses = {
        specs[0].public_key: PeerStatus(label="n1", state=PeerState.UP, endpoint=sticky),
        specs[1].public_key: PeerStatus(label="n2", state=PeerState.DOWN, endpoint=E1),
        specs[2].public_key: PeerStatus(label="n3", state=PeerState.UP, endpoint=None),
    }
    expected = [ObservedEndpoint(specs[0].id, "node1", Endpoint("198.51.100.1", 4000))]
    assert observed_endpoints(specs, statuses, None) == expected
    assert observed_endpoints(specs, statuses, False) == []


def test_harvest_is_automatic_up_to_50_peers() -> None:
    specs = [spec(n) for n in range(HARVEST_PEER_LIMIT + 1)]
    statuses = {
        s.public_key: PeerStatus(label=s.label, state=PeerState.UP, endpoint=E0) for s in specs
    }
    assert observed_endpoints(specs, statuses, None) == []
    assert len(observed_endpoints(specs, statuses, True)) == HARVEST_PEER_LIMIT + 1
    assert len(observed_endpoints(specs[:HARVEST_PEER_LIMIT], statuses, None)) == HARVEST_PEER_LIMIT
