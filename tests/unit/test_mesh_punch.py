"""Hole punching on explicit ``now`` values: the puncher alone, then two controllers
exchanging their affiliates as discovery would carry them."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_mesh_controller import (
    AFFILIATES,
    E1,
    K1,
    LOCAL_KEY,
    config,
    member,
    started,
)
from uspan.mesh.affiliate import KubeSpanInfo
from uspan.mesh.controller import PeerController
from uspan.mesh.punch import INTERVAL, TTL, Puncher, PunchRequest
from uspan.mesh.resources import Store
from uspan.mesh.status import LinkFacts, PeerState
from uspan.relay.addressing import is_relayed
from uspan.wg.endpoint import Endpoint

OURS = Endpoint("203.0.113.1", 51820)
THEIRS = Endpoint("203.0.113.2", 40002)
PEER = b"p" * 32


def test_a_down_peer_gets_a_request_once_per_interval_and_it_expires():
    puncher = Puncher(seq=100)
    step = puncher.step(0.0, [OURS], [PEER], {})
    assert (step.punch, step.republish, step.deadline) == ([], True, TTL)
    assert puncher.requests() == (PunchRequest(PEER, OURS, 101),)
    assert puncher.step(1.0, [OURS], [PEER], {}).republish is False
    expired = puncher.step(TTL, [OURS], [PEER], {})
    assert expired.republish is True and puncher.requests() == ()
    assert puncher.step(TTL + 1, [OURS], [PEER], {}).republish is False  # not yet again
    assert puncher.step(INTERVAL, [OURS], [PEER], {}).republish is True
    assert puncher.requests() == (PunchRequest(PEER, OURS, 102),)


def test_a_peer_that_was_up_in_between_gets_a_new_request_at_once():
    puncher = Puncher()
    puncher.step(0.0, [OURS], [PEER], {})
    puncher.step(TTL, [OURS], [], {}, up=[PEER])  # punched through, then up
    assert puncher.step(TTL + 5, [OURS], [PEER], {}).republish is True  # lost again


def test_without_a_reflexive_endpoint_nothing_is_requested():
    puncher = Puncher()
    assert puncher.step(0.0, [], [PEER], {}).republish is False
    assert puncher.requests() == ()


def test_an_offer_is_acted_on_once_and_answered_with_our_own_request():
    puncher = Puncher(seq=5)
    offer = PunchRequest(LOCAL_KEY, THEIRS, 77)
    step = puncher.step(0.0, [OURS], [], {PEER: offer})
    assert step.punch == [(PEER, THEIRS)] and step.republish is True
    assert puncher.requests() == (PunchRequest(PEER, OURS, 6),)
    assert puncher.step(0.5, [OURS], [], {PEER: offer}).punch == []  # the same one again
    newer = replace(offer, seq=78)
    assert puncher.step(40.0, [OURS], [], {PEER: newer}).punch == [(PEER, THEIRS)]


def test_two_controllers_punch_toward_each_other_through_their_affiliates():
    """n0 (LOCAL_KEY) finds n1 down and asks; n1 sees the request and answers; each then
    aims the other at the endpoint in the other's request, with a handshake."""
    n0, _ = started()
    n0.set_reflexive([OURS], 0.0)
    n0.set_affiliates(AFFILIATES[:2], {}, 0.0)
    out = n0.set_facts({K1: LinkFacts(E1, None, 2, 5.1, 0, 296)}, 11.1)  # n1 is down
    assert out.republish is True
    [request] = n0.punch_requests()
    assert (request.peer_key, request.endpoint) == (K1, OURS)
    # n1's answer arrives through discovery: its request toward us, at its own mapping
    info = AFFILIATES[1].kubespan
    assert isinstance(info, KubeSpanInfo)
    answer = PunchRequest(LOCAL_KEY, THEIRS, 9)
    n1 = member(1, K1, E1, THEIRS)
    n1 = replace(n1, kubespan=replace(n1.kubespan, punch=(answer,)))
    out = n0.set_affiliates([AFFILIATES[0], n1], {}, 11.3)
    [peer] = out.device_change.peers
    assert (peer.public_key, peer.endpoint, peer.handshake) == (K1, THEIRS, True)
    assert n0.statuses[K1].state is PeerState.UNKNOWN
    assert out.deadline is not None and out.deadline <= 11.3 + 11
    # up through the hole: no more punching, even if the request is still published
    up = n0.set_facts({K1: LinkFacts(THEIRS, 11.4, 0, 11.3, 92, 148)}, 11.4)
    assert n0.statuses[K1].state is PeerState.UP and up.device_change.peers == []


