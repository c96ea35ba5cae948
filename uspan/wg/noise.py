"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s (Noise revision 34, sections 5, 7 and 9).

The pattern, with the responder's static key known in advance::

    <- s
    ...
    -> e, es, s, ss
    <- e, ee, se, psk

Message 1 is ``e || ENC(s) || ENC(payload)`` and message 2 is ``e || ENC(payload)``.
WireGuard is exactly this pattern with prologue IDENTIFIER, a TAI64N payload in message 1
and an empty payload in message 2. The steps are plain functions over a SymmetricState
so a caller can keep (chaining key, hash) between messages and drop everything else.
Failures raise ProtocolError whose ``reason`` is "decrypt", "dh" or "length".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from uspan.wg import crypto
from uspan.wg.constants import AEAD_TAG_SIZE, CONSTRUCTION, KEY_SIZE
from uspan.wg.drops import ProtocolError

HASH_LEN = 32
ENCRYPTED_STATIC_SIZE = KEY_SIZE + AEAD_TAG_SIZE
MESSAGE1_OVERHEAD = KEY_SIZE + ENCRYPTED_STATIC_SIZE + AEAD_TAG_SIZE
MESSAGE2_OVERHEAD = KEY_SIZE + AEAD_TAG_SIZE


@dataclass(slots=True)
class SymmetricState:
    """Noise's SymmetricState: chaining key, handshake hash and the current cipher key."""

    chaining_key: bytes
    hash: bytes
    key: bytes | None = None
    nonce: int = 0

    @classmethod
    def initialize(cls, protocol_name: bytes, prologue: bytes) -> SymmetricState:
        """InitializeSymmetric(protocol_name) followed by MixHash(prologue)."""
        return cls(*_initial(protocol_name, prologue))

    def mix_hash(self, data: bytes) -> None:
        self.hash = crypto.hash_(self.hash, data)

    def mix_key(self, input_key_material: bytes) -> None:
        self.chaining_key, self.key = crypto.kdf2(self.chaining_key, input_key_material)
        self.nonce = 0

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.chaining_key, temp_hash, self.key = crypto.kdf3(
            self.chaining_key, input_key_material
        )
        self.nonce = 0
        self.mix_hash(temp_hash)

    def mix_dh(self, private: bytes, public: bytes, token: str) -> None:
        """MixKey(DH(private, public)); an all-zero result raises ProtocolError("dh")."""
        try:
            shared = crypto.dh(private, public)
        except crypto.DHError as exc:
            raise ProtocolError("dh", f"token {token}: low-order public key") from exc
        self.mix_key(shared)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.key is None:
            ciphertext = plaintext
        else:
            ciphertext = crypto.aead_encrypt(self.key, self.nonce, plaintext, self.hash)
            self.nonce += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes, field: str) -> bytes:
        """Open ``ciphertext`` with the hash as AD; a failure raises ProtocolError naming
        ``field``."""
        if self.key is None:
            plaintext = ciphertext
        else:
            try:
                plaintext = crypto.aead_decrypt(self.key, self.nonce, ciphertext, self.hash)
            except crypto.AuthenticationError as exc:
                raise ProtocolError("decrypt", f"{field} does not authenticate") from exc
            self.nonce += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """The transport keys: the initiator sends with the first, the responder with the second."""
        return crypto.kdf2(self.chaining_key, b"")


@functools.lru_cache(maxsize=4)
def _initial(protocol_name: bytes, prologue: bytes) -> tuple[bytes, bytes]:
    """(chaining key, hash) after InitializeSymmetric and MixHash(prologue): the same for
    every handshake, so computed once."""
    if len(protocol_name) <= HASH_LEN:
        h = protocol_name.ljust(HASH_LEN, b"\x00")
    else:
        h = crypto.hash_(protocol_name)
    return h, crypto.hash_(h, prologue)


class Message1(NamedTuple):
    """What the responder learns from message 1."""

    remote_ephemeral: bytes
    remote_static: bytes
    payload: bytes


def initialize(prologue: bytes, responder_static: bytes) -> SymmetricState:
    """The state both sides start from: protocol name, prologue and the pre-message ``<- s``."""
    state = SymmetricState.initialize(CONSTRUCTION, prologue)
    state.mix_hash(responder_static)
    return state


