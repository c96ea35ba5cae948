"""The relay's forwarding rules, sans-IO: membership proof, nonces, namespaces, limits."""

from __future__ import annotations

import pytest

from uspan.discovery.proof import MemberKey
from uspan.relay import forwarding, frames
from uspan.relay.forwarding import Forwarder, Source
from uspan.relay.session import RelaySession

A, B, C = ("192.0.2.1", 1000), ("192.0.2.2", 2000), ("192.0.2.3", 3000)
KEY = MemberKey(b"s" * 32, "cluster")


def register(relay: Forwarder, source: Source, address: bytes, now: float = 100.0,
             key: MemberKey = KEY) -> list[tuple[bytes, Source]]:
    """A client's whole registration through a real ``RelaySession``."""
    session = RelaySession(key, address)
    ((hello, _),) = session.tick(now)
    ((challenge, to),) = relay.receive(hello, source, now)
    assert to == source
    (register_frame,) = session.receive(challenge, now)
    out = relay.receive(register_frame, source, now)
    for frame, _ in out:
        session.receive(frame, now)
    assert session.registered(now) == bool(out)
    return out


def test_forwards_between_members_only_with_the_senders_address() -> None:
    relay = Forwarder()
    register(relay, A, b"aaaaaaaa")
    register(relay, B, b"bbbbbbbb")
    out = relay.receive(frames.send_frame(b"bbbbbbbb", b"wg-datagram"), A, 101.0)
    assert out == [(frames.encode(frames.Deliver(b"aaaaaaaa", b"wg-datagram")), B)]
    assert (relay.forwarded, relay.forwarded_bytes) == (1, len(b"wg-datagram"))


def test_non_member_frames_are_dropped_and_counted() -> None:
    relay = Forwarder()
    register(relay, B, b"bbbbbbbb")
    assert relay.receive(frames.send_frame(b"bbbbbbbb", b"x"), C, 101.0) == []
    assert relay.dropped[forwarding.NOT_MEMBER] == 1
    assert relay.receive(b"garbage", C, 101.0) == []
    assert relay.dropped[forwarding.BAD_FRAME] == 1


def test_never_across_clusters() -> None:
    relay = Forwarder()
    other = MemberKey(b"s" * 32, "another-cluster")
    register(relay, A, b"aaaaaaaa")
    register(relay, C, b"bbbbbbbb", key=other)  # same address, other cluster
    assert relay.receive(frames.send_frame(b"bbbbbbbb", b"x"), A, 101.0) == []
    assert relay.dropped[forwarding.NO_DESTINATION] == 1


def test_a_wrong_secret_is_another_namespace() -> None:
    relay = Forwarder()
    register(relay, A, b"aaaaaaaa")
    register(relay, C, b"bbbbbbbb", key=MemberKey(b"t" * 32, "cluster"))
    assert relay.receive(frames.send_frame(b"bbbbbbbb", b"x"), A, 101.0) == []


def test_registration_replayed_from_elsewhere_or_later_is_refused() -> None:
    relay = Forwarder()
    session = RelaySession(KEY, b"aaaaaaaa")
    ((challenge, _),) = relay.receive(session.tick(100.0)[0][0], A, 100.0)
    (register_frame,) = session.receive(challenge, 100.0)
    assert relay.receive(register_frame, C, 100.0) == []  # another source
    assert relay.receive(register_frame, A, 100.0 + forwarding.NONCE_LIFETIME) == []  # stale
    assert relay.dropped[forwarding.BAD_NONCE] == 2
    forged = register_frame[:-1] + bytes([register_frame[-1] ^ 1])
    assert relay.receive(forged, A, 100.0) == []
    assert relay.dropped[forwarding.BAD_PROOF] == 1
    assert relay.sessions == {}


