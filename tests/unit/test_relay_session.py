"""The node's registration state, on a fake clock: refresh, retries, the TCP fallback, the
way back to UDP and a dead TCP connection."""

from __future__ import annotations

import itertools
import math

from uspan.discovery.proof import MemberKey
from uspan.node.relaylink import DRAIN
from uspan.relay import frames, session
from uspan.relay.forwarding import Forwarder, Source
from uspan.relay.session import ATTEMPTS, RETRY, Out, RelaySession, Transport

KEY = MemberKey(b"s" * 32, "cluster")
HELLO = frames.encode(frames.Hello())
UDP, TCP = Transport.UDP, Transport.TCP
SOURCES: dict[Transport, Source] = {UDP: ("192.0.2.1", 51820), TCP: 7}


class World:
    """A client, a relay, and which transports reach it."""

    def __init__(self) -> None:
        self.relay, self.client = Forwarder(), RelaySession(KEY, b"aaaaaaaa")
        self.reaches = {UDP: True, TCP: True}
        self.sent: Out = []

    def tick(self, now: float) -> Out:
        """Tick the client and run its exchange with the relay to the end."""
        out = self.client.tick(now)
        first = list(out)
        while out:
            frame, transport = out.pop(0)
            self.sent.append((frame, transport))
            if not self.reaches[transport]:
                continue
            via = self.via(transport)
            for answer, _ in self.relay.receive(frame, SOURCES[transport], now):
                out += [(f, transport) for f in self.client.receive(answer, now, via)]
        return first

    def via(self, transport: Transport) -> int | None:
        """What the link names a frame's way in by: the TCP connection's number (the
        latest), None for UDP."""
        return None if transport is UDP else self.client.connection

    def run(self, start: float, end: float) -> float:
        """Tick at every deadline from ``start`` until ``end``; the time it stopped."""
        now = start
        while now < end:
            self.tick(now)
            now = max(now, self.client.next_deadline())
        return now

    def fall_back(self) -> float:
        """UDP blocked from 0: on TCP, connected and registered at the returned time."""
        self.reaches[UDP] = False
        now = 0.0
        for _ in range(ATTEMPTS):
            assert self.tick(now) == [(HELLO, UDP)]
            now += RETRY
        assert self.tick(now) == [] and self.client.transport is TCP
        assert self.client.fallbacks == 1 and not self.client.connected
        self.client.tcp_connected(now)  # (the link connects when the transport is TCP)
        assert self.tick(now) == [(HELLO, TCP)] and self.client.registered(now)
        return now


def test_registers_then_refreshes() -> None:
    relay, client = Forwarder(), RelaySession(KEY, b"aaaaaaaa")
    now = 10.0
    ((hello, via),) = client.tick(now)
    assert via is UDP
    assert client.tick(now + 0.5) == []  # waiting for the answer
    ((challenge, _),) = relay.receive(hello, "x", now)
    ((registered, _),) = relay.receive(client.receive(challenge, now)[0], "x", now)
    assert client.receive(registered, now) == []
    assert client.registered(now) and client.transport is UDP
    assert client.next_deadline() == now + session.REFRESH
    assert client.tick(now + session.REFRESH - 0.1) == []
    assert client.tick(now + session.REFRESH) == [(HELLO, UDP)]
    assert client.registered(now + session.REFRESH)  # still, until the lifetime


def test_falls_back_to_tcp_after_unanswered_hellos_and_registers_once_connected() -> None:
    world = World()
    world.fall_back()
    assert world.relay.sessions[SOURCES[TCP]].address == b"aaaaaaaa"
    assert [t for _, t in world.sent].count(TCP) == 2  # HELLO, REGISTER: none lost before


