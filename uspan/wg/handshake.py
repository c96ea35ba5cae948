"""WireGuard's handshake (whitepaper 5.4.2-5.4.5): Noise IKpsk2 with prologue IDENTIFIER.

Messages are built with mac1/mac2 zero; cookie.py fills them and the device checks them,
as it checks timestamp freshness. Private keys are clamped before use. A responder's
state answers once (reuse raises); an initiator's is immutable and its owner drops it
once it has produced keys (the device does), which drops its secrets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from uspan.wg import crypto, messages, noise
from uspan.wg.constants import IDENTIFIER, KEY_SIZE, MAC_SIZE, TAI64N_SIZE
from uspan.wg.drops import ProtocolError

_ZERO_MAC = bytes(MAC_SIZE)


@dataclass(slots=True)
class TransportKeys:
    send: bytes
    recv: bytes


# What the initiator keeps between sending an initiation and consuming the response:
# (chaining key, hash, local private, ephemeral private, remote static, local index). A
# plain tuple of bytes and an int, which the cycle collector stops tracking the first time
# it sees it: 20,000 silent peers each start a new handshake every few seconds, and as
# objects their states were most of what its full collections walked.
InitiatorState = tuple[bytes, bytes, bytes, bytes, bytes, int]


@dataclass(slots=True)
class ConsumedInitiation:
    """A valid initiation: who sent it, its timestamp, and what the response needs."""

    remote_static: bytes
    timestamp: bytes
    sender: int
    remote_ephemeral: bytes
    chaining_key: bytes | None
    hash: bytes


def _check_key(name: str, value: bytes) -> None:
    if len(value) != KEY_SIZE:
        raise ValueError(f"{name} must be {KEY_SIZE} bytes, got {len(value)}")


def _check_index(name: str, value: int) -> None:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{name} must be a u32, got {value}")


def create_initiation(
    local_private: bytes,
    local_public: bytes,
    remote_public: bytes,
    sender_index: int,
    ephemeral_private: bytes,
    timestamp: bytes,
    static_static: bytes | None = None,
) -> tuple[bytearray, InitiatorState]:
    """A 148-byte initiation (mac1/mac2 zero) and the state to consume its response.

    ``static_static``: DH(local_private, remote_public) if the caller keeps it per peer.
    """
    for name, key in (
        ("local_private", local_private), ("local_public", local_public),
        ("remote_public", remote_public), ("ephemeral_private", ephemeral_private),
    ):
        _check_key(name, key)
    _check_index("sender_index", sender_index)
    if len(timestamp) != TAI64N_SIZE:
        raise ValueError(f"timestamp must be {TAI64N_SIZE} bytes, got {len(timestamp)}")
    local_private = crypto.clamp(local_private)
    ephemeral_private = crypto.clamp(ephemeral_private)
    state = noise.initialize(IDENTIFIER, remote_public)
    body = noise.write_message1(
        state, local_private, local_public, ephemeral_private, remote_public, timestamp,
        static_static,
    )
    static_end = KEY_SIZE + noise.ENCRYPTED_STATIC_SIZE
    message = messages.Initiation(
        sender_index, body[:KEY_SIZE], body[KEY_SIZE:static_end], body[static_end:],
        _ZERO_MAC, _ZERO_MAC,
    )
    initiator = (state.chaining_key, state.hash, local_private, ephemeral_private,
                 remote_public, sender_index)
    return bytearray(message.pack()), initiator


def consume_initiation(
    local_private: bytes,
    local_public: bytes,
    msg: messages.Initiation,
    static_static: Callable[[bytes], bytes | None] | None = None,
) -> ConsumedInitiation:
    """Decrypt an initiation addressed to us; raises ProtocolError. No mac or replay checks.

    ``static_static`` maps the initiator's static key to the precomputed DH with ours, or
    None if it is not a peer (refused as "unknown_static" before the last DH and AEAD).
    """
    _check_key("local_private", local_private)
    _check_key("local_public", local_public)
    state = noise.initialize(IDENTIFIER, local_public)
    got = noise.read_message1(
        state,
        crypto.clamp(local_private),
        msg.ephemeral + msg.encrypted_static + msg.encrypted_timestamp,
        static_static,
    )
    return ConsumedInitiation(
        got.remote_static, got.payload, msg.sender, got.remote_ephemeral,
        state.chaining_key, state.hash,
    )


def create_response(
    consumed: ConsumedInitiation, psk: bytes, sender_index: int, ephemeral_private: bytes
) -> tuple[bytearray, TransportKeys]:
    """A 92-byte response (mac1/mac2 zero) and the responder's keys (send = second output)."""
    _check_key("psk", psk)
    _check_key("ephemeral_private", ephemeral_private)
    _check_index("sender_index", sender_index)
    if consumed.chaining_key is None:
        raise ProtocolError("spent", "this initiation was already answered")
    state = noise.SymmetricState(consumed.chaining_key, consumed.hash)
    body = noise.write_message2(
        state, crypto.clamp(ephemeral_private), consumed.remote_ephemeral,
        consumed.remote_static, psk, b"",
    )
    consumed.chaining_key = None
    message = messages.Response(
        sender_index, consumed.sender, body[:KEY_SIZE], body[KEY_SIZE:], _ZERO_MAC, _ZERO_MAC
    )
    first, second = state.split()
    return bytearray(message.pack()), TransportKeys(send=second, recv=first)


def consume_response(
    state: InitiatorState, psk: bytes, msg: messages.Response
) -> TransportKeys:
    """The initiator's keys (send = first output) from a response; raises ProtocolError.

    A failed attempt leaves ``state`` usable for the genuine response; after a success
    the caller drops ``state``, so that a second response finds none.
    """
    _check_key("psk", psk)
    chaining_key, hash_, local_private, ephemeral_private, _, local_index = state
    if msg.receiver != local_index:
        raise ProtocolError(
            "receiver", f"response for index {msg.receiver}, state is {local_index}"
        )
    symmetric = noise.SymmetricState(chaining_key, hash_)
    noise.read_message2(
        symmetric, local_private, ephemeral_private, psk, msg.ephemeral + msg.encrypted_nothing,
    )
    first, second = symmetric.split()
    return TransportKeys(send=first, recv=second)
