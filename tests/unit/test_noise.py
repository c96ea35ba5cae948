"""Noise IKpsk2 against the cacophony test vector, both sides run from the vector's keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uspan.wg import crypto, noise
from uspan.wg.drops import ProtocolError

VECTOR = json.loads(
    (Path(__file__).parent.parent / "vectors" / "noise_ikpsk2_cacophony.json").read_text()
)


def h(name: str) -> bytes:
    return bytes.fromhex(VECTOR[name])


def run_handshake() -> tuple[noise.SymmetricState, noise.SymmetricState, list[bytes]]:
    """Both sides through messages 1 and 2; returns their states and the two ciphertexts."""
    messages = VECTOR["messages"]
    resp_public = crypto.public_key(h("resp_static"))
    assert resp_public == h("init_remote_static")
    initiator = noise.initialize(h("init_prologue"), resp_public)
    responder = noise.initialize(h("resp_prologue"), resp_public)
    psk = bytes.fromhex(VECTOR["init_psks"][0])

    msg1 = noise.write_message1(
        initiator,
        h("init_static"),
        crypto.public_key(h("init_static")),
        h("init_ephemeral"),
        resp_public,
        bytes.fromhex(messages[0]["payload"]),
    )
    got1 = noise.read_message1(responder, h("resp_static"), msg1)
    assert got1.remote_static == crypto.public_key(h("init_static"))
    assert got1.payload == bytes.fromhex(messages[0]["payload"])

    msg2 = noise.write_message2(
        responder,
        h("resp_ephemeral"),
        got1.remote_ephemeral,
        got1.remote_static,
        bytes.fromhex(VECTOR["resp_psks"][0]),
        bytes.fromhex(messages[1]["payload"]),
    )
    payload2 = noise.read_message2(initiator, h("init_static"), h("init_ephemeral"), psk, msg2)
    assert payload2 == bytes.fromhex(messages[1]["payload"])
    return initiator, responder, [msg1, msg2]


def test_protocol_name_is_wireguards_construction() -> None:
    assert VECTOR["protocol_name"].encode() == noise.CONSTRUCTION


def test_handshake_messages_and_hash_match_vector() -> None:
    initiator, responder, sent = run_handshake()
    for message, expected in zip(sent, VECTOR["messages"][:2], strict=True):
        assert message.hex() == expected["ciphertext"]
    assert initiator.hash.hex() == VECTOR["handshake_hash"]
    assert responder.hash.hex() == VECTOR["handshake_hash"]


def test_transport_messages_match_vector() -> None:
    initiator, responder, _ = run_handshake()
    i_send, i_recv = initiator.split()
    r_recv, r_send = responder.split()
    assert (i_send, i_recv) == (r_recv, r_send)
    counters = {"initiator": 0, "responder": 0}
    # After the handshake the initiator writes the odd-numbered messages (3, 5, ...).
    for index, message in enumerate(VECTOR["messages"][2:]):
        sender = "initiator" if index % 2 == 0 else "responder"
        key = i_send if sender == "initiator" else r_send
        payload = bytes.fromhex(message["payload"])
        counter = counters[sender]
        ciphertext = crypto.aead_encrypt(key, counter, payload, b"")
        assert ciphertext.hex() == message["ciphertext"]
        assert crypto.aead_decrypt(key, counter, ciphertext, b"") == payload
        counters[sender] += 1


def test_protocol_name_short_is_padded_not_hashed() -> None:
    state = noise.SymmetricState.initialize(b"Noise_NN", b"")
    assert state.chaining_key == b"Noise_NN".ljust(32, b"\x00")
    assert state.hash == crypto.hash_(state.chaining_key, b"")


def test_encrypt_without_key_passes_plaintext() -> None:
    state = noise.SymmetricState.initialize(b"Noise_NN", b"")
    before = state.hash
    assert state.encrypt_and_hash(b"clear") == b"clear"
    assert state.hash == crypto.hash_(before, b"clear")


@pytest.mark.parametrize("offset", [0, 31, 32, 79, 80, 111])
def test_tampered_message1_fails(offset: int) -> None:
    _, _, (msg1, _) = run_handshake()
    bad = bytearray(msg1)
    bad[offset] ^= 0x01
    responder = noise.initialize(h("resp_prologue"), crypto.public_key(h("resp_static")))
    with pytest.raises(ProtocolError) as info:
        noise.read_message1(responder, h("resp_static"), bytes(bad))
    assert info.value.reason == "decrypt"


def test_wrong_psk_fails_message2() -> None:
    msg2 = run_handshake()[2][1]
    resp_public = crypto.public_key(h("resp_static"))
    initiator = noise.initialize(h("init_prologue"), resp_public)
    noise.write_message1(
        initiator, h("init_static"), crypto.public_key(h("init_static")),
        h("init_ephemeral"), resp_public, bytes.fromhex(VECTOR["messages"][0]["payload"]),
    )
    with pytest.raises(ProtocolError) as info:
        noise.read_message2(initiator, h("init_static"), h("init_ephemeral"), bytes(32), msg2)
    assert info.value.reason == "decrypt"


def test_low_order_ephemeral_fails_with_dh() -> None:
    responder = noise.initialize(h("resp_prologue"), crypto.public_key(h("resp_static")))
    message = bytes(32) + bytes(noise.MESSAGE1_OVERHEAD - 32)
    with pytest.raises(ProtocolError) as info:
        noise.read_message1(responder, h("resp_static"), message)
    assert info.value.reason == "dh"


def test_short_messages_fail_with_length() -> None:
    state = noise.initialize(b"", bytes(32))
    with pytest.raises(ProtocolError) as info:
        noise.read_message1(state, h("resp_static"), bytes(noise.MESSAGE1_OVERHEAD - 1))
    assert info.value.reason == "length"
    with pytest.raises(ProtocolError) as info:
        noise.read_message2(state, h("init_static"), h("init_ephemeral"), bytes(32), bytes(47))
    assert info.value.reason == "length"
