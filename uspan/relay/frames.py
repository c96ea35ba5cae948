"""The relay protocol's frames: a sans-IO codec with limits (docs/relay-protocol.md).

Every frame starts with a 4-byte uspan datagram tag (``uspan.daemon.demux.tag``): byte 0
is 0xFF, never a WireGuard message type, so frames share the node's WireGuard socket.
The tag names the frame's kind, so a relayed datagram costs 12 bytes (tag + 8-byte relay
address) and a 1420-MTU WireGuard datagram still fits a 1500-byte IPv4 link. Over TCP
each frame is preceded by its length (u16).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from uspan.daemon.demux import tag

HELLO = tag(b"RLH")  # client -> relay: give me a challenge
CHALLENGE = tag(b"RLC")  # relay -> client: the nonce to sign
REGISTER = tag(b"RLR")  # client -> relay: proof of membership, and my relay address
REGISTERED = tag(b"RLA")  # relay -> client: registered until lifetime runs out
SEND = tag(b"RLS")  # client -> relay: forward this datagram to a relay address
DELIVER = tag(b"RLD")  # relay -> client: a datagram from a relay address
TO_CLIENT = (CHALLENGE, REGISTERED, DELIVER)

TAG = 4
ADDRESS = 8  # relay address: 64 bits derived from the cluster secret and a WireGuard key
NONCE = 32
KEY = 32
SIGNATURE = 64
HELLO_SIZE = TAG + NONCE  # padded to the challenge's size: no amplification
MAX_PAYLOAD = 65535 - TAG - ADDRESS  # what one TCP frame can carry
MAX_FRAME = 65535
_REGISTER_SIZE = TAG + NONCE + KEY + ADDRESS + SIGNATURE
_LIFETIME = struct.Struct(">H")
SIGNED_DOMAIN = b"uspan-relay-register-v1\x00"


class FrameError(ValueError):
    """Bytes that are not a valid relay frame; the reason names what is wrong."""


@dataclass(frozen=True, slots=True)
class Hello:
    pass


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Register:
    nonce: bytes
    key: bytes  # the cluster's Ed25519 public key (uspan.discovery.proof.MemberKey)
    address: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Registered:
    address: bytes
    lifetime: int  # seconds


@dataclass(frozen=True, slots=True)
class Send:
    address: bytes  # to
    payload: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    address: bytes  # from
    payload: bytes


Frame = Hello | Challenge | Register | Registered | Send | Deliver


def signed_message(nonce: bytes, key: bytes, address: bytes) -> bytes:
    """What a REGISTER's signature covers: the relay's nonce, the key and the address."""
    return SIGNED_DOMAIN + nonce + key + address


def encode(frame: Frame) -> bytes:
    if isinstance(frame, Send):
        return SEND + frame.address + frame.payload
    if isinstance(frame, Deliver):
        return DELIVER + frame.address + frame.payload
    if isinstance(frame, Hello):
        return HELLO + bytes(NONCE)
    if isinstance(frame, Challenge):
        return CHALLENGE + frame.nonce
    if isinstance(frame, Register):
        return REGISTER + frame.nonce + frame.key + frame.address + frame.signature
    return REGISTERED + frame.address + _LIFETIME.pack(frame.lifetime)


def send_frame(address: bytes, payload: bytes) -> bytes:
    """``encode(Send(...))`` without the object: the data path's one allocation."""
    return SEND + address + payload


def decode(data: bytes) -> Frame:
    """Parse one frame; FrameError says why not (wrong kind, size or payload)."""
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes is over {MAX_FRAME}")
    kind = data[:TAG]
    body = data[TAG:]
    if kind in (SEND, DELIVER):
        if len(body) <= ADDRESS:
            raise FrameError(f"{_name(kind)} without a payload")
        cls = Send if kind == SEND else Deliver
        return cls(bytes(body[:ADDRESS]), bytes(body[ADDRESS:]))
    if kind == HELLO:
        _exact(kind, data, HELLO_SIZE)
        return Hello()
    if kind == CHALLENGE:
        _exact(kind, data, TAG + NONCE)
        return Challenge(bytes(body))
    if kind == REGISTER:
        _exact(kind, data, _REGISTER_SIZE)
        nonce, rest = body[:NONCE], body[NONCE:]
        key, rest = rest[:KEY], rest[KEY:]
        return Register(bytes(nonce), bytes(key), bytes(rest[:ADDRESS]), bytes(rest[ADDRESS:]))
    if kind == REGISTERED:
        _exact(kind, data, TAG + ADDRESS + _LIFETIME.size)
        (lifetime,) = _LIFETIME.unpack(body[ADDRESS:])
        return Registered(bytes(body[:ADDRESS]), lifetime)
    raise FrameError(f"unknown frame kind {bytes(kind)!r}")


def _exact(kind: bytes, data: bytes, size: int) -> None:
    if len(data) != size:
        raise FrameError(f"{_name(kind)} of {len(data)} bytes, not {size}")


def _name(kind: bytes) -> str:
    return kind[1:].decode("ascii", "replace")


class StreamDecoder:
    """Frames out of a TCP byte stream (each preceded by its u16 length)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """The whole frames that ``data`` completes; a zero length raises FrameError."""
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        while len(buffer) - offset >= 2:
            size = int.from_bytes(buffer[offset:offset + 2], "big")
            if size == 0:
                raise FrameError("zero-length frame on the stream")
            if len(buffer) - offset - 2 < size:
                break
            frames.append(bytes(buffer[offset + 2:offset + 2 + size]))
            offset += 2 + size
        del buffer[:offset]
        return frames


def stream_frame(frame: bytes) -> bytes:
    """One frame as it goes on a TCP stream."""
    if not 0 < len(frame) <= MAX_FRAME:
        raise FrameError(f"frame of {len(frame)} bytes cannot go on a stream")
    return len(frame).to_bytes(2, "big") + frame
