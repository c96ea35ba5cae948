"""Hole punching: two nodes behind NAT start handshakes toward each other at once.

A NAT lets a peer's packet in only once the node behind it has sent to that peer; a
NAT that keeps one mapping for every destination ("easy") then lets both through if both
send at about the same moment, each to the other's reflexive endpoint. Cycling alone
would line the two sides up only by chance, so they agree on the moment through
discovery, with no change to the WireGuard wire protocol:

1. a node that finds a peer down, and is behind NAT (has a reflexive endpoint that is
   not its own address), publishes a punch request in its (sealed) affiliate: the
   peer's key, its own reflexive endpoint, a sequence number; kept ``TTL`` seconds, at
   most one per peer every ``INTERVAL`` unless the peer was up in between; and aims the
   peer at the peer's first published endpoint that is not one of its addresses (its
   reflexive one), which opens our NAT toward it;
2. the peer sees it in its watch, answers with a request of its own (if it has a
   reflexive endpoint and none toward us is active) and at once aims the peer at the
   endpoint in the request, with a handshake;
3. the first node sees the answer and does the same.

Both handshakes leave within a watch round trip of each other; the side with the larger
key defers its handshake by a second as for any pair that acts together (see
``uspan.node.node``), so its initiation is the one that finds the other's NAT open.
Pure: ``step`` takes the facts and ``now`` and returns what to do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from uspan.wg.endpoint import Endpoint

TTL = 15.0  # seconds a request stays published
INTERVAL = 30.0  # seconds between two requests toward one peer


@dataclass(frozen=True, slots=True)
class PunchRequest:
    """In an affiliate: "punch toward ``peer_key``; reach me at ``endpoint``"."""

    peer_key: bytes
    endpoint: Endpoint
    seq: int


@dataclass(frozen=True, slots=True)
class PunchStep:
    punch: list[tuple[bytes, Endpoint]]  # aim each peer at that endpoint, with a handshake
    requested: list[bytes]  # peers we just asked (down): aim at their reflexive endpoint
    republish: bool  # our requests changed
    deadline: float | None  # call again then (a request expires)


@dataclass
class Puncher:
    """Our requests and what we acted on; ``seq`` starts anywhere (random is best, so a
    restarted node's requests are new to its peers)."""

    seq: int = 0
    active: dict[bytes, tuple[PunchRequest, float]] = field(default_factory=dict)  # expiry
    started: dict[bytes, float] = field(default_factory=dict)  # last request per peer
    answered: dict[bytes, int] = field(default_factory=dict)  # peer -> seq acted on

    def requests(self) -> tuple[PunchRequest, ...]:
        """What to publish in our affiliate."""
        return tuple(request for request, _ in self.active.values())

    def step(self, now: float, reflexive: Sequence[Endpoint], down: Iterable[bytes],
             offers: Mapping[bytes, PunchRequest], up: Iterable[bytes] = ()) -> PunchStep:
        """``down``: peers found down now; ``offers``: per peer, its request toward us;
        ``up``: peers up now (a later failure is new: punch again at once)."""
        for key in up:
            self.started.pop(key, None)
        republish = False
        for key in [k for k, (_, until) in self.active.items() if until <= now]:
            del self.active[key]
            republish = True
        punch = []
        for key, offer in offers.items():
            if self.answered.get(key) == offer.seq:
                continue
            self.answered[key] = offer.seq
            punch.append((key, offer.endpoint))
            if reflexive and key not in self.active:
                republish |= self._request(key, reflexive[0], now)
        requested = []
        for key in down:
            if reflexive and key not in self.active and (
                    now - self.started.get(key, -math.inf) >= INTERVAL):
                republish |= self._request(key, reflexive[0], now)
                requested.append(key)
        self.answered = {k: v for k, v in self.answered.items() if k in offers}
        expiries = [until for _, until in self.active.values()]
        return PunchStep(punch, requested, republish, min(expiries, default=None))

    def _request(self, key: bytes, endpoint: Endpoint, now: float) -> bool:
        self.seq += 1
        self.active[key] = (PunchRequest(key, endpoint, self.seq), now + TTL)
        self.started[key] = now
        return True
