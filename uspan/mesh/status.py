"""Peer status: unknown / up / down, as a pure function of link facts and ``now``.

Talos's rule, with T0 = the last time we changed the peer's endpoint:

- no endpoint: ``unknown``;
- ``now - T0 < 15 s`` (EndpointConnectionTimeout): ``up`` if a handshake completed after
  T0, else ``unknown`` (no verdict yet);
- ``15 s <= now - T0 < 275 s``: ``up`` if a handshake completed after T0, else ``down``;
- ``now - T0 >= 275 s`` (PeerDownInterval = 180 + 5 + 90: session expiry, rekey timeout,
  rekey attempt time), or T0 unknown: ``up`` iff the last handshake is under 275 s old.

uspan's faster rules, because we own the protocol and see every packet. A peer is
``down`` as soon as one of these holds (silences are counted from T0 at the earliest):

- handshake: at least 2 initiations were sent to its current endpoint (since T0 and the
  last handshake) and the latest went unanswered for REKEY_TIMEOUT + 1 s (6 s; the margin
  covers the retransmit jitter and a round trip). The core retransmits every 5 s, so a
  dead new endpoint is down about 11 s after the first attempt, not 15 s.
- traffic: data was sent to it and nothing came back for KEEPALIVE_TIMEOUT +
  REKEY_TIMEOUT (15 s): a live peer acknowledges data within 10 s (passive keepalive),
  and this is when WireGuard itself gives up on the session and starts a new handshake.

There is deliberately no "silence" rule (nothing received for 25 + 5 s). WireGuard
re-arms the persistent keepalive timer on every authenticated packet sent *or received*
(the kernel, wireguard-go and our core alike), so on an idle pair whoever sends first
keeps the other quiet: one side legitimately hears nothing until the next rekey (up to
180 s). Such a rule declared healthy idle peers down and cycled them (found by
``uspan lab``). A dead path without traffic is found by the handshake rule at the next
rekey, or by Talos's rule.

Where Talos needs up to 275 s to notice that an endpoint which worked has died, these
take 15 s while traffic flows, leaving cycling time to bring the peer up on its next
endpoint within the 20 s the node aims for. A
cookie reply counts as an answer (the peer is alive, only under load). If packets were
merely lost, the cost is small: the peer is cycled to its next endpoint (or, with one
endpoint, only its node addresses bypass the mesh) until a handshake brings it ``up``.

``update_status`` also returns the next time the state could change with no new facts,
so the shell sleeps exactly until then.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from uspan.mesh.peerspec import PERSISTENT_KEEPALIVE
from uspan.wg.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT
from uspan.wg.endpoint import Endpoint

ENDPOINT_CONNECTION_TIMEOUT = 15.0
PEER_DOWN_INTERVAL = 275.0
FAST_DOWN_ATTEMPTS = 2
ATTEMPT_TIMEOUT = REKEY_TIMEOUT + 1.0
DATA_SILENCE_TIMEOUT = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
KEEPALIVE_SILENCE_TIMEOUT = PERSISTENT_KEEPALIVE + REKEY_TIMEOUT


class PeerState(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the core knows of a peer, on the monotonic clock.

    ``unanswered_attempts`` counts handshake initiations sent to ``endpoint`` since the
    later of the last endpoint change, the last completed handshake and the last cookie
    reply; ``last_attempt`` is when the latest initiation was sent. ``last_received`` is
    when the last authenticated packet of any kind came from the peer, and
    ``unanswered_data_since`` when the first data packet (not a keepalive) was sent after
    that, None if none was.
    """

    endpoint: Endpoint | None
    last_handshake: float | None
    unanswered_attempts: int
    last_attempt: float | None
    rx_bytes: int
    tx_bytes: int
    last_received: float | None = None
    unanswered_data_since: float | None = None


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
    """One of uspan's faster rules holds (see the module docstring)."""
    return any(now >= deadline for deadline in _fast_deadlines(status, facts))


def _fast_deadlines(status: PeerStatus, facts: LinkFacts) -> list[float]:
    """When each of the faster rules will say ``down`` if no new fact comes first."""
    t0 = status.last_endpoint_change
    deadlines = []
    attempt = facts.last_attempt
    if (
        facts.unanswered_attempts >= FAST_DOWN_ATTEMPTS
        and attempt is not None
        and (t0 is None or attempt >= t0)
        and (facts.last_handshake is None or facts.last_handshake < attempt)
    ):
        deadlines.append(attempt + ATTEMPT_TIMEOUT)
    if facts.unanswered_data_since is not None:
        deadlines.append(_not_before(facts.unanswered_data_since, t0) + DATA_SILENCE_TIMEOUT)
    return deadlines


def _not_before(moment: float, t0: float | None) -> float:
    return moment if t0 is None else max(moment, t0)


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
    candidates += _fast_deadlines(status, facts)
    future = [t for t in candidates if t > now]
    return min(future) if future else None
