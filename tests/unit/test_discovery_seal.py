"""Sealing: GCM data bound to the affiliate, the 30-byte deterministic endpoint AEAD."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uspan.discovery.seal import ENDPOINT_BLOB, MAX_DATA_BLOB, MAX_DATA_PLAINTEXT, Sealer, SealError

SECRET = bytes(range(32))


def test_data_round_trip_and_randomised() -> None:
    sealer = Sealer(SECRET)
    a, b = sealer.seal_data("n1", b"hello"), sealer.seal_data("n1", b"hello")
    assert a != b
    assert sealer.open_data("n1", a) == sealer.open_data("n1", b) == b"hello"


def test_largest_data_fits_the_limit() -> None:
    blob = Sealer(SECRET).seal_data("n1", bytes(MAX_DATA_PLAINTEXT))
    assert len(blob) == MAX_DATA_BLOB
    with pytest.raises(ValueError):
        Sealer(SECRET).seal_data("n1", bytes(MAX_DATA_PLAINTEXT + 1))


@pytest.mark.parametrize("mutate", ["secret", "affiliate", "flip", "short"])
def test_data_does_not_open_when_wrong(mutate: str) -> None:
    blob = Sealer(SECRET).seal_data("n1", b"hello")
    sealer, aid = Sealer(SECRET), "n1"
    if mutate == "secret":
        sealer = Sealer(bytes(32))
    elif mutate == "affiliate":
        aid = "n2"  # a service cannot move one member's record to another
    elif mutate == "flip":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    else:
        blob = blob[:20]
    with pytest.raises(SealError):
        sealer.open_data(aid, blob)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_endpoint_round_trip(ip: object, port: int) -> None:
    sealer = Sealer(SECRET)
    blob = sealer.seal_endpoint("n1", str(ip), port)
    assert len(blob) == ENDPOINT_BLOB <= 32
    got_ip, got_port = sealer.open_endpoint("n1", blob)
    assert (got_ip, got_port) == (str(getattr(ip, "ipv4_mapped", None) or ip), port)


def test_endpoints_are_deterministic_per_affiliate() -> None:
    sealer = Sealer(SECRET)
    one = sealer.seal_endpoint("n1", "192.0.2.1", 51820)
    assert one == sealer.seal_endpoint("n1", "192.0.2.1", 51820)
    assert one != sealer.seal_endpoint("n2", "192.0.2.1", 51820)
    assert one != sealer.seal_endpoint("n1", "192.0.2.1", 51821)
    # IPv4 and IPv6 blobs have the same size: the service cannot tell them apart
    assert len(sealer.seal_endpoint("n1", "2001:db8::1", 1)) == len(one)


@pytest.mark.parametrize("index", range(ENDPOINT_BLOB))
def test_endpoint_forgery_detected(index: int) -> None:
    sealer = Sealer(SECRET)
    blob = bytearray(sealer.seal_endpoint("n1", "192.0.2.1", 51820))
    blob[index] ^= 0x80
    with pytest.raises(SealError):
        sealer.open_endpoint("n1", bytes(blob))


def test_endpoint_wrong_secret_or_size() -> None:
    blob = Sealer(SECRET).seal_endpoint("n1", "192.0.2.1", 51820)
    with pytest.raises(SealError):
        Sealer(bytes(32)).open_endpoint("n1", blob)
    with pytest.raises(SealError):
        Sealer(SECRET).open_endpoint("n1", blob[:-1])
    with pytest.raises(ValueError):
        Sealer(SECRET).seal_endpoint("n1", "192.0.2.1", 70000)
