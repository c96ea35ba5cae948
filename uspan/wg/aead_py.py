"""Batch transport AEAD in Python over pyca/cryptography: the fallback of ``_aead``.

The same interface and the same bytes as the compiled module, one AEAD call per message;
used where the extension could not be built (``uspan.wg.transport_crypto`` picks).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from uspan.wg.constants import (
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
)
from uspan.wg.endpoint import Endpoint
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


def inner_runs(packets: list[bytes]) -> list[tuple[bytes, int]]:
    """Consecutive IP packets to one inner destination as (destination, count); b"" for
    packets too short for an IPv4 or IPv6 header."""
    runs: list[tuple[bytes, int]] = []
    last, count = None, 0
    for packet in packets:
        length = len(packet)
        version = packet[0] >> 4 if length else 0
        if version == 4 and length >= 20:
            destination = bytes(packet[16:20])
        elif version == 6 and length >= 40:
            destination = bytes(packet[24:40])
        else:
            destination = b""
        if destination == last:
            count += 1
            continue
        if last is not None:
            runs.append((last, count))
        last, count = destination, 1
    if last is not None:
        runs.append((last, count))
    return runs


Run = tuple[int, list[bytes], list[Endpoint], int, bool]


def transport_runs(datagrams: list[tuple[bytes, Endpoint]]
                   ) -> tuple[list[Run], list[tuple[bytes, Endpoint]], int, int]:
    """Runs of consecutive transport messages to one index (index, messages, sources,
    first counter, in order), the handshake messages' pairs, and the counts of those too
    short for their type and of no known type."""
    runs: list[Run] = []
    handshakes: list[tuple[bytes, Endpoint]] = []
    bad_length = bad_type = 0
    unpack = TRANSPORT_HEADER.unpack_from
    last_index, first, following, in_order = -1, 0, 0, True
    messages: list[bytes] = []
    sources: list[Endpoint] = []
    for datagram in datagrams:
        data, source = datagram
        length = len(data)
        kind = data[0] if length >= 4 and data[1:4] == b"\0\0\0" else -1
        if kind == MSG_TRANSPORT and length >= TRANSPORT_MIN_SIZE:
            _, index, counter = unpack(data)
        elif kind in (MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE_REPLY):
            handshakes.append(datagram)
            continue
        else:
            if length < 4 or kind == MSG_TRANSPORT:
                bad_length += 1
            else:
                bad_type += 1
            continue
        if index != last_index:
            if messages:
                runs.append((last_index, messages, sources, first, in_order))
            last_index, first, following, in_order = index, counter, counter, True
            messages, sources = [], []
        in_order = in_order and counter == following and (not sources or source is sources[0])
        following = counter + 1
        messages.append(data)
        sources.append(source)
    if messages:
        runs.append((last_index, messages, sources, first, in_order))
    return runs, handshakes, bad_length, bad_type
