"""WireGuard message layouts: exact sizes, little-endian, type as a u32 (three zero bytes).

Handshake messages are parsed into small frozen dataclasses; transport messages are hot,
so they are read with precompiled ``struct`` formats straight from the datagram.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from uspan.wg.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_SIZE,
)
from uspan.wg.drops import ProtocolError

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver, counter

assert _INITIATION.size == INITIATION_SIZE
assert _RESPONSE.size == RESPONSE_SIZE
assert _COOKIE_REPLY.size == COOKIE_REPLY_SIZE



@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def pack(self) -> bytes:
        return _INITIATION.pack(
            MSG_INITIATION, self.sender, self.ephemeral, self.encrypted_static,
            self.encrypted_timestamp, self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def pack(self) -> bytes:
        return _RESPONSE.pack(
            MSG_RESPONSE, self.sender, self.receiver, self.ephemeral,
            self.encrypted_nothing, self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE_REPLY.pack(
            MSG_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )


def parse_initiation(data: bytes) -> Initiation:
    if len(data) != INITIATION_SIZE:
        raise ProtocolError(
            "bad_length", f"initiation of {len(data)} bytes, want {INITIATION_SIZE}")
    _, *fields = _INITIATION.unpack(data)
    return Initiation(*fields)


def parse_response(data: bytes) -> Response:
    if len(data) != RESPONSE_SIZE:
        raise ProtocolError("bad_length", f"response of {len(data)} bytes, want {RESPONSE_SIZE}")
    _, *fields = _RESPONSE.unpack(data)
    return Response(*fields)


def parse_cookie_reply(data: bytes) -> CookieReply:
    if len(data) != COOKIE_REPLY_SIZE:
        raise ProtocolError(
            "bad_length", f"cookie reply of {len(data)} bytes, want {COOKIE_REPLY_SIZE}"
        )
    _, *fields = _COOKIE_REPLY.unpack(data)
    return CookieReply(*fields)


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after zero padding to a multiple of 16, never beyond the MTU."""
    padded = (length + 15) & ~15
    if padded > mtu:
        padded = max(mtu, length)
    return padded
