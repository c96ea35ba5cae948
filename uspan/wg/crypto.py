"""WireGuard's primitives (whitepaper 5.4), on hashlib, pyca/cryptography and libsodium.

HASH is BLAKE2s-256, MAC is keyed BLAKE2s-128, HMAC is HMAC-BLAKE2s, KDFn is HKDF over it,
DH is X25519, AEAD is ChaCha20-Poly1305 with a 64-bit little-endian counter nonce, and XAEAD
is XChaCha20-Poly1305 (cookies only; libsodium through PyNaCl).

A handshake initiation is two X25519 multiplications and eight HMACs, and a node with
thousands of silent peers sends thousands a second (whitepaper 6.4 retries), so these are
the cheapest forms here: X25519 through libsodium on raw bytes (a fixed-base multiplication
for public keys is half the cost of a variable-base one, and no key objects are built),
HMAC written out over hashlib's BLAKE2s, and the HKDF outputs sharing one keyed state.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
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


_blake2s = hashlib.blake2s
_BLOCK = 64  # BLAKE2s block size, HMAC's key length
_IPAD = bytes(byte ^ 0x36 for byte in range(256))  # translate tables: key XOR pad
_OPAD = bytes(byte ^ 0x5C for byte in range(256))


def _keyed(key: bytes) -> tuple[hashlib.blake2s, hashlib.blake2s]:
    """HMAC's inner and outer hash states for ``key``, to be copied or finished."""
    if len(key) > _BLOCK:
        key = _blake2s(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return _blake2s(key.translate(_IPAD)), _blake2s(key.translate(_OPAD))


def _finish(inner: hashlib.blake2s, outer: hashlib.blake2s, data: bytes) -> bytes:
    inner.update(data)
    outer.update(inner.digest())
    return outer.digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over hashlib: the hmac module costs twice as much)."""
    inner, outer = _keyed(key)
    return _finish(inner, outer, data)


def _expand(key: bytes, data: bytes, count: int) -> list[bytes]:
    """HKDF's first ``count`` outputs; every output is keyed by the same PRK."""
    inner, outer = _keyed(hmac_(key, data))
    outputs: list[bytes] = []
    previous = b""
    for counter in range(1, count + 1):
        previous = _finish(inner.copy(), outer.copy(), previous + bytes((counter,)))
        outputs.append(previous)
    return outputs


def kdf1(key: bytes, data: bytes) -> bytes:
    """HKDF with one 32-byte output."""
    return _finish(*_keyed(hmac_(key, data)), b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """HKDF with two 32-byte outputs."""
    first, second = _expand(key, data, 2)
    return first, second


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """HKDF with three 32-byte outputs."""
    first, second, third = _expand(key, data, 3)
    return first, second, third


def clamp(private: bytes) -> bytes:
    """Clamp a Curve25519 private key the way WireGuard stores it."""
    if len(private) != KEY_SIZE:
        raise ValueError(f"private key must be {KEY_SIZE} bytes, got {len(private)}")
    b = bytearray(private)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a private key (clamped or not: libsodium clamps)."""
    _check_key(private)
    return _sodium.crypto_scalarmult_base(private)


def _check_key(key: bytes) -> None:
    """libsodium reads 32 bytes through a raw pointer: anything else must not reach it."""
    if type(key) is not bytes or len(key) != KEY_SIZE:
        raise DHError(f"an X25519 key is {KEY_SIZE} bytes")


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public); raises DHError on an all-zero result or a malformed key."""
    _check_key(private)
    _check_key(public)
    try:
        shared = _sodium.crypto_scalarmult(private, public)
    except CryptoError as exc:  # libsodium refuses low-order points and a zero result
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
