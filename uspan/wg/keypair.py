"""Transport keypairs: one session's keys, send counter and replay window."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from uspan.wg import transport_crypto
from uspan.wg.constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from uspan.wg.replay import ReplayWindow

if TYPE_CHECKING:
    from uspan.wg.handshake import TransportKeys
    from uspan.wg.peer import Peer


class Keypair:
    """A session: created by a completed handshake, valid for REJECT_AFTER_TIME."""

    __slots__ = (
        "_opener",
        "_sealer",
        "created",
        "initiator",
        "local_index",
        "peer",
        "remote_index",
        "replay",
        "send_counter",
    )

    def __init__(
        self,
        keys: TransportKeys,
        *,
        initiator: bool,
        local_index: int,
        remote_index: int,
        peer: Peer,
        now: float,
    ) -> None:
        # Looked up per session, so a test can swap the implementation.
        self._sealer = transport_crypto.Sealer(keys.send)
        self._opener = transport_crypto.Opener(keys.recv)
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer
        self.created = now
        self.send_counter = 0
        self.replay = ReplayWindow()

    def can_send(self, now: float) -> bool:
        return (
            self.send_counter < REJECT_AFTER_MESSAGES and now - self.created < REJECT_AFTER_TIME
        )

    def can_receive(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME

    def expire_for_sending(self) -> None:
        """Make the next send need a new handshake (e.g. after a private key change)."""
        self.send_counter = REJECT_AFTER_MESSAGES

    def seal(self, packets: Sequence[bytes], mtu: int) -> list[bytes]:
        """Transport messages carrying ``packets`` (padded within ``mtu``; empty ones are
        keepalives), numbered from the send counter, which they advance."""
        counter = self.send_counter
        datagrams = self._sealer.seal(self.remote_index, counter, packets, mtu)
        self.send_counter = counter + len(datagrams)
        return datagrams

    def open(self, datagrams: Sequence[bytes]) -> list[bytes | None]:
        """The padded plaintext of each whole transport message to this session, or None
        where its tag is wrong (a forgery, or another key's)."""
        return self._opener.open(datagrams)
