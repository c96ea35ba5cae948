"""mac1, mac2 and cookie replies, with a deterministic rng and a fake clock."""

from __future__ import annotations

import hashlib
import struct

import pytest

from uspan.wg import cookie, crypto, messages
from uspan.wg.constants import COOKIE_REFRESH_TIME, COOKIE_REPLY_SIZE, MSG_COOKIE_REPLY
from uspan.wg.endpoint import Endpoint

R_PUB = crypto.public_key(crypto.clamp(crypto.hash_(b"responder")))
OTHER_PUB = crypto.public_key(crypto.clamp(crypto.hash_(b"someone else")))
SOURCE = Endpoint("192.0.2.7", 51820).source_key()
OTHER_SOURCE = Endpoint("192.0.2.7", 51821).source_key()


class CountingRng:
    """Deterministic randomness: HASH(counter), truncated; remembers what it handed out."""

    def __init__(self) -> None:
        self.outputs: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = hashlib.blake2s(len(self.outputs).to_bytes(4, "little")).digest()[:n]
        self.outputs.append(out)
        return out


def initiation(fill: int = 0x5A) -> bytearray:
    """A 148-byte message shaped like an initiation (macs are all cookie.py looks at)."""
    msg = bytearray([fill]) * 148
    struct.pack_into("<I", msg, 0, 1)
    msg[116:] = bytes(32)
    return msg


def blake2s_mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def checker(rng: CountingRng | None = None) -> cookie.CookieChecker:
    c = cookie.CookieChecker(rng or CountingRng())
    c.set_local_public(R_PUB)
    return c


def test_mac1_known_answer_per_spec_formula() -> None:
    msg = initiation()
    cookie.CookieGenerator(R_PUB).add_macs(msg, now=0.0)
    key = hashlib.blake2s(b"mac1----" + R_PUB).digest()
    assert msg[116:132] == blake2s_mac(key, bytes(msg[:116]))
    assert msg[132:] == bytes(16)  # no cookie yet


def test_check_mac1() -> None:
    msg = initiation()
    cookie.CookieGenerator(R_PUB).add_macs(msg, now=0.0)
    assert checker().check_mac1(bytes(msg))
    tampered = bytearray(msg)
    tampered[50] ^= 1
    assert not checker().check_mac1(bytes(tampered))
    other = cookie.CookieChecker()
    other.set_local_public(OTHER_PUB)
    assert not other.check_mac1(bytes(msg))
    keyless = checker()
    keyless.set_local_public(None)
    assert not keyless.check_mac1(bytes(msg))


def test_mac1_ignores_mac2() -> None:
    msg = initiation()
    cookie.CookieGenerator(R_PUB).add_macs(msg, now=0.0)
    msg[140] ^= 0xFF
    assert checker().check_mac1(bytes(msg))


def test_cookie_reply_round_trip_and_mac2_known_answer() -> None:
    rng = CountingRng()
    responder = checker(rng)
    generator = cookie.CookieGenerator(R_PUB)
    first = initiation()
    generator.add_macs(first, now=100.0)
    assert not responder.check_mac2(bytes(first), SOURCE, now=100.0)

    reply = responder.create_reply(bytes(first), 0x01020304, SOURCE, now=100.0)
    assert len(reply) == COOKIE_REPLY_SIZE
    assert struct.unpack_from("<II", reply) == (MSG_COOKIE_REPLY, 0x01020304)
    secret, nonce = rng.outputs
    assert reply[8:32] == nonce
    assert generator.consume_reply(messages.parse_cookie_reply(reply), now=100.0)

    second = initiation(0x33)
    generator.add_macs(second, now=101.0)
    expected_cookie = blake2s_mac(secret, SOURCE)
    assert second[132:] == blake2s_mac(expected_cookie, bytes(second[:132]))
    assert responder.check_mac1(bytes(second))
    assert responder.check_mac2(bytes(second), SOURCE, now=101.0)
    assert not responder.check_mac2(bytes(second), OTHER_SOURCE, now=101.0)


