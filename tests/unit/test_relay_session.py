"""The node's registration state, on a fake clock: refresh, retries, the TCP fallback."""

from __future__ import annotations

from uspan.discovery.proof import MemberKey
from uspan.relay import frames, session
from uspan.relay.forwarding import Forwarder
from uspan.relay.session import RelaySession, Transport

KEY = MemberKey(b"s" * 32, "cluster")


def test_registers_then_refreshes() -> None:
    relay, client = Forwarder(), RelaySession(KEY, b"aaaaaaaa")
    now = 10.0
    (hello,) = client.tick(now)
    assert client.tick(now + 0.5) == []  # waiting for the answer
    ((challenge, _),) = relay.receive(hello, "x", now)
    ((registered, _),) = relay.receive(client.receive(challenge, now)[0], "x", now)
    assert client.receive(registered, now) == []
    assert client.registered(now) and client.transport is Transport.UDP
    assert client.next_deadline() == now + session.REFRESH
    assert client.tick(now + session.REFRESH - 0.1) == []
    assert client.tick(now + session.REFRESH) == [frames.encode(frames.Hello())]
    assert client.registered(now + session.REFRESH)  # still, until the lifetime


def test_falls_back_to_tcp_after_unanswered_hellos_and_back_if_tcp_fails() -> None:
    client = RelaySession(KEY, b"aaaaaaaa")
    now = 0.0
    for _ in range(session.UDP_ATTEMPTS):
        assert client.tick(now) and client.transport is Transport.UDP
        now += session.RETRY
    assert client.tick(now) and client.transport is Transport.TCP
    now += session.RETRY * session.UDP_ATTEMPTS
    client.tick(now)
    client.tick(now + session.RETRY)
    client.tick(now + 2 * session.RETRY)
    assert client.transport is Transport.UDP


def test_ignores_frames_that_are_not_for_it() -> None:
    client = RelaySession(KEY, b"aaaaaaaa")
    assert client.receive(frames.encode(frames.Challenge(bytes(32))), 0.0) == []  # no hello
    assert client.receive(frames.encode(frames.Registered(b"bbbbbbbb", 60)), 0.0) == []
    assert client.receive(b"junk", 0.0) == []
    assert client.dropped == 3 and not client.registered(0.0)


def test_relayed_sends_met_with_silence_register_again_at_once() -> None:
    relay, client = Forwarder(), RelaySession(KEY, b"aaaaaaaa")
    (hello,) = client.tick(0.0)
    ((challenge, _),) = relay.receive(hello, "x", 0.0)
    ((registered, _),) = relay.receive(client.receive(challenge, 0.0)[0], "x", 0.0)
    client.receive(registered, 0.0)
    client.sent(1.0)
    client.delivered()  # an answer: all is well
    assert client.tick(1.0 + session.SILENCE) == []
    client.sent(2.0)  # the relay restarted and ignores us
    assert client.next_deadline() == 2.0 + session.SILENCE
    assert client.tick(2.0 + session.SILENCE - 0.1) == []
    assert client.tick(2.0 + session.SILENCE) == [frames.encode(frames.Hello())]
