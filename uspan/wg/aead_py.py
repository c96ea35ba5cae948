"""Batch transport AEAD in Python over pyca/cryptography: the fallback of ``_aead``.

The same interface and the same bytes as the compiled module, one AEAD call per message;
used where the extension could not be built (``uspan.wg.transport_crypto`` picks).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from uspan.wg.constants import MSG_TRANSPORT, TRANSPORT_HEADER_SIZE, TRANSPORT_MIN_SIZE
from uspan.wg.messages import TRANSPORT_HEADER, padded_length

_NONCE = struct.Struct("<4xQ")


class Sealer:
    """Seals batches of transport messages with one sending key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def seal(self, index: int, counter: int, packets: Sequence[bytes], mtu: int) -> list[bytes]:
        """Packet i padded and sealed with ``counter + i`` for receiver ``index``."""
        if not 0 <= index < 1 << 32 or counter < 0 or counter + len(packets) > 1 << 64:
            raise OverflowError("index or counter out of range")
        encrypt, pack, nonce = self._aead.encrypt, TRANSPORT_HEADER.pack, _NONCE.pack
        datagrams = []
        for packet in packets:
            length = len(packet)
            padded = padded_length(length, mtu)
            if padded != length:
                packet = bytes(packet) + bytes(padded - length)
            datagrams.append(
                pack(MSG_TRANSPORT, index, counter) + encrypt(nonce(counter), packet, None))
            counter += 1
        return datagrams


class Opener:
    """Opens batches of transport messages with one receiving key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def open(self, datagrams: Sequence[bytes]) -> list[bytes | None]:
        """Each whole message's padded plaintext, or None where its tag is wrong."""
        decrypt, nonce = self._aead.decrypt, _NONCE.pack
        plains: list[bytes | None] = []
        for datagram in datagrams:
            if len(datagram) < TRANSPORT_MIN_SIZE:
                raise ValueError("not a transport message's length")
            counter = int.from_bytes(datagram[8:16], "little")
            try:
                plains.append(
                    decrypt(nonce(counter), bytes(datagram[TRANSPORT_HEADER_SIZE:]), None))
            except InvalidTag:
                plains.append(None)
        return plains


def strip(plaintexts: list[bytes]) -> tuple[list[bytes], bytes] | None:
    """None: Device.receive then checks the packets one by one, in Python (the compiled
    ``strip`` does the common case, one inner source, at once)."""
    return None