def test_generator_stops_using_a_cookie_after_refresh_time() -> None:
    responder = checker()
    generator = cookie.CookieGenerator(R_PUB)
    msg = initiation()
    generator.add_macs(msg, now=0.0)
    reply = responder.create_reply(bytes(msg), 1, SOURCE, now=0.0)
    assert generator.consume_reply(messages.parse_cookie_reply(reply), now=10.0)
    generator.add_macs(msg, now=10.0 + COOKIE_REFRESH_TIME)
    assert msg[132:] != bytes(16)
    generator.add_macs(msg, now=10.0 + COOKIE_REFRESH_TIME + 0.001)
    assert msg[132:] == bytes(16)


def test_secret_rotation_invalidates_old_cookies() -> None:
    responder = checker()
    generator = cookie.CookieGenerator(R_PUB)
    msg = initiation()
    generator.add_macs(msg, now=100.0)
    responder.create_reply(bytes(msg), 1, SOURCE, now=100.0)  # secret born at 100
    generator.add_macs(msg, now=200.0)
    reply = responder.create_reply(bytes(msg), 1, SOURCE, now=200.0)  # same secret
    assert generator.consume_reply(messages.parse_cookie_reply(reply), now=200.0)

    generator.add_macs(msg, now=210.0)
    assert responder.check_mac2(bytes(msg), SOURCE, now=210.0)
    generator.add_macs(msg, now=230.0)  # cookie is 30 s old, the secret 130 s
    assert msg[132:] != bytes(16)
    assert not responder.check_mac2(bytes(msg), SOURCE, now=230.0)

    fresh = responder.create_reply(bytes(msg), 1, SOURCE, now=230.0)  # new secret
    assert not responder.check_mac2(bytes(msg), SOURCE, now=230.0)
    assert generator.consume_reply(messages.parse_cookie_reply(fresh), now=230.0)
    generator.add_macs(msg, now=231.0)
    assert responder.check_mac2(bytes(msg), SOURCE, now=231.0)


def test_reply_to_an_older_message_is_rejected() -> None:
    responder = checker()
    generator = cookie.CookieGenerator(R_PUB)
    first, second = initiation(1), initiation(2)
    generator.add_macs(first, now=0.0)
    stale = responder.create_reply(bytes(first), 1, SOURCE, now=0.0)
    generator.add_macs(second, now=1.0)  # the generator now expects aad = mac1 of second
    assert not generator.consume_reply(messages.parse_cookie_reply(stale), now=1.0)
    good = responder.create_reply(bytes(second), 1, SOURCE, now=1.0)
    assert generator.consume_reply(messages.parse_cookie_reply(good), now=1.0)
    assert not generator.consume_reply(messages.parse_cookie_reply(good), now=1.0)  # once


def test_reply_before_sending_or_tampered_is_rejected() -> None:
    responder = checker()
    generator = cookie.CookieGenerator(R_PUB)
    msg = initiation()
    reply = responder.create_reply(bytes(msg), 1, SOURCE, now=0.0)
    assert not generator.consume_reply(messages.parse_cookie_reply(reply), now=0.0)
    generator.add_macs(msg, now=0.0)
    reply = bytearray(responder.create_reply(bytes(msg), 1, SOURCE, now=0.0))
    reply[40] ^= 1
    assert not generator.consume_reply(messages.parse_cookie_reply(bytes(reply)), now=0.0)


def test_reply_sealed_for_another_key_is_rejected() -> None:
    other = cookie.CookieChecker()
    other.set_local_public(OTHER_PUB)
    generator = cookie.CookieGenerator(R_PUB)
    msg = initiation()
    generator.add_macs(msg, now=0.0)
    reply = other.create_reply(bytes(msg), 1, SOURCE, now=0.0)
    assert not generator.consume_reply(messages.parse_cookie_reply(reply), now=0.0)


def test_keyless_checker_cannot_reply() -> None:
    with pytest.raises(ValueError, match="public key"):
        cookie.CookieChecker().create_reply(bytes(initiation()), 1, SOURCE, now=0.0)


def test_bad_key_and_message_sizes() -> None:
    with pytest.raises(ValueError, match="public key"):
        cookie.CookieGenerator(R_PUB[:31])
    with pytest.raises(ValueError, match="public key"):
        cookie.CookieChecker().set_local_public(bytes(31))
    with pytest.raises(ValueError, match="no room for macs"):
        checker().check_mac1(bytes(20))