def test_on_tcp_tries_udp_with_backoff_and_returns_when_the_relay_answers() -> None:
    world = World()
    client = world.client
    fell_back = world.fall_back()
    world.sent.clear()
    now = world.run(fell_back, fell_back + 1000)
    probes = [f for f, t in world.sent if t is UDP]
    assert probes and all(f == HELLO for f in probes) and client.transport is TCP
    # the first try PROBE_FIRST after the fallback, then doubling intervals up to PROBE_MAX
    assert client.probe_interval == session.PROBE_MAX
    assert client.registered(now) and client.reconnects == 0  # TCP kept alive meanwhile
    world.reaches[UDP] = True  # the firewall rule is lifted
    world.sent.clear()
    lifted = until = now
    while client.transport is TCP:
        until = now
        world.tick(until)
        now = max(now, client.next_deadline())
    assert until - lifted <= session.PROBE_MAX and client.udp_returns == 1
    assert not client.connected  # the link closes the connection (after draining it)
    assert world.relay.sessions[SOURCES[UDP]].address == b"aaaaaaaa"
    assert world.relay.receive(frames.send_frame(b"aaaaaaaa", b"x"), SOURCES[TCP], until)
    assert client.registered(until) and client.next_deadline() == until + session.REFRESH


def test_backoff_schedule() -> None:
    world = World()
    client = world.client
    now = world.fall_back()
    probes: list[float] = []
    while now < 2000:
        probes += [now for _, t in world.tick(now) if t is UDP]
        now = client.next_deadline()
    starts = [b for a, b in itertools.pairwise([-math.inf, *probes]) if b - a > RETRY]
    assert starts[0] == ATTEMPTS * RETRY + session.PROBE_FIRST  # (fell back at that time)
    # each try takes ATTEMPTS hellos (ATTEMPTS * RETRY), then waits twice as long
    waits = [gap - ATTEMPTS * RETRY for gap in (b - a for a, b in itertools.pairwise(starts))]
    assert waits[:4] == [30.0, 60.0, 120.0, 240.0] and set(waits[4:]) == {session.PROBE_MAX}


def test_after_an_outage_of_the_relay_udp_is_tried_again_soon() -> None:
    world = World()
    client = world.client
    world.reaches[UDP] = False  # the relay is down: UDP unanswered, TCP refused
    now = 0.0
    while now < 1000:
        world.tick(now)
        now = client.next_deadline()
    assert client.transport is TCP and client.probe_interval == session.PROBE_MAX
    world.reaches[UDP] = True  # it is back
    client.tcp_connected(now)
    world.tick(now)
    assert client.registered(now) and client.probe_at <= now + session.PROBE_FIRST
    while client.transport is TCP:
        assert now <= client.probe_at + ATTEMPTS * RETRY
        world.tick(now)
        now = client.next_deadline()


def test_a_dead_tcp_connection_is_noticed_in_bounded_time() -> None:
    world = World()
    client = world.client
    now = world.fall_back()
    # traffic keeps the connection heard: no keepalive while deliveries come in, only
    # the refresh of the registration
    to_tcp = []
    for step in range(1, 30):
        client.delivered(now + step, client.connection)
        to_tcp += [f for f, t in world.tick(now + step) if t is TCP]
    assert to_tcp == [HELLO]
    now += 29
    world.reaches[TCP] = False  # a NAT rebooted: the connection is silently dead
    dead_at = noticed = now
    while client.connected:
        noticed = now
        world.tick(noticed)
        now = client.next_deadline()
    assert noticed - dead_at <= session.KEEPALIVE + ATTEMPTS * RETRY
    now = noticed
    assert client.reconnects == 1 and not client.registered(now)
    assert client.transport is TCP  # on a new connection, not a detour through UDP
    world.reaches[TCP] = True
    client.tcp_connected(now)
    assert (HELLO, TCP) in world.tick(now) and client.registered(now)


def test_a_closed_connection_counts_once_and_registers_on_the_next() -> None:
    world = World()
    client = world.client
    now = world.fall_back()
    client.tcp_closed(client.connection)
    client.tcp_closed(client.connection)
    assert client.reconnects == 1 and not client.registered(now)
    assert all(t is UDP for _, t in world.tick(now + 1))  # nothing for TCP until connected
    client.tcp_connected(now + 2)
    assert (HELLO, TCP) in world.tick(now + 2) and client.registered(now + 2)


