"""The node's registration with its relay, sans-IO: when to say hello, what to answer a
challenge with, and which transport to use.

The node registers at start and every REFRESH seconds (a registration lasts the
relay's lifetime, 60 s), so peers can reach it through the relay at any moment; the
refreshes also keep its NAT mapping toward the relay open. A hello unanswered for RETRY
is repeated; after UDP_ATTEMPTS of them the session switches transport (UDP to TCP, and
back again if TCP does not answer either), so a node whose UDP is blocked ends up on TCP
within about UDP_ATTEMPTS * RETRY seconds.

The relay ignores frames of sources it does not know, and forgets everyone when it
restarts; so when relayed datagrams go out and nothing comes back for SILENCE seconds,
the node registers again at once rather than at its next refresh.
"""

from __future__ import annotations

import enum

from uspan.discovery.proof import MemberKey
from uspan.relay import frames
from uspan.relay.frames import FrameError

REFRESH = 20.0
RETRY = 1.0
UDP_ATTEMPTS = 3
SILENCE = 3.0  # relayed datagrams sent and nothing delivered for this long: register again


class Transport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


class RelaySession:
    """One node's registration: feed it frames from the relay and ``tick`` it."""

    def __init__(self, member_key: MemberKey, address: bytes) -> None:
        self.key = member_key
        self.address = address
        self.transport = Transport.UDP
        self.registered_until = 0.0
        self.refresh_at = 0.0
        self.hello_at: float | None = None
        self.unanswered = 0
        self.dropped = 0  # control frames that made no sense (wrong kind, not ours)
        self.silent_since: float | None = None  # first relayed send since a delivery

    def registered(self, now: float) -> bool:
        return now < self.registered_until

    def sent(self, now: float) -> None:
        """Relayed datagrams went out."""
        if self.silent_since is None:
            self.silent_since = now

    def delivered(self) -> None:
        """A relayed datagram came in: the registration works."""
        self.silent_since = None

    def tick(self, now: float) -> list[bytes]:
        """Frames to send to the relay now (on ``self.transport``, which this may change)."""
        if self.silent_since is not None and now - self.silent_since >= SILENCE:
            self.silent_since = None  # look again SILENCE after this registration
            self.refresh_at = min(self.refresh_at, now)
        if now < self.refresh_at or (self.hello_at is not None and now - self.hello_at < RETRY):
            return []
        if self.unanswered >= UDP_ATTEMPTS:
            self.transport = Transport.TCP if self.transport is Transport.UDP else Transport.UDP
            self.unanswered = 0
        self.unanswered += 1
        self.hello_at = now
        return [frames.encode(frames.Hello())]

    def next_deadline(self) -> float:
        if self.hello_at is not None:
            return self.hello_at + RETRY
        if self.silent_since is not None:
            return min(self.refresh_at, self.silent_since + SILENCE)
        return self.refresh_at

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """A control frame from the relay (CHALLENGE or REGISTERED): what to send back."""
        try:
            frame = frames.decode(data)
        except FrameError:
            self.dropped += 1
            return []
        if isinstance(frame, frames.Challenge) and self.hello_at is not None:
            message = frames.signed_message(frame.nonce, self.key.public, self.address)
            return [frames.encode(frames.Register(frame.nonce, self.key.public, self.address,
                                                  self.key.sign(message)))]
        if isinstance(frame, frames.Registered) and frame.address == self.address:
            self.registered_until = now + frame.lifetime
            self.refresh_at = now + min(REFRESH, frame.lifetime / 3)
            self.hello_at = None
            self.unanswered = 0
            return []
        self.dropped += 1
        return []

    def connection_lost(self, now: float) -> None:
        """The TCP connection broke: register again at once (on whichever transport)."""
        self.registered_until = 0.0
        self.refresh_at = now
        self.hello_at = None
