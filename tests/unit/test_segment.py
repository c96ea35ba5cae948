"""The compiled TSO/USO splitter (uspan.daemon._segment) against gso's numpy columns:
byte-identical segments for random super-segments, and no silent fallback in CI."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from uspan.daemon import gso
from uspan.daemon.gso import (
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    OffloadError,
    VirtioNetHdr,
)

try:
    from uspan.daemon import _segment
except ImportError:
    _segment = None  # type: ignore[assignment]

compiled = pytest.mark.skipif(_segment is None, reason="uspan.daemon._segment was not built")


def test_compiled_module_is_used_when_required() -> None:
    """CI sets USPAN_REQUIRE_COMPILED=1 (scripts/test): a silent fallback fails here."""
    if os.environ.get("USPAN_REQUIRE_COMPILED") != "1":
        pytest.skip("USPAN_REQUIRE_COMPILED is not set")
    assert _segment is not None, "uspan.daemon._segment did not build or import"
    assert gso.COMPILED and gso._segment is _segment


@compiled
def test_compiled_module_shares_the_udp_segment_limit() -> None:
    assert _segment is not None
    assert _segment.UDP_MAX_SEGMENTS == gso.UDP_MAX_SEGMENTS == 64


@st.composite
def super_segments(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """A (virtio_net_hdr, packet, mtu) as a TUN with TSO/USO could hand them over."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    v6, tcp = draw(st.booleans()), draw(st.booleans())
    if v6:
        ip_len = 40 + draw(st.sampled_from([0, 0, 0, 8, 16, 24, 3]))  # csum_start
        ip = bytearray(rng.randbytes(ip_len))
        ip[0] = 0x60 | (ip[0] & 0x0F)
        ip[6] = 6 if tcp else 17
    else:
        ip_len = 4 * draw(st.integers(5, 15))
        ip = bytearray(rng.randbytes(ip_len))
        ip[0] = 0x40 | ip_len // 4
        ip[9] = 6 if tcp else 17
    if tcp:
        l4 = bytearray(rng.randbytes(4 * draw(st.integers(5, 15))))
        l4[12] = (len(l4) // 4) << 4 | (l4[12] & 0x0F)
        l4[13] = draw(st.integers(0, 255))  # any flags: FIN, PSH, CWR, SYN, ...
        if draw(st.booleans()):
            l4[4:8] = struct.pack("!I", 0xFFFFFFFF - draw(st.integers(0, 3000)))  # wraps
    else:
        l4 = bytearray(rng.randbytes(8))
    if not v6 and draw(st.booleans()):
        ip[4:6] = struct.pack("!H", 0xFFFF - draw(st.integers(0, 60)))  # the ID wraps
    hdr_len = ip_len + len(l4)
    gso_size = draw(st.one_of(st.integers(1, 64), st.integers(500, 9000),
                              st.sampled_from([1, 2, 1207, 1208, 1368, 1448])))
    room = gso.UDP_MAX_PAYLOAD + 28 - hdr_len if not v6 else 65535 - hdr_len
    shape = draw(st.sampled_from(["any", "multiple", "tail", "small"]))
    count = draw(st.integers(0, 64))
    if shape == "any":
        size = draw(st.integers(0, room))
    elif shape == "small":
        size = draw(st.integers(0, 3 * gso_size))
    else:
        size = count * gso_size + (draw(st.integers(1, gso_size)) - 1 if shape == "tail" else 0)
    size = max(0, min(size, room))
    if tcp:  # sometimes an MTU smaller than the header and gso_size (a shrunken path)
        mtu = hdr_len + draw(st.one_of(st.just(gso_size), st.integers(1, gso_size + 64)))
    else:
        mtu = 1500
    gso_type = ((GSO_TCPV6 if v6 else GSO_TCPV4) | draw(st.sampled_from([0, GSO_ECN]))
                if tcp else GSO_UDP_L4)
    vnet = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size, ip_len,
                        16 if tcp else 6).pack()
    return vnet, bytes(ip + l4) + rng.randbytes(size), mtu