def test_one_registration_at_a_time_and_late_tcp_answers_ignored() -> None:
    world = World()
    client = world.client
    now = world.fall_back()
    probe_at = client.probe_at
    client.heard_at = probe_at - 0.5 - session.KEEPALIVE  # a keepalive just before the probe
    world.reaches[TCP] = False
    assert world.tick(probe_at - 0.5) == [(HELLO, TCP)]
    assert world.tick(probe_at) == []  # the probe waits for it
    assert client.next_deadline() == probe_at + 0.5
    world.reaches[TCP] = world.reaches[UDP] = True
    assert world.tick(probe_at + 0.5) == [(HELLO, TCP)]
    assert client.registered(probe_at + 0.5) and client.transport is TCP
    assert world.tick(probe_at + 0.5) == [(HELLO, UDP)]  # now the probe
    assert client.transport is UDP
    late_challenge = frames.encode(frames.Challenge(bytes(32)))
    dropped = client.dropped
    assert client.receive(late_challenge, now, client.connection) == []
    assert client.dropped == dropped


def test_ignores_frames_that_are_not_for_it() -> None:
    client = RelaySession(KEY, b"aaaaaaaa")
    assert client.receive(frames.encode(frames.Challenge(bytes(32))), 0.0) == []  # no hello
    assert client.receive(frames.encode(frames.Registered(b"bbbbbbbb", 60)), 0.0) == []
    assert client.receive(b"junk", 0.0) == []
    assert client.dropped == 3 and not client.registered(0.0)


def test_relayed_sends_met_with_silence_register_again_at_once() -> None:
    relay, client = Forwarder(), RelaySession(KEY, b"aaaaaaaa")
    ((hello, _),) = client.tick(0.0)
    ((challenge, _),) = relay.receive(hello, "x", 0.0)
    ((registered, _),) = relay.receive(client.receive(challenge, 0.0)[0], "x", 0.0)
    client.receive(registered, 0.0)
    client.sent(1.0)
    client.delivered(1.5)  # an answer: all is well
    assert client.tick(1.0 + session.SILENCE) == []
    client.sent(2.0)  # the relay restarted and ignores us
    assert client.next_deadline() == 2.0 + session.SILENCE
    assert client.tick(2.0 + session.SILENCE - 0.1) == []
    assert client.tick(2.0 + session.SILENCE) == [(HELLO, UDP)]


def test_a_registered_nobody_asked_for_moves_nothing() -> None:
    """REGISTERED is not signed: one spoofed over UDP (the relay's address as its source)
    took a node on TCP off its working connection, onto blocked UDP, for ~3 s each."""
    world = World()
    client = world.client
    now = world.fall_back() + 2.0
    unasked = frames.encode(frames.Registered(b"aaaaaaaa", 0))
    dropped = client.dropped
    assert client.receive(unasked, now) == []  # (over UDP)
    assert client.transport is TCP and client.connected and client.registered(now)
    assert client.udp_returns == 0 and client.dropped == dropped + 1


def test_a_drained_connection_that_ends_late_leaves_its_successor_alone() -> None:
    """Back on UDP, the old connection drains for DRAIN seconds; if UDP fails again
    meanwhile, a new connection opens. What the old one then reports (a late frame, a
    delivery, its close) is not about the new one: its close took the new, working
    connection down (reconnects + 1, registration lost, the link replacing it)."""
    world = World()
    client = world.client
    now = world.fall_back()
    old = client.connection
    now = world.run(now, client.probe_at)
    world.tick(now)  # the first try of UDP: blocked
    world.reaches[UDP] = True
    now = client.next_deadline()
    world.tick(now)
    assert client.transport is UDP and client.udp_returns == 1  # old left to drain
    world.reaches[UDP] = False  # blocked again, within the drain
    returned, now = now, now + 1
    client.rebound(now)  # (the WireGuard socket moved: register at once)
    for _ in range(ATTEMPTS + 1):
        world.tick(now)
        now += RETRY
    now -= RETRY
    assert client.transport is TCP and client.fallbacks == 2
    assert now - returned < DRAIN  # the old connection is still draining
    new = client.tcp_connected(now)
    world.tick(now)
    assert new != old and client.connected and client.registered(now)
    reconnects, heard_at = client.reconnects, client.heard_at
    late = frames.encode(frames.Registered(b"aaaaaaaa", 60))
    assert client.receive(late, now + 1, old) == []
    client.delivered(now + 1, old)
    client.tcp_closed(old)  # the draining connection ends before its deadline
    assert client.connected and client.registered(now + 1)
    assert client.reconnects == reconnects and client.heard_at == heard_at
    client.tcp_closed(new)
    assert not client.connected and client.reconnects == reconnects + 1
