"""The node's reflexive endpoints: where the discovery services see its WireGuard socket.

Sans-IO: ``poll(now)`` returns the probes to send now, ``answer(data, now)`` takes what
came back, ``endpoints(now)`` is what to publish, ``next_deadline()`` is when to poll
again. The node sends the probes from its WireGuard socket (``uspan.discovery.reflect``
has the wire format), so an answer names the NAT mapping its peers must reach.

Each service is probed every ``INTERVAL`` (a NAT may change its mapping at any time; the
probe also keeps a mapping alive as keepalives do), again ``RETRY`` after an unanswered
probe, and at once (at most every ``RETRY``) when ``refresh`` is called: a peer went down,
which is when a changed mapping shows. An answer counts only if it carries the nonce of
one of our recent probes to that service; anything else is ``forged`` (a wrong nonce) or
``malformed``, counted and ignored. A result unconfirmed for ``EXPIRY`` is dropped.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from uspan.discovery.reflect import NONCE_SIZE, decode_answer, encode_probe
from uspan.wg.endpoint import Endpoint

INTERVAL = 25.0  # seconds between probes of one service
RETRY = 2.0  # seconds after an unanswered probe, and the least between two probes
EXPIRY = 3 * INTERVAL + RETRY  # a result no answer confirmed for this long is dropped
NONCES_KEPT = 4  # a late answer to one of the last few probes still counts


@dataclass
class _Target:
    service: Endpoint
    due: float = 0.0
    sent: float = -math.inf
    nonces: list[bytes] = field(default_factory=list)
    result: Endpoint | None = None
    confirmed: float = -math.inf


class ReflexiveProber:
    """Probe state for a set of discovery services (their UDP probe endpoints)."""

    def __init__(self, services: Sequence[Endpoint],
                 nonce: Callable[[], bytes] = lambda: secrets.token_bytes(NONCE_SIZE)) -> None:
        self._targets = [_Target(service) for service in services]
        self._nonce = nonce
        self.counts: Counter[str] = Counter()  # sent, answered, forged, malformed

    def poll(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """The probes due now; each one's target is then due again after ``RETRY``
        (pushed back to ``INTERVAL`` by its answer)."""
        probes = []
        for target in self._targets:
            if target.due > now:
                continue
            nonce = self._nonce()
            target.nonces = [*target.nonces, nonce][-NONCES_KEPT:]
            target.due, target.sent = now + RETRY, now
            probes.append((encode_probe(nonce), target.service))
        self.counts["sent"] += len(probes)
        return probes

    def answer(self, data: bytes, now: float) -> bool:
        """Take an answer; True if the published endpoints changed."""
        decoded = decode_answer(data)
        if decoded is None:
            self.counts["malformed"] += 1
            return False
        nonce, seen = decoded
        target = next((t for t in self._targets if nonce in t.nonces), None)
        if target is None:
            self.counts["forged"] += 1
            return False
        self.counts["answered"] += 1
        target.nonces = []  # one answer per probe: a replay of it is forged
        before = self.endpoints(now)
        target.result, target.confirmed = seen, now
        target.due = now + INTERVAL
        return self.endpoints(now) != before

    def refresh(self, now: float) -> None:
        """Probe again soon: the mapping may have changed (a peer went down)."""
        for target in self._targets:
            target.due = min(target.due, max(now, target.sent + RETRY))

    def endpoints(self, now: float) -> tuple[Endpoint, ...]:
        """The distinct reflexive endpoints confirmed within ``EXPIRY``."""
        seen: dict[Endpoint, None] = {}
        for target in self._targets:
            if target.result is not None and now - target.confirmed < EXPIRY:
                seen.setdefault(target.result, None)
        return tuple(seen)

    def next_deadline(self) -> float:
        """When to call ``poll`` next (and to look at ``endpoints`` for expiry)."""
        expiries = [t.confirmed + EXPIRY for t in self._targets if t.result is not None]
        return min([t.due for t in self._targets] + expiries, default=math.inf)
