"""WireGuard handshake: round trips, tampering, wrong psk, low-order keys, and interop with
the independent ``noiseprotocol`` package."""

from __future__ import annotations

import gc
import struct

import pytest
from noise.connection import Keypair, NoiseConnection

from uspan.wg import crypto, handshake, messages, tai64n
from uspan.wg.constants import (
    CONSTRUCTION,
    IDENTIFIER,
    INITIATION_SIZE,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_SIZE,
)
from uspan.wg.drops import ProtocolError


def key(label: str) -> bytes:
    """A deterministic, deliberately unclamped 32-byte private key."""
    return bytes([0xFF]) + crypto.hash_(label.encode())[1:31] + bytes([0xFF])


I_PRIV, R_PRIV = key("initiator static"), key("responder static")
I_PUB, R_PUB = crypto.public_key(crypto.clamp(I_PRIV)), crypto.public_key(crypto.clamp(R_PRIV))
I_EPH, R_EPH = key("initiator ephemeral"), key("responder ephemeral")
PSK = crypto.hash_(b"psk")
TIMESTAMP = tai64n.encode(1_700_000_000.5)
I_INDEX, R_INDEX = 0x11223344, 0xA0B0C0D0
LOW_ORDER = bytes(32)  # the point 0; X25519 with it is all zero


def initiate() -> tuple[bytearray, handshake.InitiatorState]:
    return handshake.create_initiation(I_PRIV, I_PUB, R_PUB, I_INDEX, I_EPH, TIMESTAMP)


def full_handshake(
    psk: bytes = PSK,
) -> tuple[handshake.TransportKeys, handshake.TransportKeys, bytearray, bytearray]:
    init_msg, state = initiate()
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(init_msg))
    resp_msg, responder_keys = handshake.create_response(consumed, psk, R_INDEX, R_EPH)
    initiator_keys = handshake.consume_response(state, psk, messages.parse_response(resp_msg))
    return initiator_keys, responder_keys, init_msg, resp_msg


def test_round_trip_keys_match_and_differ_by_direction() -> None:
    initiator, responder, _, _ = full_handshake()
    assert initiator.send == responder.recv
    assert initiator.recv == responder.send
    assert initiator.send != initiator.recv
    assert all(len(k) == 32 for k in (initiator.send, initiator.recv))


def test_initiation_layout_and_consumed_fields() -> None:
    msg, state = initiate()
    assert len(msg) == INITIATION_SIZE
    assert struct.unpack_from("<II", msg) == (MSG_INITIATION, I_INDEX)
    assert msg[8:40] == crypto.public_key(crypto.clamp(I_EPH))
    assert msg[116:] == bytes(32)  # mac1 and mac2 left to cookie.py
    assert state[-1] == I_INDEX  # the local index
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(msg))
    assert consumed.remote_static == I_PUB
    assert consumed.timestamp == TIMESTAMP
    assert consumed.sender == I_INDEX


def test_response_layout() -> None:
    _, _, _, msg = full_handshake()
    assert len(msg) == RESPONSE_SIZE
    assert struct.unpack_from("<III", msg) == (MSG_RESPONSE, R_INDEX, I_INDEX)
    assert msg[12:44] == crypto.public_key(crypto.clamp(R_EPH))
    assert msg[60:] == bytes(32)


def test_clamped_and_unclamped_keys_give_the_same_messages() -> None:
    a, _ = initiate()
    b, _ = handshake.create_initiation(
        crypto.clamp(I_PRIV), I_PUB, R_PUB, I_INDEX, crypto.clamp(I_EPH), TIMESTAMP
    )
    assert a == b


@pytest.mark.parametrize("offset", range(8, 116))
def test_tampered_initiation_is_refused(offset: int) -> None:
    msg, _ = initiate()
    msg[offset] ^= 0x80
    with pytest.raises(ProtocolError) as info:
        handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(msg))
    assert info.value.reason == "decrypt"


@pytest.mark.parametrize("offset", range(12, 60))
def test_tampered_response_is_refused(offset: int) -> None:
    init_msg, state = initiate()
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(init_msg))
    resp_msg, _ = handshake.create_response(consumed, PSK, R_INDEX, R_EPH)
    resp_msg[offset] ^= 0x80
    with pytest.raises(ProtocolError) as info:
        handshake.consume_response(state, PSK, messages.parse_response(resp_msg))
    assert info.value.reason == "decrypt"


def test_initiation_to_another_responder_is_refused() -> None:
    msg, _ = initiate()
    other_priv = key("someone else")
    other_pub = crypto.public_key(crypto.clamp(other_priv))
    with pytest.raises(ProtocolError) as info:
        handshake.consume_initiation(other_priv, other_pub, messages.parse_initiation(msg))
    assert info.value.reason == "decrypt"


def test_wrong_psk_is_refused_and_state_survives() -> None:
    init_msg, state = initiate()
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(init_msg))
    resp_msg, responder_keys = handshake.create_response(consumed, PSK, R_INDEX, R_EPH)
    response = messages.parse_response(resp_msg)
    with pytest.raises(ProtocolError) as info:
        handshake.consume_response(state, bytes(32), response)
    assert info.value.reason == "decrypt"
    keys = handshake.consume_response(state, PSK, response)
    assert keys.send == responder_keys.recv


def test_zero_psk_when_none_configured() -> None:
    initiator, responder, _, _ = full_handshake(bytes(32))
    assert initiator.send == responder.recv


