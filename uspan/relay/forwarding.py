"""The relay's state, sans-IO: who is registered where, and where each frame goes.

A client registers by signing the relay's nonce with its cluster's membership key
(``uspan.discovery.proof.MemberKey``, derived from the cluster secret). Its public key is
the namespace: a frame is forwarded only to an address registered under the same key, so
nodes of different clusters (or of one cluster ID with another secret) never reach each
other, and the relay never needs the secret or even the cluster ID.

Nonces are stateless: ``issued || HMAC(relay secret, issued || source)``, ``issued`` the
relay's clock in microseconds, valid for NONCE_LIFETIME. A REGISTER recorded elsewhere
fails (other source). So unauthenticated traffic costs no memory, and a HELLO (padded to
the challenge's size) cannot amplify.

A registration of an address that another source holds moves it there (a new NAT
mapping, or the node switched between UDP and TCP). The old source may still send for
GRACE seconds, so the datagrams it had on the way when the node switched are not lost.
The signed nonce orders registrations: one whose nonce was issued before that of the
newest accepted registration of the address is refused (SUPERSEDED), so a REGISTER
recorded on the path and replayed from the node's old source, in time, cannot move it
back, even after the registration that replaced it is gone (its TCP connection closed).

Sources are what the shell chooses: ``(ip, port)`` for UDP, a connection
number for TCP. Every call takes ``now``; what the relay should send comes back as
``(frame bytes, destination source)``; everything dropped is counted by reason.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import Counter
from dataclasses import dataclass

from uspan.discovery.proof import ProofError, verify
from uspan.relay import frames
from uspan.relay.frames import FrameError

Source = tuple[str, int] | int  # UDP (ip, port), or a TCP connection's number
Out = list[tuple[bytes, Source]]
NONCE_LIFETIME = 60.0  # seconds a nonce may be answered in
LIFETIME = 60  # seconds a registration lasts; clients refresh it every 20
GRACE = 10.0  # seconds the old source of a moved registration may still send from
MAX_SESSIONS = 65536
MAX_PER_KEY = 1024  # registrations per cluster key, as discovery's affiliates
_ISSUED = struct.Struct(">Q")  # a nonce's first bytes: when it was issued, in microseconds

# Drop reasons (the ``reason`` label of the relay's drop counter).
BAD_FRAME = "bad_frame"  # not a relay frame, or a kind clients do not send
BAD_NONCE = "bad_nonce"  # a REGISTER whose nonce is stale or not for this source
BAD_PROOF = "bad_proof"  # a REGISTER whose signature does not verify
NOT_MEMBER = "not_member"  # a SEND from a source with no live registration
NO_DESTINATION = "no_destination"  # nobody of the sender's cluster has that address
LIMIT = "limit"  # a registration over MAX_SESSIONS / MAX_PER_KEY
SUPERSEDED = "superseded"  # a REGISTER older than the one holding its address (a replay)


@dataclass(slots=True)
class Session:
    key: bytes
    address: bytes
    expires: float


class Forwarder:
    """Registrations by source and by (key, address); counters for the metrics."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = os.urandom(32) if secret is None else secret
        self.sessions: dict[Source, Session] = {}
        self._by_address: dict[tuple[bytes, bytes], Source] = {}
        self._per_key: Counter[bytes] = Counter()
        # Per (key, address): the issue time of the newest nonce a REGISTER for it was
        # accepted with, kept while such a nonce could still be valid, so a replayed older
        # REGISTER cannot move the address back even after its holder is gone.
        self._newest: dict[tuple[bytes, bytes], int] = {}
        self.dropped: Counter[str] = Counter()
        self.forwarded = 0
        self.forwarded_bytes = 0
        self.registrations = 0

    def receive(self, data: bytes, source: Source, now: float) -> Out:
        """One frame from ``source``: what to send, and to whom."""
        if data[:frames.TAG] == frames.SEND:  # the data path first, without an object
            return self._forward(data, source, now)
        try:
            frame = frames.decode(data)
        except FrameError:
            self.dropped[BAD_FRAME] += 1
            return []
        if isinstance(frame, frames.Hello):
            return [(frames.encode(frames.Challenge(self._nonce(source, now))), source)]
        if isinstance(frame, frames.Register):
            return self._register(frame, source, now)
        self.dropped[BAD_FRAME] += 1
        return []

    @property
    def addresses(self) -> int:
        """Relay addresses registered (a moved one's old source, still sending, is not
        another)."""
        return len(self._by_address)

    def forget(self, source: Source) -> None:
        """The source is gone (a TCP connection closed): its registration with it."""
        session = self.sessions.pop(source, None)
        if session is None:
            return
        slot = (session.key, session.address)
        if self._by_address.get(slot) == source:
            del self._by_address[slot]
        self._per_key[session.key] -= 1
        if self._per_key[session.key] <= 0:
            del self._per_key[session.key]

    def expire(self, now: float) -> None:
        """Drop registrations that were not refreshed in time."""
        for source in [s for s, session in self.sessions.items() if session.expires <= now]:
            self.forget(source)
        oldest_valid = _microseconds(now) - NONCE_LIFETIME * 1_000_000
        for slot in [slot for slot, issued in self._newest.items() if issued <= oldest_valid]:
            del self._newest[slot]

    def _forward(self, data: bytes, source: Source, now: float) -> Out:
        session = self.sessions.get(source)
        if session is None or session.expires <= now:
            self.dropped[NOT_MEMBER] += 1
            return []
        if len(data) <= frames.TAG + frames.ADDRESS:
            self.dropped[BAD_FRAME] += 1
            return []
        target = self._by_address.get((session.key, data[frames.TAG:frames.TAG + frames.ADDRESS]))
        if target is None or self.sessions[target].expires <= now:
            self.dropped[NO_DESTINATION] += 1
            return []
        payload = data[frames.TAG + frames.ADDRESS:]
        self.forwarded += 1
        self.forwarded_bytes += len(payload)
        return [(frames.DELIVER + session.address + payload, target)]

    def _register(self, frame: frames.Register, source: Source, now: float) -> Out:
        (issued,) = _ISSUED.unpack(frame.nonce[:_ISSUED.size])
        if not 0 <= _microseconds(now) - issued < NONCE_LIFETIME * 1e6 or not hmac.compare_digest(
                frame.nonce, self._nonce_at(issued, source)):
            self.dropped[BAD_NONCE] += 1
            return []
        try:
            verify(frame.key, frames.signed_message(frame.nonce, frame.key, frame.address),
                   frame.signature)
        except ProofError:
            self.dropped[BAD_PROOF] += 1
            return []
        slot = (frame.key, frame.address)
        if issued < self._newest.get(slot, issued):
            self.dropped[SUPERSEDED] += 1
            return []
        holder = self._by_address.get(slot)
        old = self.sessions.get(source)
        same = old is not None and (old.key, old.address) == (frame.key, frame.address)
        if not same and (len(self.sessions) >= MAX_SESSIONS
                         or self._per_key[frame.key] >= MAX_PER_KEY):
            self.dropped[LIMIT] += 1
            return []
        if not same:
            self.forget(source)
            self._per_key[frame.key] += 1
            self.sessions[source] = Session(frame.key, frame.address, 0.0)
        if holder is not None and holder != source:  # the node moved (new NAT
            moved = self.sessions[holder]  # mapping, new transport): what it sent
            moved.expires = min(moved.expires, now + GRACE)  # before still goes through
        self._by_address[slot] = source
        self._newest[slot] = issued
        session = self.sessions[source]
        session.expires = now + LIFETIME
        self.registrations += 1
        return [(frames.encode(frames.Registered(frame.address, LIFETIME)), source)]

    def _nonce(self, source: Source, now: float) -> bytes:
        return self._nonce_at(_microseconds(now), source)

    def _nonce_at(self, issued: int, source: Source) -> bytes:
        prefix = _ISSUED.pack(issued)
        mac = hmac.new(self._secret, prefix + repr(source).encode(), hashlib.sha256).digest()
        return prefix + mac[:frames.NONCE - len(prefix)]


def _microseconds(now: float) -> int:
    return int(now * 1_000_000)