def test_a_request_from_a_peer_that_is_up_for_us_gets_a_handshake_where_it_is():
    """It lost us (our NAT forgot its mapping), we did not lose it: our handshake from
    behind our NAT opens the mapping again; its endpoint stays."""
    n0, _ = started()
    n0.set_reflexive([OURS], 0.0)
    n0.set_affiliates(AFFILIATES[:2], {}, 0.0)
    n0.set_facts({K1: LinkFacts(E1, 0.2, 0, 0.0, 92, 148)}, 0.2)
    assert n0.statuses[K1].state is PeerState.UP
    n1 = member(1, K1, E1, THEIRS)
    n1 = replace(n1, kubespan=replace(n1.kubespan, punch=(PunchRequest(LOCAL_KEY, THEIRS, 3),)))
    out = n0.set_affiliates([AFFILIATES[0], n1], {}, 30.0)
    [peer] = out.device_change.peers
    assert (peer.public_key, peer.endpoint, peer.handshake) == (K1, None, True)
    assert n0.statuses[K1].endpoint == E1 and out.republish is True  # and it answers


def test_asking_a_down_peer_also_aims_at_its_mapping_and_opens_our_nat():
    n0, _ = started()
    n0.set_reflexive([OURS], 0.0)
    n1 = member(1, K1, E1, THEIRS)  # its own address, then its NAT's mapping
    n0.set_affiliates([AFFILIATES[0], n1], {}, 0.0)
    out = n0.set_facts({K1: LinkFacts(E1, None, 2, 5.1, 0, 296)}, 11.1)  # down on E1
    assert out.republish is True and out.punched == [("h1", THEIRS)]
    [peer] = out.device_change.peers
    assert (peer.public_key, peer.endpoint, peer.handshake) == (K1, THEIRS, True)


def test_not_behind_nat_no_punching():
    n0, _ = started()  # set_reflexive never called: the node's reflexive endpoint is its own
    n0.set_affiliates([AFFILIATES[0], member(1, K1, E1, THEIRS)], {}, 0.0)
    out = n0.set_facts({K1: LinkFacts(E1, None, 2, 5.1, 0, 296)}, 11.1)
    assert out.republish is False and n0.punch_requests() == () and out.punched == []


def test_an_offer_does_not_pull_a_peer_off_the_relay_it_came_through():
    """The peer's initiation came through the relay (the core roamed it there; not yet
    confirmed, so still unknown) when its punch request arrives. Our UDP may be blocked
    (the relay is then all we have), so it gets a handshake where it is, which the shell
    also sends to its direct endpoints, rather than being moved off the path that
    answers (found by the relay system test: a UDP-blocked node showed the peer up on a
    direct endpoint it could not reach)."""
    n0 = PeerController("node0", LOCAL_KEY, config(relay="192.0.2.254:3001"),
                        Store(wall_offset=0.0))
    n1 = member(1, K1, E1, THEIRS)
    n0.set_affiliates([AFFILIATES[0], n1], {}, 0.0)
    relay = n0.candidates(n0.specs[0])[-1]
    assert is_relayed(relay)
    n0.set_facts({K1: LinkFacts(relay, None, 0, None, 148, 0, last_received=0.5)}, 0.5)
    assert (n0.statuses[K1].state, n0.statuses[K1].endpoint) == (PeerState.UNKNOWN, relay)
    n1 = replace(n1, kubespan=replace(n1.kubespan, punch=(PunchRequest(LOCAL_KEY, THEIRS, 4),)))
    out = n0.set_affiliates([AFFILIATES[0], n1], {}, 0.6)
    [peer] = out.device_change.peers
    assert (peer.public_key, peer.endpoint, peer.handshake) == (K1, None, True)
    assert n0.statuses[K1].endpoint == relay
    # confirmed through the relay: up there, not on the endpoint in the request
    n0.set_facts({K1: LinkFacts(relay, 0.7, 0, None, 240, 92, last_received=0.7)}, 0.7)
    assert (n0.statuses[K1].state, n0.statuses[K1].endpoint) == (PeerState.UP, relay)

