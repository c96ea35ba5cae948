"""Peer status: unknown / up / down, as a pure function of link facts and ``now``.

Talos's rule, with T0 = the last time we changed the peer's endpoint:

- no endpoint: ``unknown``;
- ``now - T0 < 15 s`` (EndpointConnectionTimeout): ``up`` if a handshake completed after
  T0, else ``unknown`` (no verdict yet);
- ``15 s <= now - T0 < 275 s``: ``up`` if a handshake completed after T0, else ``down``;
- ``now - T0 >= 275 s`` (PeerDownInterval = 180 + 5 + 90: session expiry, rekey timeout,
  rekey attempt time), or T0 unknown: ``up`` iff the last handshake is under 275 s old.

uspan's faster rule, because we own the protocol and see every initiation: a peer is
``down`` as soon as at least 2 handshake initiations were sent to its current endpoint
(since T0 and since the last completed handshake) and the latest of them went unanswered
for REKEY_TIMEOUT + 1 s (6 s; the margin covers the retransmit jitter and a round trip).
The core retransmits every 5 s, so a dead endpoint is declared down about 11 s after the
first attempt, where Talos needs 15 s for a new endpoint and up to 275 s for one that
worked before. It applies to ``up`` peers too: two unanswered initiations mean the path
is gone even though the old session has not expired. A peer under load may answer with a
cookie reply first; that costs one more attempt, never a false verdict on a live path
for long, since the next handshake brings it back ``up``.

``update_status`` also returns the next time the state could change with no new facts,
so the shell sleeps exactly until then.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from uspan.wg.constants import REKEY_TIMEOUT
from uspan.wg.endpoint import Endpoint

ENDPOINT_CONNECTION_TIMEOUT = 15.0
PEER_DOWN_INTERVAL = 275.0
FAST_DOWN_ATTEMPTS = 2
ATTEMPT_TIMEOUT = REKEY_TIMEOUT + 1.0


class PeerState(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the core knows of a peer, on the monotonic clock.

    ``unanswered_attempts`` counts handshake initiations sent to ``endpoint`` since the
    later of the last endpoint change and the last completed handshake; ``last_attempt``
    is when the latest initiation was sent.
    """

    endpoint: Endpoint | None
    last_handshake: float | None
    unanswered_attempts: int
    last_attempt: float | None
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer's status (the ``KubeSpanPeerStatus`` spec, times on the monotonic clock)."""

    label: str
    state: PeerState = PeerState.UNKNOWN
    endpoint: Endpoint | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None
    last_used_endpoint: Endpoint | None = None  # the endpoint cycling last picked
    last_endpoint_change: float | None = None  # T0


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    status: PeerStatus
    # state, endpoint or label changed; not the counters or a routine rekey's handshake
    changed: bool
    deadline: float | None  # re-evaluate at this time even if no fact changes


def compute_state(status: PeerStatus, facts: LinkFacts, now: float) -> PeerState:
    """The state the rules above give for these facts at ``now``."""
    if facts.endpoint is None:
        return PeerState.UNKNOWN
    if _fast_down(status, facts, now):
        return PeerState.DOWN
    t0, handshake = status.last_endpoint_change, facts.last_handshake
    fresh = handshake is not None and t0 is not None and handshake > t0
    if t0 is not None and now - t0 < ENDPOINT_CONNECTION_TIMEOUT:
        return PeerState.UP if fresh else PeerState.UNKNOWN
    if t0 is not None and now - t0 < PEER_DOWN_INTERVAL:
        return PeerState.UP if fresh else PeerState.DOWN
    recent = handshake is not None and now - handshake < PEER_DOWN_INTERVAL
    return PeerState.UP if recent else PeerState.DOWN


def _fast_down(status: PeerStatus, facts: LinkFacts, now: float) -> bool:
    attempt, t0 = facts.last_attempt, status.last_endpoint_change
    return (
        facts.unanswered_attempts >= FAST_DOWN_ATTEMPTS
        and attempt is not None
        and (t0 is None or attempt >= t0)
        and (facts.last_handshake is None or facts.last_handshake < attempt)
        and now >= attempt + ATTEMPT_TIMEOUT
    )


def update_status(
    status: PeerStatus, facts: LinkFacts, now: float, label: str | None = None
) -> StatusUpdate:
    """Fold new facts into a status: the new status, whether it changed, the next deadline."""
    new = replace(
        status,
        label=status.label if label is None else label,
        state=compute_state(status, facts, now),
        endpoint=facts.endpoint,
        rx_bytes=facts.rx_bytes,
        tx_bytes=facts.tx_bytes,
        last_handshake=facts.last_handshake,
    )
    routine = replace(
        new,
        rx_bytes=status.rx_bytes,
        tx_bytes=status.tx_bytes,
        last_handshake=status.last_handshake,
    )
    changed = routine != status
    return StatusUpdate(new, changed, next_deadline(new, facts, now))


def next_deadline(status: PeerStatus, facts: LinkFacts, now: float) -> float | None:
    """The earliest future time at which one of the rules' boundaries is crossed."""
    if facts.endpoint is None:
        return None
    candidates = []
    if status.last_endpoint_change is not None:
        t0 = status.last_endpoint_change
        candidates += [t0 + ENDPOINT_CONNECTION_TIMEOUT, t0 + PEER_DOWN_INTERVAL]
    if facts.last_handshake is not None:
        candidates.append(facts.last_handshake + PEER_DOWN_INTERVAL)
    if facts.unanswered_attempts >= FAST_DOWN_ATTEMPTS and facts.last_attempt is not None:
        candidates.append(facts.last_attempt + ATTEMPT_TIMEOUT)
    future = [t for t in candidates if t > now]
    return min(future) if future else None
