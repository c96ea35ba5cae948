"""The discovery codec: frames, typed requests, and hostile bytes (never anything but
ProtocolError)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uspan.discovery import protocol as p

PROOF = {"key": bytes(32), "seq": 1, "sig": bytes(64)}


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def test_round_trip_every_request() -> None:
    proof = p.Proof(b"k" * 32, 7, b"s" * 64)
    requests: list[p.Request] = [
        p.Hello(1, p.VERSION),
        p.Update(2, "c", proof, "a", b"data", (b"e1", b"e2"), 60),
        p.Update(3, "c", proof, "a", None, (), 1),
        p.Delete(4, "c", proof, "a"),
        p.List(5, "c", proof),
        p.Watch(6, "c", proof),
    ]
    decoder = p.FrameDecoder()
    stream = b"".join(p.encode(p.request_message(r)) for r in requests)
    # byte by byte: the decoder must reassemble across any split
    messages = [m for i in range(len(stream)) for m in decoder.feed(stream[i : i + 1])]
    assert [p.parse_request(m) for m in messages] == requests
    assert not decoder.partial


def test_partial_frame_is_reported() -> None:
    decoder = p.FrameDecoder()
    data = p.encode({"op": "hello", "id": 1, "version": 1})
    assert decoder.feed(data[:3]) == []
    assert decoder.partial
    assert decoder.feed(data[3:]) == [{"op": "hello", "id": 1, "version": 1}]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (struct.pack(">I", p.MAX_FRAME + 1), p.E_FRAME_TOO_LARGE),
        (struct.pack(">I", 0), p.E_BAD_FRAME),
        (struct.pack(">I", 1) + b"\xc1", p.E_BAD_FRAME),  # 0xc1 is never used in msgpack
        (frame([1, 2, 3]), p.E_BAD_MESSAGE),
        (frame({1: 2}), p.E_BAD_FRAME),  # strict map keys
        (frame({b"op": 2}), p.E_BAD_MESSAGE),
        (struct.pack(">I", 3) + b"\x01\x02\x03", p.E_BAD_FRAME),  # extra data
    ],
)
def test_bad_frames(data: bytes, code: str) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.FrameDecoder().feed(data)
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"id": 1}, p.E_BAD_MESSAGE),
        ({"op": "hello", "id": 0, "version": 1}, p.E_BAD_MESSAGE),
        ({"op": "hello", "id": True, "version": 1}, p.E_BAD_MESSAGE),
        ({"op": "hello", "id": -1, "version": 1}, p.E_BAD_MESSAGE),
        ({"op": "hello", "id": "1", "version": 1}, p.E_BAD_MESSAGE),
        ({"op": "fly", "id": 1}, p.E_UNKNOWN_OP),
        ({"op": "list", "id": 1, "cluster": 5, **PROOF}, p.E_BAD_MESSAGE),
        ({"op": "list", "id": 1, "cluster": "c", **PROOF, "key": bytes(31)}, p.E_BAD_MESSAGE),
        ({"op": "list", "id": 1, "cluster": "c", **PROOF, "seq": 2**64}, p.E_BAD_MESSAGE),
        ({"op": "delete", "id": 1, "cluster": "c", **PROOF}, p.E_BAD_MESSAGE),
        ({"op": "update", "id": 1, "cluster": "c", "affiliate": "a", **PROOF,
          "endpoints": ["x"], "ttl": 1}, p.E_BAD_MESSAGE),
        ({"op": "update", "id": 1, "cluster": "c", "affiliate": "a", **PROOF,
          "endpoints": [], "ttl": 1, "data": "text"}, p.E_BAD_MESSAGE),
        ({"op": "update", "id": 1, "cluster": "c", "affiliate": "a", **PROOF,
          "endpoints": [], "ttl": -5}, p.E_BAD_MESSAGE),
    ],
)  # fmt: skip
def test_bad_requests(message: dict[str, object], code: str) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.parse_request(message)
    assert caught.value.code == code
    assert caught.value.code in p.FATAL


def test_encode_refuses_oversized_frames() -> None:
    with pytest.raises(p.ProtocolError):
        p.encode({"x": bytes(p.MAX_FRAME)})


def test_chunks_fit_frames() -> None:
    record = p.affiliate_record("a" * 256, bytes(2048), [bytes(32)] * 64)
    groups = p.chunk_records([dict(record, id=f"{i:0256d}") for i in range(40)])
    assert len(groups) > 1
    assert sum(len(g) for g in groups) == 40
    for group in groups:
        p.encode(p.ok(1, affiliates=group, more=True, event="snapshot"))  # never too large


def test_error_replies_say_whether_the_connection_closes() -> None:
    assert p.error(3, p.E_UNKNOWN_OP, "x")["fatal"] is True
    assert p.error(3, p.E_LIMIT_DATA, "x")["fatal"] is False


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_raises_protocol_error(data: bytes) -> None:
    decoder = p.FrameDecoder()
    try:
        for message in decoder.feed(data):
            p.parse_request(message)
    except p.ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["op", "id", "version", "cluster", "key", "seq", "sig", "affiliate",
                         "data", "endpoints", "ttl", "x"]),
        msgpack_values | st.sampled_from(list(p.OPS)),
        max_size=12,
    )
)  # fmt: skip
def test_wrongly_typed_messages_only_raise_protocol_error(message: dict[str, object]) -> None:
    decoder = p.FrameDecoder()
    try:
        for decoded in decoder.feed(frame(message)):
            p.parse_request(decoded)
    except p.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 199))
def test_truncated_or_bitflipped_frames(tail: bytes, flip: int) -> None:
    good = bytearray(p.encode(p.request_message(p.Hello(1, 1))) + tail)
    good[flip % len(good)] ^= 0x41
    try:
        for message in p.FrameDecoder().feed(bytes(good)):
            p.parse_request(message)
    except p.ProtocolError:
        pass


@pytest.mark.parametrize("rid", [1, 127, 128, 65536, 2**32 - 1])
def test_packed_event_frames_equal_encoded_replies(rid: int) -> None:
    fields = {"event": "update", "affiliate": p.affiliate_record("a", b"d", [b"e"])}
    packed = p.Packed.of(fields).frame(rid)
    assert p.FrameDecoder().feed(packed) == [p.ok(rid, **fields)]
