"""What the core reports about each peer, as facts on the monotonic clock.

A mesh decides whether a peer is up, and when to try another endpoint, as a pure
function of these and ``now`` (Talos computes its peer state the same way), instead of
from wall-clock fields or log lines. ``Device.peer_facts()`` builds them on demand;
``Device.peer_events`` counts the moments they change in a way worth waking for
(handshake completed, attempts given up, roaming, data unanswered for 15 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from uspan.wg.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """One peer, as of the call. Times are the caller's monotonic seconds (``now``)."""

    endpoint: Endpoint | None
    last_handshake: float | None  # when the latest handshake completed; None = never
    handshakes: int  # completed handshakes so far (diff two snapshots to see new ones)
    attempts: int  # initiations sent since the latest completed handshake
    attempts_on_endpoint: int  # those of them sent to the current endpoint's address
    last_attempt: float | None  # when the latest initiation was sent; None = never
    gave_up: float | None  # when attempts were last given up (REKEY_ATTEMPT_TIME without
    # an answer) since the latest completed handshake; None = not since then
    last_received: float | None  # when the latest authenticated message came from the peer
    unanswered_data_since: float | None  # first data (not keepalive) sent since then
    rx_bytes: int
    tx_bytes: int
    # ``peer_events`` as of the latest roam to a new address (0: never roamed): a roam the
    # caller has not seen yet shows as a larger number than in its last snapshot.
    roamed: int = 0
