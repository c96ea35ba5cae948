"""Transport keypairs: one session's keys, send counter and replay window."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from uspan.wg.constants import MSG_TRANSPORT, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from uspan.wg.replay import ReplayWindow

if TYPE_CHECKING:
    from uspan.wg.handshake import TransportKeys
    from uspan.wg.peer import Peer

_NONCE = struct.Struct("<4xQ")
_HEADER = struct.Struct("<IIQ")


class Keypair:
    """A session: created by a completed handshake, valid for REJECT_AFTER_TIME."""

    __slots__ = (
        "_recv",
        "_send",
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
        self._send = ChaCha20Poly1305(keys.send)
        self._recv = ChaCha20Poly1305(keys.recv)
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

    def seal(self, padded_plaintext: bytes) -> bytes:
        """A transport message carrying ``padded_plaintext``; advances the counter."""
        counter = self.send_counter
        self.send_counter = counter + 1
        return _HEADER.pack(MSG_TRANSPORT, self.remote_index, counter) + self._send.encrypt(
            _NONCE.pack(counter), padded_plaintext, None
        )

    def open(self, counter: int, ciphertext: bytes) -> bytes:
        """Decrypt a transport payload; raises cryptography's InvalidTag on forgery."""
        return self._recv.decrypt(_NONCE.pack(counter), ciphertext, None)