def test_registrations_expire_and_a_node_that_moves_keeps_its_address() -> None:
    relay = Forwarder()
    register(relay, A, b"aaaaaaaa")
    register(relay, B, b"bbbbbbbb")
    register(relay, C, b"bbbbbbbb", now=110.0)  # B's node behind a new NAT mapping
    out = relay.receive(frames.send_frame(b"bbbbbbbb", b"x"), A, 111.0)
    assert [target for _, target in out] == [C]
    assert relay.addresses == 2
    # what the node sent from its old source before it moved still goes through ...
    from_old = relay.receive(frames.send_frame(b"aaaaaaaa", b"y"), B, 111.0)
    assert from_old == [(frames.encode(frames.Deliver(b"bbbbbbbb", b"y")), A)]
    # ... for a grace period only, and the old source is forgotten with it
    assert relay.receive(frames.send_frame(b"aaaaaaaa", b"y"), B, 110.0 + forwarding.GRACE) == []
    relay.expire(110.0 + forwarding.GRACE)
    assert B not in relay.sessions
    register(relay, B, b"bbbbbbbb", now=121.0)  # and it may move back (to UDP from TCP)
    register(relay, C, b"bbbbbbbb", now=122.0)  # and again, while B may still send
    register(relay, B, b"bbbbbbbb", now=123.0)
    out = relay.receive(frames.send_frame(b"bbbbbbbb", b"x"), A, 124.0)
    assert [target for _, target in out] == [B]
    later = 100.0 + forwarding.LIFETIME + 1
    assert relay.receive(frames.send_frame(b"bbbbbbbb", b"x"), A, later) == []
    relay.expire(later)
    assert set(relay.sessions) == {B} and relay.addresses == 1


def test_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarding, "MAX_PER_KEY", 1)
    relay = Forwarder()
    register(relay, A, b"aaaaaaaa")
    assert register(relay, B, b"bbbbbbbb") == []
    assert relay.dropped[forwarding.LIMIT] == 1
    assert register(relay, A, b"aaaaaaaa", now=101.0) != []  # a refresh is not a new one


def test_tcp_connection_closing_forgets_its_registration() -> None:
    relay = Forwarder()
    register(relay, 7, b"aaaaaaaa")
    relay.forget(7)
    assert relay.sessions == {}


def test_a_replayed_registration_cannot_move_an_address_back() -> None:
    """A REGISTER recorded on the path and replayed from the node's old UDP source while
    its nonce is fresh moved the node's address back there (its datagrams lost) until
    the node registered again; the nonce it signed is older than the one in use."""
    relay = Forwarder()
    register(relay, B, b"bbbbbbbb")
    node = RelaySession(KEY, b"aaaaaaaa")
    ((challenge, _),) = relay.receive(node.tick(100.0)[0][0], A, 100.0)
    (recorded,) = node.receive(challenge, 100.0)
    assert relay.receive(recorded, A, 100.0)  # registered over UDP from A
    register(relay, 7, b"aaaaaaaa", now=105.0)  # UDP blocked: on TCP
    for late in (106.0, 110.0 + forwarding.GRACE, 100.0 + forwarding.NONCE_LIFETIME - 1):
        assert relay.receive(recorded, A, late) == []  # the replay
        out = relay.receive(frames.send_frame(b"aaaaaaaa", b"x"), B, late)
        assert [target for _, target in out] == [7]
    assert relay.dropped[forwarding.SUPERSEDED] == 3
    assert register(relay, A, b"aaaaaaaa", now=170.0)  # a new nonce: back on UDP
    assert relay._by_address[(KEY.public, b"aaaaaaaa")] == A


def test_a_replay_stays_refused_after_the_registration_that_replaced_it_is_gone() -> None:
    """The TCP connection that holds the address closes (a reset, a NAT reboot): the
    recorded older REGISTER, replayed before the node registers again, must still be
    refused, and the address's memory lasts only as long as such a nonce is valid."""
    relay = Forwarder()
    register(relay, B, b"bbbbbbbb")
    node = RelaySession(KEY, b"aaaaaaaa")
    ((challenge, _),) = relay.receive(node.tick(100.0)[0][0], A, 100.0)
    (recorded,) = node.receive(challenge, 100.0)
    assert relay.receive(recorded, A, 100.0)
    register(relay, 7, b"aaaaaaaa", now=105.0)
    relay.forget(7)  # its connection closed
    assert relay.receive(recorded, A, 107.0) == []
    assert relay.dropped[forwarding.SUPERSEDED] == 1
    relay.expire(105.0 + forwarding.NONCE_LIFETIME + 1)
    assert relay._newest == {}
