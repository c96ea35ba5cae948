"""mac1, mac2 and cookie replies (whitepaper 5.4.4 and 5.4.7).

mac1 = MAC(HASH(LABEL_MAC1 || responder public), msg up to mac1) proves the sender knows
whom it addresses. Under load the responder wants mac2 = MAC(cookie, msg up to mac2),
where cookie = MAC(Rm, source ip || port) and Rm is a random secret replaced every
COOKIE_REFRESH_TIME; it hands the cookie out in a reply sealed with XChaCha20-Poly1305
under HASH(LABEL_COOKIE || responder public), with the triggering mac1 as associated data.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from uspan.wg import crypto, messages
from uspan.wg.constants import COOKIE_REFRESH_TIME, KEY_SIZE, LABEL_COOKIE, LABEL_MAC1, MAC_SIZE

NONCE_SIZE = 24
MAC1 = slice(-2 * MAC_SIZE, -MAC_SIZE)  # where mac1 sits in a handshake message
MAC2 = slice(-MAC_SIZE, None)
_ZERO_MAC = bytes(MAC_SIZE)


def mac1_key(public: bytes) -> bytes:
    """HASH(LABEL_MAC1 || public): the key of mac1 for messages to ``public``."""
    return crypto.hash_(LABEL_MAC1, public)


def cookie_key(public: bytes) -> bytes:
    """HASH(LABEL_COOKIE || public): the key of cookie replies sent by ``public``."""
    return crypto.hash_(LABEL_COOKIE, public)


def _mac1(key: bytes, msg: bytes | bytearray) -> bytes:
    return crypto.mac(key, msg[: MAC1.start])


def _mac2(cookie: bytes, msg: bytes | bytearray) -> bytes:
    return crypto.mac(cookie, msg[: MAC2.start])


def _check_handshake_length(msg: bytes | bytearray) -> None:
    if len(msg) < 2 * MAC_SIZE + 4:
        raise ValueError(f"handshake message of {len(msg)} bytes has no room for macs")


class CookieChecker:
    """The responder side: verifies mac1/mac2 and writes cookie replies (one per device)."""

    def __init__(self, rng: Callable[[int], bytes] = os.urandom) -> None:
        self._rng = rng
        self._mac1_key: bytes | None = None
        self._cookie_key: bytes | None = None
        self._secret = b""
        self._secret_born: float | None = None

    def set_local_public(self, public: bytes | None) -> None:
        """Key the checker to the device's public key (None: no key, every mac1 fails)."""
        if public is None:
            self._mac1_key = self._cookie_key = None
            return
        if len(public) != KEY_SIZE:
            raise ValueError(f"public key must be {KEY_SIZE} bytes, got {len(public)}")
        self._mac1_key = mac1_key(public)
        self._cookie_key = cookie_key(public)

    def keys(self) -> tuple[bytes, bytes] | None:
        """(mac1 key, cookie key) of the device's public key, None without one."""
        if self._mac1_key is None or self._cookie_key is None:
            return None
        return self._mac1_key, self._cookie_key

    def fresh_secret(self, now: float) -> bytes:
        """The cookie secret, replaced first if older than COOKIE_REFRESH_TIME."""
        if not self._secret_fresh(now):
            self._secret = self._rng(KEY_SIZE)
            self._secret_born = now
        return self._secret

    def check_mac1(self, msg: bytes) -> bool:
        _check_handshake_length(msg)
        if self._mac1_key is None:
            return False
        return hmac.compare_digest(_mac1(self._mac1_key, msg), msg[MAC1])

    def _secret_fresh(self, now: float) -> bool:
        return self._secret_born is not None and now - self._secret_born <= COOKIE_REFRESH_TIME

    def _cookie(self, source: bytes) -> bytes:
        return crypto.mac(self._secret, source)

    def check_mac2(self, msg: bytes, source: bytes, now: float) -> bool:
        """True if mac2 carries the cookie we would give ``source`` now."""
        _check_handshake_length(msg)
        if not self._secret_fresh(now):
            return False
        return hmac.compare_digest(_mac2(self._cookie(source), msg), msg[MAC2])

    def create_reply(self, msg: bytes, receiver: int, source: bytes, now: float) -> bytes:
        """A 64-byte cookie reply to ``msg`` (whose mac1 must already have been checked)."""
        _check_handshake_length(msg)
        if self._cookie_key is None:
            raise ValueError("no local public key: cannot seal a cookie reply")
        secret = self.fresh_secret(now)
        nonce = self._rng(NONCE_SIZE)
        sealed = crypto.xaead_encrypt(
            self._cookie_key, nonce, crypto.mac(secret, source), msg[MAC1]
        )
        return messages.CookieReply(receiver, nonce, sealed).pack()


class CookieGenerator:
    """The initiator side: adds mac1/mac2 to outgoing handshakes to one peer and keeps its cookie.

    ``rng`` is accepted for symmetry with CookieChecker; the initiator side needs no randomness.
    """

    def __init__(self, remote_public: bytes, rng: Callable[[int], bytes] = os.urandom) -> None:
        if len(remote_public) != KEY_SIZE:
            raise ValueError(
                f"remote public key must be {KEY_SIZE} bytes, got {len(remote_public)}"
            )
        self._mac1_key = mac1_key(remote_public)
        self._cookie_key = cookie_key(remote_public)
        self._cookie: bytes | None = None
        self._cookie_born = 0.0
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill mac1, and mac2 if a cookie younger than COOKIE_REFRESH_TIME is held."""
        _check_handshake_length(msg)
        mac1 = _mac1(self._mac1_key, msg)
        msg[MAC1] = mac1
        self._last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_born <= COOKIE_REFRESH_TIME:
            msg[MAC2] = _mac2(self._cookie, msg)
        else:
            msg[MAC2] = _ZERO_MAC

    def consume_reply(self, reply: messages.CookieReply, now: float) -> bool:
        """Open a cookie reply to our last mac1 and keep its cookie; False if it does not open."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = crypto.xaead_decrypt(
                self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
            )
        except crypto.AuthenticationError:
            return False
        self._cookie = cookie
        self._cookie_born = now
        self._last_mac1 = None  # one reply per message sent
        return True
