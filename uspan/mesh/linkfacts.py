"""Per-peer link facts, kept from the core's events so the status rules get exact counts.

The node shell calls these as the core reports what happened to a peer (once per batch
for traffic, not per packet), and ``facts()`` when the mesh asks. Keeping the counting
here, next to the rules that read it, means the shell needs no protocol knowledge.
"""

from __future__ import annotations

from dataclasses import dataclass

from uspan.mesh.status import LinkFacts
from uspan.wg.endpoint import Endpoint


@dataclass(slots=True)
class LinkTracker:
    """What happened on one peer's link, on the monotonic clock."""

    last_handshake: float | None = None
    unanswered_attempts: int = 0
    last_attempt: float | None = None
    last_received: float | None = None
    unanswered_data_since: float | None = None

    def endpoint_set(self) -> None:
        """The mesh gave the peer a new endpoint: attempts and silences start afresh."""
        self.unanswered_attempts = 0
        self.unanswered_data_since = None

    def initiation_sent(self, now: float) -> None:
        self.unanswered_attempts += 1
        self.last_attempt = now

    def handshake_completed(self, now: float) -> None:
        self.last_handshake = now
        self.unanswered_attempts = 0
        self.received(now)

    def cookie_received(self, now: float) -> None:
        """A cookie reply: the peer is alive, only under load; the attempt was answered."""
        self.unanswered_attempts = 0
        self.received(now)

    def received(self, now: float) -> None:
        """Any authenticated packet came from the peer (data, keepalive or handshake)."""
        self.last_received = now
        self.unanswered_data_since = None

    def data_sent(self, now: float) -> None:
        """Data (not a keepalive) went to the peer."""
        if self.unanswered_data_since is None:
            self.unanswered_data_since = now

    def facts(self, endpoint: Endpoint | None, rx_bytes: int, tx_bytes: int) -> LinkFacts:
        return LinkFacts(
            endpoint=endpoint,
            last_handshake=self.last_handshake,
            unanswered_attempts=self.unanswered_attempts,
            last_attempt=self.last_attempt,
            rx_bytes=rx_bytes,
            tx_bytes=tx_bytes,
            last_received=self.last_received,
            unanswered_data_since=self.unanswered_data_since,
        )
