"""Message layouts: exact sizes, field offsets, and parse errors with their reason."""

from __future__ import annotations

import pytest

from uspan.wg import messages
from uspan.wg.config import DeviceChange
from uspan.wg.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from uspan.wg.device import Device
from uspan.wg.drops import ProtocolError
from uspan.wg.endpoint import Endpoint


def filled(size: int, byte: int) -> bytes:
    return bytes([byte]) * size


INITIATION = messages.Initiation(
    0x04030201, filled(32, 0xE0), filled(48, 0x5A), filled(28, 0x7B), filled(16, 0x11),
    filled(16, 0x22),
)
RESPONSE = messages.Response(
    0x04030201, 0x08070605, filled(32, 0xE0), filled(16, 0x0E), filled(16, 0x11),
    filled(16, 0x22),
)
COOKIE_REPLY = messages.CookieReply(0x08070605, filled(24, 0x4E), filled(32, 0xC0))


def test_initiation_layout() -> None:
    data = INITIATION.pack()
    assert len(data) == INITIATION_SIZE == 148
    assert data[:8].hex() == "01000000" "01020304"  # type u32 LE (3 reserved zeros), sender LE
    assert data[8:40] == INITIATION.ephemeral
    assert data[40:88] == INITIATION.encrypted_static
    assert data[88:116] == INITIATION.encrypted_timestamp
    assert data[116:132] == INITIATION.mac1
    assert data[132:148] == INITIATION.mac2
    assert messages.parse_initiation(data) == INITIATION


def test_response_layout() -> None:
    data = RESPONSE.pack()
    assert len(data) == RESPONSE_SIZE == 92
    assert data[:12].hex() == "02000000" "01020304" "05060708"
    assert data[12:44] == RESPONSE.ephemeral
    assert data[44:60] == RESPONSE.encrypted_nothing
    assert data[60:76] == RESPONSE.mac1
    assert data[76:92] == RESPONSE.mac2
    assert messages.parse_response(data) == RESPONSE


def test_cookie_reply_layout() -> None:
    data = COOKIE_REPLY.pack()
    assert len(data) == COOKIE_REPLY_SIZE == 64
    assert data[:8].hex() == "03000000" "05060708"
    assert data[8:32] == COOKIE_REPLY.nonce
    assert data[32:64] == COOKIE_REPLY.encrypted_cookie
    assert messages.parse_cookie_reply(data) == COOKIE_REPLY


def test_transport_header() -> None:
    header = messages.TRANSPORT_HEADER.pack(MSG_TRANSPORT, 0x04030201, 0x0102030405060708)
    assert header.hex() == "04000000" "01020304" "0807060504030201"
    keepalive = header + bytes(16)
    assert len(keepalive) == TRANSPORT_MIN_SIZE


@pytest.mark.parametrize(
    ("parse", "good"),
    [
        (messages.parse_initiation, INITIATION.pack()),
        (messages.parse_response, RESPONSE.pack()),
        (messages.parse_cookie_reply, COOKIE_REPLY.pack()),
    ],
)
@pytest.mark.parametrize("delta", [-1, 1])
def test_handshake_messages_must_have_exact_length(parse, good: bytes, delta: int) -> None:
    data = good[:-1] if delta < 0 else good + b"\x00"
    with pytest.raises(ProtocolError) as info:
        parse(data)
    assert info.value.reason == "bad_length"
    assert str(len(data)) in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad_length"),
        (b"\x01\x00\x00", "bad_length"),
        (b"\x04\x00\x00\x00" + bytes(TRANSPORT_MIN_SIZE - 5), "bad_length"),
        (b"\x01\x00\x00\x00" + bytes(INITIATION_SIZE - 3), "bad_length"),
        (b"\x05\x00\x00\x00", "bad_type"),
        (b"\x00\x00\x00\x00", "bad_type"),
        (b"\x01\x00\x00\x01" + bytes(144), "bad_type"),  # reserved bytes must be zero
    ],
)
def test_device_counts_malformed_messages(data: bytes, reason: str) -> None:
    device = Device()
    device.apply(DeviceChange(private_key=filled(32, 7)), 0.0)
    assert device.receive([(data, Endpoint("192.0.2.9", 9))], 0.0) == ([], [])
    assert device.counters == {reason: 1}


@pytest.mark.parametrize(
    ("length", "mtu", "padded"),
    [(0, 1420, 0), (1, 1420, 16), (16, 1420, 16), (17, 1420, 32), (1419, 1420, 1420),
     (1420, 1420, 1420), (1500, 1420, 1500)],
)
def test_padded_length(length: int, mtu: int, padded: int) -> None:
    assert messages.padded_length(length, mtu) == padded



def test_a_refusal_names_its_drop_counter():
    from uspan.wg.drops import Drop

    assert ProtocolError("bad_length", "x").drop is Drop.BAD_LENGTH
    assert ProtocolError("unknown_static", "x").drop is Drop.UNKNOWN_PEER
    for reason in ("decrypt", "dh", "length", "receiver", "spent"):
        assert ProtocolError(reason, "x").drop is Drop.HANDSHAKE_FAILED
