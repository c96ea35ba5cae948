"""The node's registration with its relay, sans-IO: when to say hello, what to answer a
challenge with, and which transport to use.

The node registers at start and every REFRESH seconds (a registration lasts the
relay's lifetime, 60 s), so peers can reach it through the relay at any moment; the
refreshes also keep its NAT mapping toward the relay open. A hello unanswered for RETRY
is repeated, up to ATTEMPTS hellos.

Transports. UDP first; ATTEMPTS unanswered hellos on UDP fall back to TCP, so a node
whose UDP is blocked ends up on TCP within about ATTEMPTS * RETRY seconds. A block may
be lifted (a firewall rule removed, another network), so while on TCP the node keeps
trying to register over UDP: PROBE_FIRST seconds after the fallback, then at doubling
intervals up to PROBE_MAX, starting over with every new TCP connection. The relay
answering over UDP moves the node's address to its UDP source at once, and the session
switches back; the relay still accepts what the TCP connection sends for a grace period
(``forwarding.GRACE``), so nothing in flight on the way out is lost, and the link keeps
reading the connection a moment for what the relay had queued on it.

TCP liveness. A connection whose NAT state was dropped silently looks open for many
minutes (until the kernel gives up retransmitting). So on TCP, when nothing has come
from the relay for KEEPALIVE seconds the node registers again, which the relay answers
at once, and ATTEMPTS unanswered hellos declare the connection dead: the link replaces
it. A dead connection is noticed within KEEPALIVE + ATTEMPTS * RETRY seconds (13 s; 3 s
more if a try of UDP was under way: one registration at a time).

The relay ignores frames of sources it does not know, and forgets everyone when it
restarts; so when relayed datagrams go out and nothing comes back for SILENCE seconds,
the node registers again at once rather than at its next refresh.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from uspan.discovery.proof import MemberKey
from uspan.relay import frames
from uspan.relay.frames import FrameError

REFRESH = 20.0
RETRY = 1.0
ATTEMPTS = 3  # unanswered hellos before the transport (or TCP connection) is given up
SILENCE = 3.0  # relayed datagrams sent and nothing delivered for this long: register again
KEEPALIVE = 10.0  # on TCP, nothing from the relay for this long: register again
PROBE_FIRST = 15.0  # on TCP, the first try of UDP this long after the fallback
PROBE_MAX = 300.0  # ... then at doubling intervals up to this


class Transport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


Out = list[tuple[bytes, Transport]]  # frames to send to the relay, and on which transport


@dataclass(slots=True)
class _Hellos:
    """One registration attempt on one transport: when its last hello left, how many,
    and whether a REGISTER went out (only then may a REGISTERED come back on it)."""

    sent_at: float | None = None
    count: int = 0
    registering: bool = False


class RelaySession:
    """One node's registration: feed it frames from the relay and ``tick`` it. The link
    reports the TCP connection's ups and downs (``tcp_connected``, ``tcp_closed``) and
    closes a connection the session stops trusting (``connected`` turns false).

    Every TCP connection has a number (``tcp_connected`` returns it), and what the link
    reports of a connection names it: one left to drain may still deliver or close after
    its successor opened, and must not touch the successor's state."""

    def __init__(self, member_key: MemberKey, address: bytes) -> None:
        self.key = member_key
        self.address = address
        self.transport = Transport.UDP
        self.connected = False  # a TCP connection is open and trusted (TCP only)
        self.connection = 0  # the number of the latest TCP connection
        self.registered_until = 0.0
        self.refresh_at = 0.0
        self.heard_at = 0.0  # the last frame from the relay over TCP
        self.probe_at = 0.0  # on TCP: the next try of UDP
        self.probe_interval = PROBE_FIRST
        self.dropped = 0  # control frames that made no sense (wrong kind, not ours)
        self.fallbacks = 0  # switches from UDP to TCP
        self.udp_returns = 0  # switches from TCP back to UDP
        self.reconnects = 0  # TCP connections lost (closed, broken or found dead) in use
        self.silent_since: float | None = None  # first relayed send since a delivery
        self._hellos = {transport: _Hellos() for transport in Transport}

    def registered(self, now: float) -> bool:
        return now < self.registered_until

    def sent(self, now: float) -> None:
        """Relayed datagrams went out."""
        if self.silent_since is None:
            self.silent_since = now

    def delivered(self, now: float, connection: int | None = None) -> None:
        """A relayed datagram came in over UDP, or over TCP connection number
        ``connection``: the registration works (and the connection, if it is ours)."""
        if connection is None:
            self.silent_since = None
        elif self._trusted(connection):
            self.silent_since = None
            self.heard_at = now

    def _trusted(self, connection: int) -> bool:
        """Whether what TCP connection number ``connection`` reports is for us: it is the
        connection in use, not one left to drain or given up."""
        return self.connected and connection == self.connection

    def _attempts(self) -> list[tuple[Transport, float]]:
        """The registrations under way or due, and when each is due."""
        if self.transport is Transport.UDP:
            return [(Transport.UDP, self.refresh_at)]
        attempts = [(Transport.UDP, self.probe_at)]
        if self.connected:
            attempts.append((Transport.TCP, min(self.refresh_at, self.heard_at + KEEPALIVE)))
        return attempts

    def tick(self, now: float) -> Out:
        """Frames to send to the relay now; this may change the transport."""
        if self.silent_since is not None and now >= self.silent_since + SILENCE:
            self.silent_since = None  # look again SILENCE after this registration
            self.refresh_at = min(self.refresh_at, now)
        out: Out = []
        for transport, due in self._attempts():
            hellos = self._hellos[transport]
            if now < self._due(transport, due) or (
                    hellos.sent_at is None and self._hellos[_other(transport)].sent_at is not None):
                continue  # not yet; or one at a time (a late REGISTER on TCP would undo a move)
            if hellos.count >= ATTEMPTS:
                self._unanswered(transport, now)
                break  # the attempts changed
            hellos.count += 1
            hellos.sent_at = now
            out.append((frames.encode(frames.Hello()), transport))
        return out

    def _due(self, transport: Transport, due: float) -> float:
        """When the attempt on ``transport`` next acts: a retry, or its start (not before
        the other transport's attempt next acts)."""
        sent_at = self._hellos[transport].sent_at
        if sent_at is not None:
            return sent_at + RETRY
        other = self._hellos[_other(transport)].sent_at
        return due if other is None else max(due, other + RETRY)

    def _unanswered(self, transport: Transport, now: float) -> None:
        self._hellos[transport] = _Hellos()
        if transport is Transport.TCP:  # the connection is dead: the link replaces it
            self._lose_connection()
        elif self.transport is Transport.UDP:
            self.transport = Transport.TCP
            self.fallbacks += 1
            self.probe_interval = PROBE_FIRST
            self.probe_at = now + PROBE_FIRST
        else:  # UDP is still blocked: try again later
            self.probe_interval = min(2 * self.probe_interval, PROBE_MAX)
            self.probe_at = now + self.probe_interval

    def next_deadline(self) -> float:
        deadlines = [self._due(transport, due) for transport, due in self._attempts()]
        if self.silent_since is not None:
            deadlines.append(self.silent_since + SILENCE)
        return min(deadlines)

    def receive(self, data: bytes, now: float, connection: int | None = None) -> list[bytes]:
        """A control frame from the relay (CHALLENGE or REGISTERED) that came over UDP, or
        over TCP connection number ``connection``: what to send back on it."""
        try:
            frame = frames.decode(data)
        except FrameError:
            self.dropped += 1
            return []
        via = Transport.UDP
        if connection is not None:
            if not self._trusted(connection):
                return []  # a late answer on a connection we left or gave up
            via = Transport.TCP
            self.heard_at = now
        hellos = self._hellos[via]
        if isinstance(frame, frames.Challenge) and hellos.sent_at is not None:
            hellos.registering = True
            message = frames.signed_message(frame.nonce, self.key.public, self.address)
            return [frames.encode(frames.Register(frame.nonce, self.key.public, self.address,
                                                  self.key.sign(message)))]
        if (isinstance(frame, frames.Registered) and frame.address == self.address
                and hellos.registering):
            # Only the answer to our own REGISTER on this transport: REGISTERED is not
            # signed, and one spoofed over UDP moved a node off a working TCP link.
            if via is not self.transport:  # UDP works again, and the relay moved us
                self.transport = Transport.UDP
                self.udp_returns += 1
                self.connected = False
                self._hellos[Transport.TCP] = _Hellos()
            self.registered_until = now + frame.lifetime
            self.refresh_at = now + min(REFRESH, frame.lifetime / 3)
            self._hellos[via] = _Hellos()
            return []
        self.dropped += 1
        return []

    def tcp_connected(self, now: float) -> int:
        """A TCP connection to the relay is open: register on it at once. Something
        changed (the relay is back after an outage, a NAT rebooted), so UDP may work
        now too: its tries start over from PROBE_FIRST. Returns the connection's number."""
        self.connection += 1
        self.connected = True
        self.heard_at = now
        self.refresh_at = now
        self._hellos[Transport.TCP] = _Hellos()
        self.probe_interval = PROBE_FIRST
        self.probe_at = min(self.probe_at, now + PROBE_FIRST)
        return self.connection

    def tcp_closed(self, connection: int) -> None:
        """TCP connection number ``connection`` closed or broke; if it was the one in
        use, the link opens another while on TCP."""
        if self._trusted(connection):
            self._lose_connection()

    def _lose_connection(self) -> None:
        self.connected = False
        self.reconnects += 1
        self.registered_until = 0.0  # the relay forgets a registration with its connection
        self._hellos[Transport.TCP] = _Hellos()

    def rebound(self, now: float) -> None:
        """The WireGuard socket moved to another port: register from it at once (on UDP;
        on TCP the next try of UDP goes from the new port anyway)."""
        if self.transport is Transport.UDP:
            self.registered_until = 0.0
            self.refresh_at = now
            self._hellos[Transport.UDP] = _Hellos()


def _other(transport: Transport) -> Transport:
    return Transport.TCP if transport is Transport.UDP else Transport.UDP
