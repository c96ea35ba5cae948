"""Known answers for uspan.wg.crypto from published vectors.

BLAKE2s: RFC 7693 appendix B and the appendix E self-test, which covers keyed 16-byte
output, i.e. MAC (the reference blake2s-kat.txt has only 32-byte output); HMAC-BLAKE2s from
the Linux kernel's blake2s self-test (lib/crypto/blake2s-selftest.c, v5.15). HKDF over it has no
published vector, so KDF1/2/3 are checked against RFC 5869 written out here from RFC 2104
HMAC over raw hashlib (the cacophony vector in test_noise.py covers them end to end too).
ChaCha20-Poly1305: RFC 8439 A.5, whose nonce is 4 zero bytes and a little-endian counter as
WireGuard's (the 2.8.2 nonce starts 07000000, which our counter nonce cannot express).
XChaCha20-Poly1305: draft-irtf-cfrg-xchacha-03 A.3.1. X25519: RFC 7748 6.1.
"""

from __future__ import annotations

import hashlib

import pytest

from uspan.wg import crypto

# --- BLAKE2s -------------------------------------------------------------------------------


def test_hash_rfc7693_appendix_b() -> None:
    assert crypto.hash_(b"abc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    )
    assert crypto.hash_(b"a", b"bc") == crypto.hash_(b"abc")


def _selftest_seq(length: int, seed: int) -> bytes:
    """RFC 7693 appendix E: a Fibonacci-like byte sequence."""
    a, b = (0xDEAD4BAD * seed) & 0xFFFFFFFF, 1
    out = bytearray()
    for _ in range(length):
        a, b = b, (a + b) & 0xFFFFFFFF
        out.append(b >> 24)
    return bytes(out)


def test_rfc7693_appendix_e_selftest_with_mac_and_hash() -> None:
    """The grand hash of unkeyed and keyed hashes of all lengths; our MAC supplies the
    keyed 16-byte results and our HASH the unkeyed 32-byte ones."""
    grand = hashlib.blake2s()
    for outlen in (16, 20, 28, 32):
        for inlen in (0, 3, 64, 65, 255, 1024):
            data = _selftest_seq(inlen, inlen)
            if outlen == 32:
                grand.update(crypto.hash_(data))
            else:
                grand.update(hashlib.blake2s(data, digest_size=outlen).digest())
            key = _selftest_seq(outlen, outlen)
            if outlen == 16:
                grand.update(crypto.mac(key, data))
            else:
                grand.update(hashlib.blake2s(data, digest_size=outlen, key=key).digest())
    assert grand.hexdigest() == "6a411f08ce25adcdfb02aba641451cec53c598b24f4fc787fbdc88797f4c1dfe"


def _kernel_selftest_inputs() -> tuple[bytes, bytes]:
    key = [1, 1]
    while len(key) < 32:
        key.append((key[-2] + key[-1]) & 0xFF)
    return bytes(key), bytes(range(256))


def test_hmac_blake2s_kernel_selftest() -> None:
    key, buf = _kernel_selftest_inputs()
    assert crypto.hmac_(key, buf).hex() == (
        "cee1576982dcbf43ad564c70ed681696cfa473e8e8fc3279080a7582da3f0511"
    )
    # A key longer than the 64-byte block is hashed first.
    assert crypto.hmac_(buf, key).hex() == (
        "772f0c7141f44b2bb3c6b6f960dee4523866e8bf9b96c49f60d9243799d6ec31"
    )


def _hmac_rfc2104(key: bytes, data: bytes) -> bytes:
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\x00")
    inner = hashlib.blake2s(bytes(k ^ 0x36 for k in key) + data).digest()
    return hashlib.blake2s(bytes(k ^ 0x5C for k in key) + inner).digest()


def _hkdf_rfc5869(salt: bytes, ikm: bytes, count: int) -> list[bytes]:
    prk = _hmac_rfc2104(salt, ikm)
    outputs, previous = [], b""
    for i in range(1, count + 1):
        previous = _hmac_rfc2104(prk, previous + bytes([i]))
        outputs.append(previous)
    return outputs


@pytest.mark.parametrize("ikm", [b"", bytes(32), bytes(range(32)), b"x" * 100])
def test_kdfs_are_rfc5869_hkdf_over_hmac_blake2s(ikm: bytes) -> None:
    chaining_key = crypto.hash_(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    expected = _hkdf_rfc5869(chaining_key, ikm, 3)
    assert crypto.kdf1(chaining_key, ikm) == expected[0]
    assert list(crypto.kdf2(chaining_key, ikm)) == expected[:2]
    assert list(crypto.kdf3(chaining_key, ikm)) == expected


# --- ChaCha20-Poly1305 ---------------------------------------------------------------------

A5_KEY = bytes.fromhex("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
A5_COUNTER = 0x0807060504030201  # nonce 00000000 0102030405060708
A5_AAD = bytes.fromhex("f33388860000000000004e91")
A5_PLAINTEXT = bytes.fromhex(
    "496e7465726e65742d4472616674732061726520647261667420646f63756d65"
    "6e74732076616c696420666f722061206d6178696d756d206f6620736978206d"
    "6f6e74687320616e64206d617920626520757064617465642c207265706c6163"
    "65642c206f72206f62736f6c65746564206279206f7468657220646f63756d65"
    "6e747320617420616e792074696d652e20497420697320696e617070726f7072"
    "6961746520746f2075736520496e7465726e65742d4472616674732061732072"
    "65666572656e6365206d6174657269616c206f7220746f206369746520746865"
    "6d206f74686572207468616e206173202fe2809c776f726b20696e2070726f67"
    "726573732e2fe2809d"
)
A5_SEALED = bytes.fromhex(
    "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
    "4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
    "332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
    "9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
    "b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
    "af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
    "0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
    "49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
    "a6ad5cb4022b02709b"
    "eead9d67890cbb22392336fea1851f38"
)


def test_nonce_layout() -> None:
    assert crypto.nonce(A5_COUNTER).hex() == "000000000102030405060708"
    assert crypto.nonce(0) == bytes(12)


def test_aead_rfc8439_a5() -> None:
    assert crypto.aead_encrypt(A5_KEY, A5_COUNTER, A5_PLAINTEXT, A5_AAD) == A5_SEALED
    assert crypto.aead_decrypt(A5_KEY, A5_COUNTER, A5_SEALED, A5_AAD) == A5_PLAINTEXT


@pytest.mark.parametrize(
    ("counter", "sealed", "aad"),
    [
        (A5_COUNTER + 1, A5_SEALED, A5_AAD),
        (A5_COUNTER, A5_SEALED[:-1] + bytes([A5_SEALED[-1] ^ 1]), A5_AAD),
        (A5_COUNTER, bytes([A5_SEALED[0] ^ 1]) + A5_SEALED[1:], A5_AAD),
        (A5_COUNTER, A5_SEALED, A5_AAD[:-1]),
    ],
)
def test_aead_rejects_any_change(counter: int, sealed: bytes, aad: bytes) -> None:
    with pytest.raises(crypto.AuthenticationError):
        crypto.aead_decrypt(A5_KEY, counter, sealed, aad)


# --- XChaCha20-Poly1305 --------------------------------------------------------------------

X_KEY = bytes(range(0x80, 0xA0))
X_NONCE = bytes(range(0x40, 0x58))
X_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
X_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
    b"tip for the future, sunscreen would be it."
)
X_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49"
)


def test_xaead_draft_irtf_cfrg_xchacha_03_a31() -> None:
    assert crypto.xaead_encrypt(X_KEY, X_NONCE, X_PLAINTEXT, X_AAD) == X_SEALED
    assert crypto.xaead_decrypt(X_KEY, X_NONCE, X_SEALED, X_AAD) == X_PLAINTEXT


def test_xaead_rejects_wrong_aad() -> None:
    with pytest.raises(crypto.AuthenticationError):
        crypto.xaead_decrypt(X_KEY, X_NONCE, X_SEALED, b"")


# --- X25519 --------------------------------------------------------------------------------

ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_6_1() -> None:
    assert crypto.public_key(ALICE_PRIVATE) == ALICE_PUBLIC
    assert crypto.public_key(BOB_PRIVATE) == BOB_PUBLIC
    assert crypto.dh(ALICE_PRIVATE, BOB_PUBLIC) == SHARED
    assert crypto.dh(BOB_PRIVATE, ALICE_PUBLIC) == SHARED


@pytest.mark.parametrize(
    "low_order",
    [
        bytes(32),  # 0
        (1).to_bytes(32, "little"),  # 1
        # a point of order 8 (listed among the low-order points by Bernstein and libsodium)
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_dh_with_low_order_point_raises(low_order: bytes) -> None:
    with pytest.raises(crypto.DHError):
        crypto.dh(ALICE_PRIVATE, low_order)


def test_clamp() -> None:
    clamped = crypto.clamp(b"\xff" * 32)
    assert clamped == b"\xf8" + b"\xff" * 30 + b"\x7f"
    assert crypto.clamp(bytes(32)) == bytes(31) + b"\x40"
    assert crypto.clamp(clamped) == clamped
    assert crypto.clamp(ALICE_PRIVATE) != ALICE_PRIVATE  # RFC 7748 keys are stored unclamped
    assert crypto.public_key(crypto.clamp(ALICE_PRIVATE)) == ALICE_PUBLIC
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.clamp(bytes(31))


@pytest.mark.parametrize("key", [b"\x01" * 5, b"\x01" * 33, bytearray(32), memoryview(bytes(32))])
def test_x25519_refuses_anything_but_32_bytes(key: bytes) -> None:
    with pytest.raises(crypto.DHError):
        crypto.public_key(key)
    with pytest.raises(crypto.DHError):
        crypto.dh(key, BOB_PUBLIC)
    with pytest.raises(crypto.DHError):
        crypto.dh(ALICE_PRIVATE, key)