def _mix_ephemeral(state: SymmetricState, ephemeral_public: bytes) -> None:
    """Token "e" in a PSK handshake: MixHash, then MixKey of the ephemeral. Every "e" here
    is followed by a DH's MixKey before anything is encrypted, so the cipher key this
    MixKey would derive is never used: only the chaining key is (KDF1, as wireguard-go)."""
    state.mix_hash(ephemeral_public)
    state.chaining_key = crypto.kdf1(state.chaining_key, ephemeral_public)


def write_message1(
    state: SymmetricState,
    static_private: bytes,
    static_public: bytes,
    ephemeral_private: bytes,
    remote_static: bytes,
    payload: bytes,
    static_static: bytes | None = None,
) -> bytes:
    """Initiator: ``-> e, es, s, ss`` and the payload."""
    ephemeral_public = crypto.public_key(ephemeral_private)
    _mix_ephemeral(state, ephemeral_public)
    state.mix_dh(ephemeral_private, remote_static, "es")
    encrypted_static = state.encrypt_and_hash(static_public)
    if static_static is None:
        state.mix_dh(static_private, remote_static, "ss")
    else:
        state.mix_key(static_static)
    return ephemeral_public + encrypted_static + state.encrypt_and_hash(payload)


def read_message1(
    state: SymmetricState,
    static_private: bytes,
    message: bytes,
    static_static: Callable[[bytes], bytes | None] | None = None,
) -> Message1:
    """Responder: read ``-> e, es, s, ss`` and the payload.

    ``static_static``, if given, maps the initiator's decrypted static key to the
    precomputed DH(static_private, it), or None for a key we do not know: then the
    message is refused (ProtocolError "unknown_static") before any more work is done.
    """
    if len(message) < MESSAGE1_OVERHEAD:
        raise ProtocolError(
            "length", f"message 1 of {len(message)} bytes, need {MESSAGE1_OVERHEAD}")
    remote_ephemeral = message[:KEY_SIZE]
    _mix_ephemeral(state, remote_ephemeral)
    state.mix_dh(static_private, remote_ephemeral, "es")
    remote_static = state.decrypt_and_hash(
        message[KEY_SIZE:KEY_SIZE + ENCRYPTED_STATIC_SIZE], "encrypted static"
    )
    if static_static is None:
        state.mix_dh(static_private, remote_static, "ss")
    else:
        shared = static_static(remote_static)
        if shared is None:
            raise ProtocolError("unknown_static", "the initiator's static key is not a peer")
        state.mix_key(shared)
    payload = state.decrypt_and_hash(message[KEY_SIZE + ENCRYPTED_STATIC_SIZE:], "payload")
    return Message1(remote_ephemeral, remote_static, payload)


def write_message2(
    state: SymmetricState,
    ephemeral_private: bytes,
    remote_ephemeral: bytes,
    remote_static: bytes,
    psk: bytes,
    payload: bytes,
) -> bytes:
    """Responder: ``<- e, ee, se, psk`` and the payload."""
    ephemeral_public = crypto.public_key(ephemeral_private)
    _mix_ephemeral(state, ephemeral_public)
    state.mix_dh(ephemeral_private, remote_ephemeral, "ee")
    state.mix_dh(ephemeral_private, remote_static, "se")
    state.mix_key_and_hash(psk)
    return ephemeral_public + state.encrypt_and_hash(payload)


def read_message2(
    state: SymmetricState,
    static_private: bytes,
    ephemeral_private: bytes,
    psk: bytes,
    message: bytes,
) -> bytes:
    """Initiator: read ``<- e, ee, se, psk`` and return the payload."""
    if len(message) < MESSAGE2_OVERHEAD:
        raise ProtocolError(
            "length", f"message 2 of {len(message)} bytes, need {MESSAGE2_OVERHEAD}")
    remote_ephemeral = message[:KEY_SIZE]
    _mix_ephemeral(state, remote_ephemeral)
    state.mix_dh(ephemeral_private, remote_ephemeral, "ee")
    state.mix_dh(static_private, remote_ephemeral, "se")
    state.mix_key_and_hash(psk)
    return state.decrypt_and_hash(message[KEY_SIZE:], "payload")