def split_both(vnet: bytes, packet: bytes, mtu: int,
               monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    results = []
    for module in (_segment, None):
        monkeypatch.setattr(gso, "_segment", module)
        try:
            results.append(gso.segment(vnet, packet, mtu))
        except OffloadError as error:
            results.append(str(error))
    return results[0], results[1]


@compiled
@settings(max_examples=400, deadline=None)
@given(super_segments())
def test_compiled_split_is_the_numpy_split(case: tuple[bytes, bytes, int]) -> None:
    vnet, packet, mtu = case
    with pytest.MonkeyPatch.context() as monkeypatch:
        ours, theirs = split_both(vnet, packet, mtu, monkeypatch)
    assert ours == theirs
    assert isinstance(ours, list) and all(type(part) is bytes for part in ours)


@compiled
@pytest.mark.parametrize("size", [0, 1, 1447, 1448, 1449, 45 * 1448, 65535 - 52])
@pytest.mark.parametrize("v6", [False, True])
def test_compiled_split_edges(size: int, v6: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    ip_len = 40 if v6 else 20
    size = min(size, 65535 - ip_len - 32)
    ip = bytearray(ip_len)
    ip[0], ip[6 if v6 else 9] = (0x60 if v6 else 0x45), 6
    l4 = bytearray(32)
    l4[12], l4[13] = 8 << 4, 0x10 | 0x08 | 0x01 | 0x80
    packet = bytes(ip + l4) + bytes(range(256)) * (size // 256) + bytes(size % 256)
    vnet = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4,
                        ip_len + 32, 1448, ip_len, 16).pack()
    ours, theirs = split_both(vnet, packet, 1500, monkeypatch)
    assert ours == theirs
    ours, theirs = split_both(vnet, bytearray(packet), 1500, monkeypatch)  # type: ignore[arg-type]
    assert ours == theirs


@compiled
def test_compiled_split_refuses_inconsistent_lengths() -> None:
    """Python checks every super-segment first; the module only guards its memory."""
    packet = bytes([0x45]) + bytes(59)
    with pytest.raises(ValueError, match="inconsistent"):
        _segment.split(packet, 20, 100, 8, False, False)
    with pytest.raises(ValueError, match="inconsistent"):
        _segment.split(packet, 20, 28, 0, False, False)
    with pytest.raises(ValueError, match="inconsistent"):
        _segment.split(packet, 20, 40, 8, False, True)  # TCP data offset 0
    with pytest.raises(ValueError, match="inconsistent"):
        _segment.split(bytes(70000), 20, 28, 8, False, False)
    # Lengths whose sums wrap around: the guard read (TCP) and copied (UDP) far outside.
    with pytest.raises(ValueError, match="inconsistent"):
        _segment.split(packet, 2**63 - 10, 60, 1, False, True)
    with pytest.raises(ValueError, match="inconsistent"):
        _segment.split(b"", 2**63 - 7, -(2**63) + 1, 2**63 - 1, False, False)


@st.composite
def tun_reads(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """A super-segment as ``super_segments`` makes it, with any virtio_net_hdr field or
    the packet's version, protocol or length sometimes wrong."""
    vnet, packet, mtu = draw(super_segments())
    hdr = list(VirtioNetHdr._make(struct.unpack("=BBHHHH", vnet)))
    data = bytearray(packet)
    for _ in range(draw(st.integers(0, 2))):
        what = draw(st.sampled_from(["none", "flags", "type", "start", "offset", "version",
                                     "proto", "truncate", "mtu"]))
        if what == "none":  # GSO_NONE, a partial checksum anywhere (or none)
            hdr[:2] = [draw(st.integers(0, 1)), 0]
            ends = st.sampled_from([min(max(len(data) - n, 0), 0xFFFF) for n in (-1, 0, 1, 2, 3)])
            hdr[4:] = [draw(st.one_of(st.integers(0, min(len(data), 0xFFFF)), ends)),
                       draw(st.integers(0, 30))]
        elif what == "flags":
            hdr[0] = draw(st.integers(0, 3))
        elif what == "type":
            hdr[1] = draw(st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x7F]))
        elif what == "start":
            hdr[4] = draw(st.integers(0, 120))
        elif what == "offset":
            hdr[5] = draw(st.integers(0, 120))
        elif what == "version" and data:
            data[0] = draw(st.integers(0, 255))
        elif what == "proto" and len(data) > 9:
            data[9] = draw(st.sampled_from([6, 17, 1]))
        elif what == "truncate":
            del data[draw(st.integers(0, len(data))):]
        else:
            mtu = draw(st.integers(0, 1600))
    return struct.pack("=BBHHHH", *hdr), bytes(data), mtu


@compiled
@settings(max_examples=500, deadline=None)
@given(tun_reads(), st.integers(0, 64))
@example((struct.pack("=BBHHHH", 0, 0, 0, 0, 0, 0), b"", 1420), 0)  # found by Hypothesis
def test_cut_is_gso_segment(case: tuple[bytes, bytes, int], headroom: int) -> None:
    """seg_cut, the plane's send side, cuts a TUN read as gso.segment does (the numpy
    splitter: an independent reference), each segment at headroom + index * stride, and
    refuses what it refuses; too few segments or too small a stride is "no room"."""
    assert _segment is not None
    vnet, packet, mtu = case
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(gso, "_segment", None)
        try:
            expected = gso.segment(vnet, packet, mtu)
        except OffloadError:
            with pytest.raises(ValueError, match="malformed"):
                _segment.cut(vnet, packet, mtu, headroom, 2048, 64)
            return
    stride = headroom + max(map(len, expected)) + 16
    buffer, places = _segment.cut(vnet, packet, mtu, headroom, stride, len(expected))
    assert places == [(headroom + i * stride, len(part)) for i, part in enumerate(expected)]
    assert [buffer[at : at + size] for at, size in places] == expected
    with pytest.raises(ValueError, match="no room"):
        _segment.cut(vnet, packet, mtu, headroom, stride, len(expected) - 1)
    small = headroom + len(expected[0]) - 1  # -1 for an empty packet at no headroom:
    if small >= 0:  # no stride is too small for it (a negative one is a bad argument)
        with pytest.raises(ValueError, match="no room"):
            _segment.cut(vnet, packet, mtu, headroom, small, len(expected))
