"""WireGuard's primitives (whitepaper 5.4), on pyca/cryptography and libsodium.

HASH is BLAKE2s-256, MAC is keyed BLAKE2s-128, HMAC is HMAC-BLAKE2s, KDFn is HKDF over it,
DH is X25519, AEAD is ChaCha20-Poly1305 with a 64-bit little-endian counter nonce, and XAEAD
is XChaCha20-Poly1305 (cookies only; libsodium through PyNaCl).
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _sodium
from nacl.exceptions import CryptoError

from uspan.wg.constants import KEY_SIZE

__all__ = [
    "AuthenticationError",
    "DHError",
    "aead_decrypt",
    "aead_encrypt",
    "clamp",
    "dh",
    "hash_",
    "hmac_",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "nonce",
    "private_key",
    "public_key",
    "xaead_decrypt",
    "xaead_encrypt",
]

ZERO_NONCE_PREFIX = b"\x00\x00\x00\x00"


class AuthenticationError(Exception):
    """An AEAD tag did not verify."""


class DHError(Exception):
    """X25519 produced the all-zero shared secret (a low-order point)."""


def hash_(*parts: bytes) -> bytes:
    """HASH(parts[0] || parts[1] || ...): BLAKE2s with a 32-byte digest."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes | bytearray) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest (not an HMAC)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """HKDF with one 32-byte output."""
    prk = hmac_(key, data)
    return hmac_(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """HKDF with two 32-byte outputs."""
    prk = hmac_(key, data)
    t1 = hmac_(prk, b"\x01")
    t2 = hmac_(prk, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """HKDF with three 32-byte outputs."""
    prk = hmac_(key, data)
    t1 = hmac_(prk, b"\x01")
    t2 = hmac_(prk, t1 + b"\x02")
    t3 = hmac_(prk, t2 + b"\x03")
    return t1, t2, t3


def clamp(private: bytes) -> bytes:
    """Clamp a Curve25519 private key the way WireGuard stores it."""
    if len(private) != KEY_SIZE:
        raise ValueError(f"private key must be {KEY_SIZE} bytes, got {len(private)}")
    b = bytearray(private)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


PrivateKey = bytes | X25519PrivateKey  # raw bytes, or a key object to reuse


def private_key(private: bytes) -> X25519PrivateKey:
    """A key object for a private key used more than once (public key, then DHs)."""
    return X25519PrivateKey.from_private_bytes(private)


def public_key(private: PrivateKey) -> bytes:
    """The X25519 public key of a private key."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    return private.public_key().public_bytes_raw()


@functools.lru_cache(maxsize=2)
def _static_key(private: bytes) -> X25519PrivateKey:
    """The key object of a long-term private key (building one costs as much as a DH)."""
    return X25519PrivateKey.from_private_bytes(private)


def forget_static_keys() -> None:
    """Drop the kept key objects (after the device's private key changed)."""
    _static_key.cache_clear()


def dh(private: PrivateKey, public: bytes, *, static: bool = False) -> bytes:
    """X25519(private, public); raises DHError on an all-zero result.

    ``static`` marks a long-term private key, whose key object is kept for reuse;
    ephemeral keys are never kept.
    """
    if isinstance(private, X25519PrivateKey):
        key = private
    elif static:
        key = _static_key(private)
    else:
        key = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # OpenSSL refuses low-order points
        raise DHError("X25519 shared secret is all zero") from exc
    if shared == bytes(KEY_SIZE):
        raise DHError("X25519 shared secret is all zero")
    return shared


def nonce(counter: int) -> bytes:
    """The 12-byte ChaCha20-Poly1305 nonce: 4 zero bytes and a 64-bit little-endian counter."""
    return ZERO_NONCE_PREFIX + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD(key, counter, plaintext, ad)."""
    return ChaCha20Poly1305(key).encrypt(nonce(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Open AEAD(key, counter, ...); raises AuthenticationError."""
    try:
        return ChaCha20Poly1305(key).decrypt(nonce(counter), ciphertext, ad)
    except InvalidTag as exc:
        raise AuthenticationError("AEAD tag mismatch") from exc


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 seal (libsodium)."""
    return _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce24, key)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 open (libsodium); raises AuthenticationError."""
    try:
        return _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce24, key)
    except CryptoError as exc:
        raise AuthenticationError("XAEAD tag mismatch") from exc