def test_the_initiators_state_is_nothing_the_cycle_collector_walks() -> None:
    """Silent peers make one every few seconds each, and live ones lived into the
    collector's oldest generation: 20,000 of them were most of its full collections.
    (That a response is consumed once is the device's: test_device.py.)"""
    _, state = initiate()
    gc.collect()
    assert not gc.is_tracked(state)


def test_initiation_is_answered_once() -> None:
    init_msg, _ = initiate()
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(init_msg))
    handshake.create_response(consumed, PSK, R_INDEX, R_EPH)
    with pytest.raises(ProtocolError) as info:
        handshake.create_response(consumed, PSK, R_INDEX, R_EPH)
    assert info.value.reason == "spent"


def test_response_for_another_index_is_refused() -> None:
    _, state = initiate()
    _, _, _, resp_msg = full_handshake()
    struct.pack_into("<I", resp_msg, 8, I_INDEX ^ 1)
    with pytest.raises(ProtocolError) as info:
        handshake.consume_response(state, PSK, messages.parse_response(resp_msg))
    assert info.value.reason == "receiver"


def test_low_order_ephemeral_in_initiation_is_refused() -> None:
    msg, _ = initiate()
    msg[8:40] = LOW_ORDER
    with pytest.raises(ProtocolError) as info:
        handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(msg))
    assert info.value.reason == "dh"


def test_low_order_ephemeral_in_response_is_refused() -> None:
    init_msg, state = initiate()
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(init_msg))
    resp_msg, _ = handshake.create_response(consumed, PSK, R_INDEX, R_EPH)
    resp_msg[12:44] = LOW_ORDER
    with pytest.raises(ProtocolError) as info:
        handshake.consume_response(state, PSK, messages.parse_response(resp_msg))
    assert info.value.reason == "dh"


def test_low_order_remote_static_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        handshake.create_initiation(I_PRIV, I_PUB, LOW_ORDER, I_INDEX, I_EPH, TIMESTAMP)
    assert info.value.reason == "dh"


def test_bad_argument_sizes_name_the_field() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        handshake.create_initiation(I_PRIV, I_PUB, R_PUB, I_INDEX, I_EPH, TIMESTAMP[:11])
    with pytest.raises(ValueError, match="remote_public"):
        handshake.create_initiation(I_PRIV, I_PUB, R_PUB[:31], I_INDEX, I_EPH, TIMESTAMP)
    with pytest.raises(ValueError, match="sender_index"):
        handshake.create_initiation(I_PRIV, I_PUB, R_PUB, 1 << 32, I_EPH, TIMESTAMP)
    init_msg, _ = initiate()
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(init_msg))
    with pytest.raises(ValueError, match="psk"):
        handshake.create_response(consumed, PSK[:16], R_INDEX, R_EPH)


# --- interop with the noiseprotocol package -------------------------------------------------


def noise_peer(initiator: bool, private: bytes, ephemeral: bytes, remote: bytes | None):
    conn = NoiseConnection.from_name(CONSTRUCTION)
    conn.set_psks(PSK)
    conn.set_prologue(IDENTIFIER)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, crypto.clamp(private))
    conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, crypto.clamp(ephemeral))
    if remote is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.start_handshake()
    return conn


def check_transport(conn: NoiseConnection, ours: handshake.TransportKeys) -> None:
    """Messages flow both ways between the noiseprotocol split states and our keys."""
    theirs = conn.encrypt(b"from noiseprotocol")
    assert crypto.aead_decrypt(ours.recv, 0, theirs, b"") == b"from noiseprotocol"
    mine = crypto.aead_encrypt(ours.send, 0, b"from uspan", b"")
    assert bytes(conn.decrypt(mine)) == b"from uspan"


# noiseprotocol warns when a test fixes the ephemeral key, which is the point here.
fixed_ephemeral = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs")


@fixed_ephemeral
def test_noiseprotocol_responds_to_our_initiation() -> None:
    init_msg, state = initiate()
    responder = noise_peer(False, R_PRIV, R_EPH, None)
    payload = responder.read_message(bytes(init_msg[8:116]))
    assert bytes(payload) == TIMESTAMP
    body = bytes(responder.write_message(b""))
    # With the same ephemeral key, our responder writes the very same bytes.
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, messages.parse_initiation(init_msg))
    ours, _ = handshake.create_response(consumed, PSK, R_INDEX, R_EPH)
    assert bytes(ours[12:60]) == body
    response = messages.Response(R_INDEX, I_INDEX, body[:32], body[32:], bytes(16), bytes(16))
    keys = handshake.consume_response(state, PSK, response)
    check_transport(responder, keys)


@fixed_ephemeral
def test_we_respond_to_noiseprotocols_initiation() -> None:
    initiator = noise_peer(True, I_PRIV, I_EPH, R_PUB)
    body = bytes(initiator.write_message(TIMESTAMP))
    ours, _ = initiate()
    assert bytes(ours[8:116]) == body
    initiation = messages.Initiation(
        I_INDEX, body[:32], body[32:80], body[80:], bytes(16), bytes(16)
    )
    consumed = handshake.consume_initiation(R_PRIV, R_PUB, initiation)
    assert consumed.remote_static == I_PUB
    resp_msg, keys = handshake.create_response(consumed, PSK, R_INDEX, R_EPH)
    initiator.read_message(bytes(resp_msg[12:60]))
    assert initiator.handshake_finished
    check_transport(initiator, keys)
