"""The relay codec: round trips, exact sizes, and bad input refused with a reason."""

from __future__ import annotations

import pytest

from uspan.relay import frames
from uspan.relay.frames import FrameError


@pytest.mark.parametrize("frame", [
    frames.Hello(),
    frames.Challenge(bytes(range(32))),
    frames.Register(b"n" * 32, b"k" * 32, b"a" * 8, b"s" * 64),
    frames.Registered(b"a" * 8, 60),
    frames.Send(b"a" * 8, b"\x04\x00\x00\x00payload"),
    frames.Deliver(b"b" * 8, b"x"),
])
def test_round_trip(frame: frames.Frame) -> None:
    assert frames.decode(frames.encode(frame)) == frame


def test_sizes_fit_wireguard_datagrams() -> None:
    assert len(frames.encode(frames.Hello())) == len(frames.encode(frames.Challenge(bytes(32))))
    assert frames.send_frame(b"a" * 8, b"p" * 1452) == frames.encode(
        frames.Send(b"a" * 8, b"p" * 1452))
    assert len(frames.send_frame(b"a" * 8, b"p" * 1452)) + 28 <= 1500  # 1420 MTU on IPv4


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "unknown frame kind"),
    (b"\x01\x00\x00\x00" + bytes(32), "unknown frame kind"),
    (frames.SEND + b"a" * 8, "without a payload"),
    (frames.HELLO, "RLH of 4 bytes"),
    (frames.REGISTER + bytes(10), "RLR of 14 bytes"),
    (frames.REGISTERED + bytes(9), "RLA of 13 bytes"),
    (frames.SEND + bytes(65536), "over 65535"),
])
def test_bad_frames(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        frames.decode(data)


def test_stream_decoder_reassembles_split_frames() -> None:
    wire = b"".join(frames.stream_frame(f) for f in (b"one", b"two-two", b"3"))
    decoder = frames.StreamDecoder()
    got = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i:i + 1])
    assert got == [b"one", b"two-two", b"3"]
    with pytest.raises(FrameError, match="zero-length"):
        decoder.feed(b"\x00\x00")
