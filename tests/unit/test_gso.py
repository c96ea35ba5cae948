"""Software segmentation (uspan.daemon.gso): TSO/USO splitting, GRO coalescing, GSO batches.

Packets are built here from scratch and every header and checksum is checked with the
straightforward RFC 1071 word loop below, independent of the module's big-int trick.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uspan.daemon import gso, offload
from uspan.daemon.gso import (
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_NONE,
    OffloadError,
    VirtioNetHdr,
    coalesce,
    gso_batches,
    parse_vnet_hdr,
    segment,
    split_gro,
)
from uspan.daemon.offload import gso_cmsg

try:
    from uspan.daemon import _segment
except ImportError:
    _segment = None  # type: ignore[assignment]


@pytest.fixture(autouse=True, scope="module", params=[
    pytest.param(None, id="numpy"),
    pytest.param(_segment, id="compiled", marks=pytest.mark.skipif(
        _segment is None, reason="uspan.daemon._segment was not built")),
])
def splitter(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test on both splitters: the compiled one and gso's numpy columns (module
    scope, patched by hand: hypothesis refuses function-scoped fixtures)."""
    saved = gso._segment
    gso._segment = request.param
    yield
    gso._segment = saved

SRC4, DST4 = ipaddress.ip_address("10.1.2.3").packed, ipaddress.ip_address("10.9.8.7").packed
SRC6 = ipaddress.ip_address("fd00:1::3").packed
DST6 = ipaddress.ip_address("fd00:2::7").packed
FIN, SYN, RST, PSH, ACK, URG, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x80
TS_OPTIONS = bytes([1, 1, 8, 10]) + struct.pack("!II", 123456, 654321)


# --- an independent reference ------------------------------------------------------------


def ref_sum(data: bytes) -> int:
    """RFC 1071: add big-endian 16-bit words (odd length padded), fold the carries."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def ip_parts(packet: bytes) -> tuple[bool, int, bytes, bytes, int]:
    """(v6, header length, src, dst, proto) of a packet without extension headers."""
    if packet[0] >> 4 == 6:
        return True, 40, packet[8:24], packet[24:40], packet[6]
    return False, (packet[0] & 15) * 4, packet[12:16], packet[16:20], packet[9]


def l4_valid(packet: bytes) -> bool:
    _, ip_len, src, dst, proto = ip_parts(packet)
    return ref_sum(pseudo(src, dst, proto, len(packet) - ip_len) + packet[ip_len:]) == 0xFFFF


def check_ip(packet: bytes) -> None:
    """Length fields and the IPv4 header checksum agree with the packet."""
    v6, ip_len, *_ = ip_parts(packet)
    if v6:
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
    else:
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
        assert ref_sum(packet[:ip_len]) == 0xFFFF, "IPv4 header checksum"


# --- packet builders ---------------------------------------------------------------------


def ipv4(proto: int, l4: bytes, *, ident: int = 0x4000, tos: int = 0, ttl: int = 64,
         df: bool = True, src: bytes = SRC4, dst: bytes = DST4) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(l4), ident,
                                   0x4000 if df else 0, ttl, proto, 0, src, dst))
    header[10:12] = struct.pack("!H", ref_checksum(bytes(header)))
    return bytes(header) + l4


def ipv6(proto: int, l4: bytes, *, tc: int = 0, flow: int = 0, hops: int = 64,
         src: bytes = SRC6, dst: bytes = DST6) -> bytes:
    first = (6 << 28) | (tc << 20) | flow
    return struct.pack("!IHBB16s16s", first, len(l4), proto, hops, src, dst) + l4


def tcp_header(seq: int, ack: int, flags: int, options: bytes = b"", *, sport: int = 40000,
               dport: int = 5201, window: int = 502) -> bytes:
    assert len(options) % 4 == 0
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window,
                       0, 0) + options


def fill_l4_checksum(packet: bytes, value: int | None = None) -> bytes:
    """Store the full (or the given) TCP/UDP checksum in the packet."""
    _, ip_len, src, dst, proto = ip_parts(packet)
    at = ip_len + (16 if proto == 6 else 6)
    out = bytearray(packet)
    out[at : at + 2] = b"\0\0"
    if value is None:
        value = ref_checksum(pseudo(src, dst, proto, len(packet) - ip_len) + out[ip_len:])
        if proto == 17 and value == 0:
            value = 0xFFFF
    out[at : at + 2] = struct.pack("!H", value)
    return bytes(out)


def tcp_packet(payload: bytes, *, v6: bool = False, seq: int = 1000, ack: int = 77,
               flags: int = ACK, options: bytes = b"", sport: int = 40000, dport: int = 5201,
               window: int = 502, **ip) -> bytes:
    l4 = tcp_header(seq, ack, flags, options, sport=sport, dport=dport, window=window) + payload
    return fill_l4_checksum(ipv6(6, l4, **ip) if v6 else ipv4(6, l4, **ip))


def udp_packet(payload: bytes, *, v6: bool = False, sport: int = 51820, **ip) -> bytes:
    l4 = struct.pack("!HHHH", sport, 4500, 8 + len(payload), 0) + payload
    return fill_l4_checksum(ipv6(17, l4, **ip) if v6 else ipv4(17, l4, **ip))


def partial(packet: bytes) -> bytes:
    """The packet as the kernel hands it over with CHECKSUM_PARTIAL: pseudo sum only."""
    _, ip_len, src, dst, proto = ip_parts(packet)
    return fill_l4_checksum(packet, ref_sum(pseudo(src, dst, proto, len(packet) - ip_len)))


def tso(payload: bytes, gso_size: int, *, v6: bool = False, flags: int = ACK | PSH,
        options: bytes = b"", seq: int = 1000, **ip) -> tuple[bytes, bytes]:
    """A TCP super-segment and its virtio_net_hdr, as a TUN with TSO delivers them."""
    packet = partial(tcp_packet(payload, v6=v6, flags=flags, options=options, seq=seq, **ip))
    ip_len = 40 if v6 else 20
    hdr = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4,
                       ip_len + 20 + len(options), gso_size, ip_len, 16)
    return hdr.pack(), packet


def uso(payload: bytes, gso_size: int, *, v6: bool = False) -> tuple[bytes, bytes]:
    packet = partial(udp_packet(payload, v6=v6))
    ip_len = 40 if v6 else 20
    hdr = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_UDP_L4, ip_len + 8, gso_size,
                       ip_len, 6)
    return hdr.pack(), packet


def tcp_fields(packet: bytes) -> tuple[int, int, int, bytes]:
    """(seq, ack, flags, payload) of a TCP packet."""
    _, ip_len, *_ = ip_parts(packet)
    seq, ack, offset, flags = struct.unpack_from("!IIBB", packet, ip_len + 4)
    return seq, ack, flags, packet[ip_len + (offset >> 4) * 4 :]


def stream(count: int, size: int, *, v6: bool = False, seq: int = 1000, last: int | None = None,
           ident: int = 0x4000, **kw) -> list[bytes]:
    """``count`` contiguous ACK segments of ``size`` bytes (the last ``last`` bytes)."""
    out = []
    for i in range(count):
        length = last if last is not None and i == count - 1 else size
        payload = bytes([(i * 7 + j) & 0xFF for j in range(min(length, 64))]) * (
            length // 64 + 1)
        extra = {} if v6 else {"ident": (ident + i) & 0xFFFF}
        out.append(tcp_packet(payload[:length], v6=v6, seq=seq, **extra, **kw))
        seq += length
    return out


# --- virtio_net_hdr and checksums --------------------------------------------------------


def test_vnet_hdr_layout_is_native_u8_u8_u16x4() -> None:
    hdr = VirtioNetHdr(1, GSO_TCPV4, 54, 1448, 20, 16)
    assert hdr.pack() == struct.pack("=BBHHHH", 1, 1, 54, 1448, 20, 16)
    assert len(hdr.pack()) == gso.VNET_HDR_LEN == 10
    assert parse_vnet_hdr(hdr.pack() + b"packet") == hdr
    assert parse_vnet_hdr(VNET_NONE) == VirtioNetHdr()


def test_vnet_hdr_too_short() -> None:
    with pytest.raises(OffloadError, match="9 bytes"):
        parse_vnet_hdr(bytes(9))


def test_constants_match_the_kernel_headers() -> None:
    assert (GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN) == (0, 1, 3, 4, 5, 0x80)
    assert offload.TUNSETOFFLOAD == 0x400454D0
    assert (offload.SOL_UDP, offload.UDP_SEGMENT, offload.UDP_GRO) == (17, 103, 104)
    flags = (offload.TUN_F_CSUM, offload.TUN_F_TSO4, offload.TUN_F_TSO6, offload.TUN_F_USO4,
             offload.TUN_F_USO6)
    assert flags == (1, 2, 4, 0x20, 0x40)


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d).
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert gso.checksum(data) == 0x220D == ref_checksum(data)


@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data: bytes) -> None:
    assert gso.checksum(data) == ref_checksum(data)


@pytest.mark.parametrize("data", [b"", bytes(100), b"\xff" * 100, b"\xff", b"\x00\x01" * 7])
def test_checksum_edge_values(data: bytes) -> None:
    assert gso.checksum(data) == ref_checksum(data)


@pytest.mark.parametrize("v6", [False, True])
def test_l4_checksum_ok(v6: bool) -> None:
    good = tcp_packet(os.urandom(301), v6=v6)
    assert gso.l4_checksum_ok(good)
    assert gso.l4_checksum_ok(udp_packet(os.urandom(77), v6=v6))
    bad = bytearray(good)
    bad[-1] ^= 0x40
    assert not gso.l4_checksum_ok(bytes(bad))
    assert not gso.l4_checksum_ok(partial(good))


def test_l4_checksum_ok_ipv4_udp_without_checksum_is_not_verified() -> None:
    assert not gso.l4_checksum_ok(fill_l4_checksum(udp_packet(b"abc"), 0))


# --- segment: GSO_NONE -------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_segment_completes_partial_checksum(v6: bool, kind: str) -> None:
    full = tcp_packet(os.urandom(555), v6=v6) if kind == "tcp" else udp_packet(b"x" * 99, v6=v6)
    ip_len = 40 if v6 else 20
    hdr = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, ip_len,
                       16 if kind == "tcp" else 6)
    [out] = segment(hdr.pack(), memoryview(partial(full)), 1500)
    assert out == full
    assert l4_valid(out)


def test_segment_partial_checksum_zero_becomes_ffff() -> None:
    # Choose the last payload word so that the data sums to 0xffff: checksum 0 -> 0xffff.
    base = udp_packet(b"hello world!" + b"\0\0")
    _, ip_len, src, dst, proto = ip_parts(base)
    zeroed = bytearray(base)
    zeroed[ip_len + 6 : ip_len + 8] = b"\0\0"
    need = 0xFFFF - ref_sum(pseudo(src, dst, proto, len(base) - ip_len) + bytes(zeroed[ip_len:]))
    zeroed[-2:] = struct.pack("!H", need)
    packet = bytes(zeroed)
    assert ref_checksum(pseudo(src, dst, proto, len(packet) - ip_len) + packet[ip_len:]) == 0
    hdr = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6)
    [out] = segment(hdr.pack(), partial(packet), 1500)
    assert out[ip_len + 6 : ip_len + 8] == b"\xff\xff"
    assert l4_valid(out)


def test_segment_udp_l4_zero_checksum_becomes_ffff() -> None:
    # The first datagram's payload is chosen so that its UDP checksum computes to 0.
    first = bytearray(b"0123456789abcdef")
    base = udp_packet(bytes(first))
    _, ip_len, src, dst, proto = ip_parts(base)
    l4 = bytearray(base[ip_len:])
    l4[6:8] = b"\0\0"
    l4[-2:] = b"\0\0"
    first[-2:] = struct.pack("!H", 0xFFFF - ref_sum(pseudo(src, dst, proto, len(l4)) + l4))
    vnet, packet = uso(bytes(first) + b"tail", len(first))
    one, two = segment(vnet, packet, 1500)
    assert one[ip_len + 6 : ip_len + 8] == b"\xff\xff"
    assert l4_valid(one) and l4_valid(two)


def test_segment_plain_packet_untouched() -> None:
    packet = tcp_packet(b"data")
    assert segment(VNET_NONE, packet, 1500) == [packet]


def test_segment_partial_checksum_out_of_range() -> None:
    hdr = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 200)
    with pytest.raises(OffloadError, match="csum_offset 200"):
        segment(hdr.pack(), tcp_packet(b"data"), 1500)


# --- segment: TSO --------------------------------------------------------------------------


def check_tcp_segments(segments: list[bytes], original: bytes, gso_size: int, mtu: int) -> None:
    """Every segment is a valid packet; together they carry the super-segment exactly."""
    v6, ip_len, *_ = ip_parts(original)
    seq0, ack0, flags0, payload0 = tcp_fields(original)
    offset = 0
    for index, packet in enumerate(segments):
        last = index == len(segments) - 1
        assert len(packet) <= mtu
        check_ip(packet)
        assert l4_valid(packet), f"segment {index}: TCP checksum"
        seq, ack, flags, payload = tcp_fields(packet)
        assert seq == (seq0 + offset) & 0xFFFFFFFF
        assert ack == ack0
        expected = flags0 if last else flags0 & ~(FIN | PSH)
        assert flags == (expected if index == 0 else expected & ~CWR)
        assert len(payload) == gso_size or (last and 0 < len(payload) <= gso_size)
        if not v6:
            assert struct.unpack_from("!H", packet, 4)[0] == (
                struct.unpack_from("!H", original, 4)[0] + index) & 0xFFFF
            assert packet[6:10] == original[6:10] and packet[12:20] == original[12:20]
        else:
            assert packet[:4] == original[:4] and packet[6:40] == original[6:40]
        hdr_len = len(packet) - len(payload)
        # Ports, window, options are the super-segment's.
        assert packet[ip_len : ip_len + 4] == original[ip_len : ip_len + 4]
        assert packet[ip_len + 14 : ip_len + 16] == original[ip_len + 14 : ip_len + 16]
        assert packet[ip_len + 20 : hdr_len] == original[ip_len + 20 : hdr_len]
        offset += len(payload)
    assert b"".join(tcp_fields(p)[3] for p in segments) == payload0


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("options", [b"", TS_OPTIONS])
@pytest.mark.parametrize("flags", [ACK, ACK | PSH, ACK | PSH | FIN, ACK | CWR])
def test_segment_tcp(v6: bool, options: bytes, flags: int) -> None:
    payload = os.urandom(10_000)
    vnet, packet = tso(payload, 1388, v6=v6, flags=flags, options=options)
    segments = segment(vnet, packet, 1500)
    assert len(segments) == 8  # 7 x 1388 + 284
    check_tcp_segments(segments, packet, 1388, 1500)


def test_segment_tcp_ecn_flag_and_sequence_wraparound() -> None:
    vnet, packet = tso(os.urandom(5000), 1000, flags=ACK | CWR, seq=0xFFFFF000)
    hdr = parse_vnet_hdr(vnet)
    vnet = hdr._replace(gso_type=GSO_TCPV4 | GSO_ECN).pack()
    segments = segment(vnet, packet, 1500)
    assert [tcp_fields(s)[0] for s in segments] == [
        (0xFFFFF000 + 1000 * i) & 0xFFFFFFFF for i in range(5)]
    assert tcp_fields(segments[0])[2] == ACK | CWR
    assert all(tcp_fields(s)[2] == ACK for s in segments[1:])
    check_tcp_segments(segments, packet, 1000, 1500)


def test_segment_tcp_ipv4_id_wraps() -> None:
    vnet, packet = tso(os.urandom(3000), 1000, ident=0xFFFF)
    ids = [struct.unpack_from("!H", s, 4)[0] for s in segment(vnet, packet, 1500)]
    assert ids == [0xFFFF, 0, 1]


def test_segment_tcp_ignores_kernel_hdr_len() -> None:
    # On the forwarding path hdr_len can span the whole first segment.
    vnet, packet = tso(os.urandom(4000), 1400, options=TS_OPTIONS)
    vnet = parse_vnet_hdr(vnet)._replace(hdr_len=20 + 32 + 1400).pack()
    check_tcp_segments(segment(vnet, packet, 1500), packet, 1400, 1500)


def test_segment_tcp_mtu_smaller_than_gso_size() -> None:
    vnet, packet = tso(os.urandom(6000), 1448, v6=True)
    segments = segment(vnet, packet, 1280)
    check_tcp_segments(segments, packet, 1280 - 60, 1280)
    assert max(len(s) for s in segments) == 1280


def test_segment_tcp_exactly_one_segment_of_payload() -> None:
    vnet, packet = tso(os.urandom(1000), 1000)
    [out] = segment(vnet, packet, 1500)
    assert out == tcp_packet(tcp_fields(packet)[3], flags=ACK | PSH)


@pytest.mark.parametrize("v6", [False, True])
def test_segment_udp_l4(v6: bool) -> None:
    payload = os.urandom(7 * 1200 + 5)
    vnet, packet = uso(payload, 1200, v6=v6)
    segments = segment(vnet, packet, 1500)
    assert len(segments) == 8
    ip_len = 40 if v6 else 20
    for index, datagram in enumerate(segments):
        check_ip(datagram)
        assert l4_valid(datagram)
        assert datagram[ip_len : ip_len + 4] == packet[ip_len : ip_len + 4]
        assert struct.unpack_from("!H", datagram, ip_len + 4)[0] == len(datagram) - ip_len
        assert datagram[ip_len + 8 :] == payload[index * 1200 : (index + 1) * 1200]
        if not v6:
            assert struct.unpack_from("!H", datagram, 4)[0] == 0x4000 + index
    assert datagram == udp_packet(payload[-5:], v6=v6, **({} if v6 else {"ident": 0x4007}))


@pytest.mark.parametrize(
    ("hdr", "match"),
    [
        (VirtioNetHdr(1, GSO_UDP, 28, 1000, 20, 6), "gso_type 0x3"),
        (VirtioNetHdr(1, GSO_TCPV4, 40, 0, 20, 16), "gso_size 0"),
        (VirtioNetHdr(1, GSO_TCPV4, 40, 1000, 24, 16), "csum_start 24"),
        (VirtioNetHdr(1, GSO_TCPV6, 60, 1000, 40, 16), "not an IPv6 packet"),
        (VirtioNetHdr(1, GSO_UDP_L4, 28, 1000, 20, 6), "IPv4 protocol 6"),
    ],
)
def test_segment_rejects_malformed(hdr: VirtioNetHdr, match: str) -> None:
    _, packet = tso(os.urandom(3000), 1000)
    with pytest.raises(OffloadError, match=match):
        segment(hdr.pack(), packet, 1500)


def test_segment_rejects_truncated_tcp_header() -> None:
    _, packet = tso(b"", 1000)
    hdr = VirtioNetHdr(1, GSO_TCPV4, 40, 1000, 20, 16)
    with pytest.raises(OffloadError, match="does not fit"):
        segment(hdr.pack(), packet[:30], 1500)


# --- coalesce -------------------------------------------------------------------------------


def assert_super_segment(vnet: bytes, packet: bytes, parts: list[bytes]) -> None:
    """A correct GSO super-segment made of ``parts`` (all valid TCP/UDP packets)."""
    hdr = parse_vnet_hdr(vnet)
    v6, ip_len, src, dst, proto = ip_parts(packet)
    tcp = proto == 6
    assert hdr.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert hdr.gso_type == (GSO_UDP_L4 if not tcp else GSO_TCPV6 if v6 else GSO_TCPV4)
    assert hdr.csum_start == ip_len
    assert hdr.csum_offset == (16 if tcp else 6)
    header_len = ip_len + ((packet[ip_len + 12] >> 4) * 4 if tcp else 8)
    assert hdr.hdr_len == header_len
    assert hdr.gso_size == len(parts[0]) - header_len
    check_ip(packet)
    at = ip_len + hdr.csum_offset
    l4_len = len(packet) - ip_len
    assert struct.unpack_from("!H", packet, at)[0] == ref_sum(pseudo(src, dst, proto, l4_len))
    assert packet[header_len:] == b"".join(p[header_len:] for p in parts)
    if tcp:
        assert tcp_fields(packet)[:2] == tcp_fields(parts[0])[:2]
        assert tcp_fields(packet)[2] == ACK | (tcp_fields(parts[-1])[2] & PSH)
    else:
        assert struct.unpack_from("!H", packet, ip_len + 4)[0] == l4_len


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("options", [b"", TS_OPTIONS])
def test_coalesce_contiguous_stream(v6: bool, options: bytes) -> None:
    parts = stream(20, 1200, v6=v6, options=options, last=300)
    [(vnet, packet)] = coalesce(parts)
    assert_super_segment(vnet, packet, parts)


@pytest.mark.parametrize("v6", [False, True])
def test_segment_then_coalesce_round_trip(v6: bool) -> None:
    payload = os.urandom(30_000)
    vnet, packet = tso(payload, 1400, v6=v6, options=TS_OPTIONS)
    segments = segment(vnet, packet, 1500)
    [(vnet2, packet2)] = coalesce(segments)
    assert_super_segment(vnet2, packet2, segments)
    assert tcp_fields(packet2)[3] == payload
    assert segment(vnet2, packet2, 1500) == segments


def test_coalesce_psh_ends_run() -> None:
    first = stream(3, 1000, seq=1, flags=ACK | PSH)
    # PSH on the 3rd of 6 contiguous segments: [0..2] merge with PSH, [3..5] merge after.
    parts = stream(6, 1000, seq=1)
    parts[2] = first[2]
    out = coalesce(parts)
    assert len(out) == 2
    assert_super_segment(*out[0], parts[:3])
    assert_super_segment(*out[1], parts[3:])
    assert tcp_fields(out[0][1])[2] == ACK | PSH
    assert tcp_fields(out[1][1])[2] == ACK


def test_coalesce_stops_at_64k() -> None:
    parts = stream(60, 1400)
    out = coalesce(parts)
    assert [len(p) for _, p in out] == [40 + 46 * 1400, 40 + 14 * 1400]
    assert_super_segment(*out[0], parts[:46])
    assert_super_segment(*out[1], parts[46:])
    assert all(len(p) <= 65535 for _, p in out)


def test_coalesce_shorter_segment_ends_run() -> None:
    first = stream(3, 1000, last=500)  # 1000, 1000, 500
    second = stream(2, 1000, seq=3500, ident=0x4003)  # contiguous, but after a short one
    out = coalesce(first + second)
    assert len(out) == 2
    assert_super_segment(*out[0], first)
    assert_super_segment(*out[1], second)


def test_coalesce_larger_after_smaller_is_refused() -> None:
    small = stream(1, 500)
    big = stream(1, 1000, seq=1500, ident=0x4001)
    out = coalesce(small + big)
    assert out == [(VNET_NONE, small[0]), (VNET_NONE, big[0])]


def unmerged(parts: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [(VNET_NONE, p) for p in parts]


OTHER_OPTIONS = bytes([1, 1, 8, 10]) + struct.pack("!II", 123457, 654321)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param({}, {"seq": 3000}, id="sequence gap"),
        pytest.param({}, {"seq": 1999}, id="overlap"),
        pytest.param({}, {"ack": 78}, id="different ack"),
        pytest.param({}, {"sport": 40001}, id="other flow"),
        pytest.param({}, {"options": TS_OPTIONS}, id="options length"),
        pytest.param({"options": TS_OPTIONS}, {"options": OTHER_OPTIONS}, id="options differ"),
        pytest.param({}, {"tos": 4}, id="tos"),
        pytest.param({}, {"ttl": 63}, id="ttl"),
        pytest.param({}, {"window": 501}, id="window"),
        pytest.param({}, {"df": False}, id="df"),
        pytest.param({}, {"ident": 0x4005}, id="ip id jump"),
        pytest.param({}, {"src": bytes([10, 1, 2, 4])}, id="source address"),
        pytest.param({}, {"flags": ACK | URG}, id="urg"),
        pytest.param({}, {"flags": ACK | FIN}, id="fin"),
        pytest.param({}, {"flags": ACK | RST}, id="rst"),
        pytest.param({}, {"flags": ACK | SYN}, id="syn"),
        pytest.param({}, {"flags": ACK | CWR}, id="cwr"),
        pytest.param({"flags": ACK | PSH}, {}, id="psh before"),
        pytest.param({"flags": ACK | FIN}, {}, id="fin before"),
    ],
)
def test_coalesce_refuses_ipv4(first: dict, second: dict) -> None:
    one = tcp_packet(bytes(1000), **{"seq": 1000, "ident": 0x4000, **first})
    two = tcp_packet(bytes(1000), **{"seq": 2000, "ident": 0x4001,
                                     "options": first.get("options", b""), **second})
    assert coalesce([one, two]) == unmerged([one, two])
    # The same pair with nothing changed does merge: the refusal is due to the change.
    base = tcp_packet(bytes(1000), seq=2000, ident=0x4001, options=first.get("options", b""))
    if not first or "options" in first:
        assert len(coalesce([one, base])) == 1


def one_by_one(packets: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The per-packet merging rules alone, as a reference for the batch check."""
    runs: dict[bytes, gso._Run] = {}
    order: list[gso._Run | bytes] = []
    gso._merge_each(packets, False, runs, order)
    return [(VNET_NONE, item) if isinstance(item, bytes) else item.build() for item in order]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("at", [0, 3, 7])
@pytest.mark.parametrize(
    "change",
    [
        {"seq": 1}, {"ack": 78}, {"sport": 40001}, {"tos": 4}, {"ttl": 63}, {"df": False},
        {"ident": 0x4105}, {"flags": ACK | URG}, {"flags": ACK | PSH}, {"flags": ACK | FIN},
        {"window": 1}, {"corrupt": True}, {},
    ],
)
def test_coalesce_equal_length_stretch_follows_the_per_packet_rules(
        v6: bool, at: int, change: dict) -> None:
    """Equal-length segments are checked as one batch; a change anywhere in the stretch
    gives exactly what merging one packet at a time gives."""
    parts = stream(8, 1000, v6=v6, options=TS_OPTIONS)
    fields = {"seq": 1000 + 1000 * at, "options": TS_OPTIONS, **change}
    if v6:
        for key in ("tos", "ttl", "df", "ident"):
            fields.pop(key, None)
    else:
        fields.setdefault("ident", 0x4000 + at)
    corrupted = fields.pop("corrupt", False)
    if fields.get("seq") == 1:
        fields["seq"] = 1000 + 1000 * at + 1
    parts[at] = tcp_packet(tcp_fields(parts[at])[3], v6=v6, **fields)
    if corrupted:
        parts[at] = corrupt(parts[at])
    out = coalesce(parts)
    assert out == one_by_one(parts)
    if not change:
        assert len(out) == 1



@pytest.mark.parametrize(
    "second",
    [
        pytest.param({"tc": 1}, id="traffic class"),
        pytest.param({"flow": 0x12345}, id="flow label"),
        pytest.param({"hops": 1}, id="hop limit"),
        pytest.param({"dst": bytes(16)}, id="destination"),
    ],
)
def test_coalesce_refuses_ipv6(second: dict) -> None:
    first = tcp_packet(bytes(1000), v6=True, seq=1000)
    other = tcp_packet(bytes(1000), v6=True, seq=2000, **second)
    assert coalesce([first, other]) == unmerged([first, other])


def test_coalesce_accepts_fixed_ipv4_id_with_df() -> None:
    parts = [tcp_packet(bytes(1000), seq=1000 + 1000 * i, ident=7) for i in range(3)]
    [(vnet, packet)] = coalesce(parts)
    assert_super_segment(vnet, packet, parts)
    without_df = [tcp_packet(bytes(1000), seq=1000 + 1000 * i, ident=7, df=False)
                  for i in range(2)]
    assert coalesce(without_df) == unmerged(without_df)


def test_coalesce_refuses_mixed_ipv4_id_modes() -> None:
    parts = [tcp_packet(bytes(1000), seq=1000 + 1000 * i, ident=ident)
             for i, ident in enumerate([7, 7, 9])]  # fixed, then incrementing from the head
    out = coalesce(parts)
    assert len(out) == 2
    assert_super_segment(*out[0], parts[:2])
    assert out[1] == (VNET_NONE, parts[2])


def test_coalesce_refuses_ip_options_and_fragments() -> None:
    parts = stream(2, 1000)
    fragment = bytearray(parts[1])
    fragment[6] |= 0x20  # more fragments
    with_options = bytearray(parts[1])
    with_options[0] = 0x46
    for odd in (bytes(fragment), bytes(with_options)):
        assert coalesce([parts[0], odd]) == unmerged([parts[0], odd])


def test_coalesce_refuses_bad_length_fields() -> None:
    parts = stream(2, 1000)
    padded = parts[1] + b"\0\0"  # trailing bytes beyond the IPv4 total length
    assert coalesce([parts[0], padded]) == unmerged([parts[0], padded])


def corrupt(packet: bytes) -> bytes:
    out = bytearray(packet)
    out[-1] ^= 0xFF
    return bytes(out)


def test_coalesce_bad_checksum_in_the_middle_passes_alone() -> None:
    parts = stream(5, 1000)
    parts[2] = corrupt(parts[2])
    out = coalesce(parts)
    assert out[1] == (VNET_NONE, parts[2])  # unchanged, flags 0: the kernel will drop it
    assert_super_segment(*out[0], parts[:2])
    assert_super_segment(*out[2], parts[3:])
    assert len(out) == 3


def test_coalesce_bad_checksum_at_the_head() -> None:
    parts = stream(4, 1000)
    parts[0] = corrupt(parts[0])
    out = coalesce(parts)
    assert out[0] == (VNET_NONE, parts[0])
    assert len(out) == 2
    assert_super_segment(*out[1], parts[1:])


def test_coalesce_partial_checksum_is_not_trusted() -> None:
    parts = [partial(p) for p in stream(3, 1000)]
    assert coalesce(parts) == unmerged(parts)


def test_coalesce_keeps_order_within_each_flow() -> None:
    # Flow a uses one IPv4 ID under DF, so only the pure ACK keeps a[4:] out of a's run.
    a = [tcp_packet(bytes(1000), seq=1000 * i, sport=1111, ident=9) for i in range(6)]
    pure_ack = tcp_packet(b"", seq=4000, sport=1111, ident=9)
    b = stream(4, 1000, sport=2222, v6=True)
    interleaved = [a[0], b[0], a[1], b[1], a[2], a[3], b[2], pure_ack, b[3], a[4], a[5]]
    out = coalesce(interleaved)
    assert len(out) == 4
    assert_super_segment(*out[0], a[:4])
    assert_super_segment(*out[1], b)
    assert out[2] == (VNET_NONE, pure_ack)  # not merged, and nothing later jumps ahead of it
    assert_super_segment(*out[3], a[4:])
    assert len(coalesce([*a[:4], *a[4:]])) == 1  # without the ACK they would merge


def test_coalesce_passes_other_packets_through() -> None:
    icmp = ipv4(1, b"\x08\x00" + bytes(30))
    syn = tcp_packet(b"", flags=SYN)
    junk = b"\x45\x00"
    udp = udp_packet(b"q" * 100)
    packets = [icmp, syn, junk, udp, udp]
    assert coalesce(packets) == unmerged(packets)


@pytest.mark.parametrize("v6", [False, True])
def test_coalesce_udp_behind_flag(v6: bool) -> None:
    parts = [udp_packet(bytes([i]) * 1200, v6=v6, **({} if v6 else {"ident": 0x4000 + i}))
             for i in range(5)]
    parts.append(udp_packet(b"tail", v6=v6, **({} if v6 else {"ident": 0x4005})))
    assert coalesce(parts) == unmerged(parts)
    [(vnet, packet)] = coalesce(parts, udp=True)
    assert_super_segment(vnet, packet, parts)
    assert segment(vnet, packet, 1500) == parts


def test_coalesce_udp_refuses_bad_checksum_and_no_checksum() -> None:
    parts = [udp_packet(b"a" * 500, ident=0x4000 + i) for i in range(3)]
    bad = [parts[0], corrupt(parts[1]), parts[2]]
    out = coalesce(bad, udp=True)
    assert out == unmerged(bad)
    none = [fill_l4_checksum(p, 0) for p in parts]
    assert coalesce(none, udp=True) == unmerged(none)


@pytest.mark.parametrize("v6", [False, True])
def test_coalesce_udp_at_most_64_segments(v6: bool) -> None:
    """Since Linux 6.11 the TUN refuses (EINVAL) a USO write of more than 64 datagrams,
    so 200 of one flow are four writes, not one that loses them all."""
    parts = [udp_packet(i.to_bytes(2, "big") * 5, v6=v6, **({} if v6 else {"ident": i}))
             for i in range(200)]
    out = coalesce(parts, udp=True)
    assert [len(segment(vnet, packet, 1500)) for vnet, packet in out] == [64, 64, 64, 8]
    for start, (vnet, packet) in zip(range(0, 200, 64), out, strict=True):
        assert_super_segment(vnet, packet, parts[start : start + 64])
        assert segment(vnet, packet, 1500) == parts[start : start + 64]


def ipv4_header_corrupted(packet: bytes) -> bytes:
    out = bytearray(packet)
    out[10] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("at", [0, 3, 7])
def test_coalesce_refuses_a_bad_ipv4_header_checksum(at: int) -> None:
    """Alone, the kernel drops a packet whose IPv4 header checksum does not verify; a
    merge would rewrite it as valid. It passes through as it came, splitting the run
    (a stretch of equal segments too, which the fallback checks as numpy rows)."""
    parts = stream(8, 1000)
    parts[at] = ipv4_header_corrupted(parts[at])
    before, after = parts[:at], parts[at + 1 :]
    out = coalesce(parts)
    assert out == [*coalesce(before), (VNET_NONE, parts[at]), *coalesce(after)]
    assert len(out) == 1 + bool(before) + bool(after)
    udp = [udp_packet(b"u" * 500), ipv4_header_corrupted(udp_packet(b"v" * 500))]
    assert coalesce(udp, udp=True) == unmerged(udp)
    assert coalesce(udp[::-1], udp=True) == unmerged(udp[::-1])


def ipv6_udp_zero_checksum(fill: int) -> bytes:
    """An IPv6 UDP datagram whose checksum is 0xFFFF (its sum is zero): the field 0
    verifies modulo 0xFFFF as well, but an IPv6 UDP checksum of 0 is invalid."""
    packet = udp_packet(bytes([fill]) * 100 + b"\0\0", v6=True)
    value = packet[46:48]  # the checksum over the payload with a zero last word
    packet = udp_packet(bytes([fill]) * 100 + value, v6=True)
    assert packet[46:48] == b"\xff\xff"
    return fill_l4_checksum(packet, 0)


def test_coalesce_udp_refuses_a_zero_ipv6_checksum() -> None:
    zero = [ipv6_udp_zero_checksum(fill) for fill in (1, 2, 3)]
    assert all(gso.l4_checksum_ok(packet) for packet in zero)  # passes the sum check
    assert coalesce(zero, udp=True) == unmerged(zero)
    sent = [fill_l4_checksum(packet, 0xFFFF) for packet in zero]  # as a sender writes it
    [(vnet, packet)] = coalesce(sent, udp=True)
    assert_super_segment(vnet, packet, sent)


def test_coalesce_refuses_tcp_reserved_bits_that_differ() -> None:
    """The kernel's GRO compares the whole flag word but CWR, FIN and PSH."""
    one, two = stream(2, 1000)
    changed = bytearray(two)
    changed[20 + 12] |= 0x01  # the AE bit (RFC 3540's NS)
    marked = fill_l4_checksum(bytes(changed))
    assert coalesce([one, marked]) == unmerged([one, marked])


def test_coalesce_over_64k_ipv6_packets_pass_through() -> None:
    """IPv6 packets may exceed 65,535 bytes (the payload length excludes the header):
    none merges, and the fallback's stretch check has no room for two of them."""
    size = 65_535 - 20 - len(TS_OPTIONS)
    parts = stream(4, size, v6=True, options=TS_OPTIONS)
    assert len(parts[0]) > 65_535
    assert coalesce(parts) == unmerged(parts)


@settings(max_examples=60, deadline=None)
@given(
    v6=st.booleans(),
    size=st.integers(min_value=1, max_value=40_000),
    gso_size=st.integers(min_value=64, max_value=1500),
    options=st.sampled_from([b"", TS_OPTIONS, bytes([1, 1, 1, 0])]),
    seq=st.integers(min_value=0, max_value=0xFFFFFFFF),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_round_trip_random_sizes(v6: bool, size: int, gso_size: int, options: bytes, seq: int,
                                 seed: int) -> None:
    payload = random.Random(seed).randbytes(size)
    vnet, packet = tso(payload, gso_size, v6=v6, options=options, seq=seq)
    segments = segment(vnet, packet, 1500)
    header = (40 if v6 else 20) + 20 + len(options)
    check_tcp_segments(segments, packet, min(gso_size, 1500 - header), 1500)
    out = coalesce(segments)
    assert b"".join(tcp_fields(p)[3] for _, p in out) == payload
    for vnet2, packet2 in out:
        if parse_vnet_hdr(vnet2).gso_type == GSO_NONE:
            assert vnet2 == VNET_NONE and l4_valid(packet2)
    if len(segments) > 1:
        [(vnet2, packet2)] = out
        assert segment(vnet2, packet2, 1500) == segments


@settings(max_examples=40, deadline=None)
@given(
    v6=st.booleans(),
    size=st.integers(min_value=1, max_value=20_000),
    gso_size=st.integers(min_value=8, max_value=1400),
)
def test_udp_round_trip_random_sizes(v6: bool, size: int, gso_size: int) -> None:
    payload = os.urandom(size)
    vnet, packet = uso(payload, gso_size, v6=v6)
    datagrams = segment(vnet, packet, 1500)
    assert all(l4_valid(d) for d in datagrams)
    out = coalesce(datagrams, udp=True)
    assert b"".join(p[(40 if v6 else 20) + 8 :] for _, p in out) == payload
    # At most UDP_MAX_SEGMENTS datagrams per super-segment (a USO write of more fails).
    assert len(out) == -(-len(datagrams) // gso.UDP_MAX_SEGMENTS)
    assert [d for vnet2, packet2 in out for d in segment(vnet2, packet2, 1500)] == datagrams


# --- UDP socket helpers (pure parts; the kernel side is in tests/system) --------------------


def test_gso_cmsg() -> None:
    assert gso_cmsg(1452) == (17, 103, struct.pack("=H", 1452))
    with pytest.raises(OffloadError, match="size 0"):
        gso_cmsg(0)
    with pytest.raises(OffloadError, match="size 65536"):
        gso_cmsg(65536)


def test_split_gro() -> None:
    data = bytes(range(250))
    assert split_gro(data, 100) == [data[:100], data[100:200], data[200:]]
    assert split_gro(data, 0) == [data]
    assert split_gro(data, 250) == [data]
    assert split_gro(memoryview(data)[:200], 50) == [data[i : i + 50] for i in (0, 50, 100, 150)]


def test_gso_batches() -> None:
    a, b, c = b"a" * 100, b"b" * 100, b"c" * 40
    assert gso_batches([a, b, c, a]) == [(a + b + c, 100), (a, 0)]
    assert gso_batches([c, a]) == [(c, 0), (a, 0)]  # a larger one cannot follow
    assert gso_batches([a] * 5, max_segments=2) == [(a * 2, 100), (a * 2, 100), (a, 0)]
    assert gso_batches([a] * 5, max_bytes=300) == [(a * 3, 100), (a * 2, 100)]
    assert gso_batches([]) == []


@given(st.lists(st.integers(min_value=1, max_value=1500), max_size=200))
def test_gso_batches_split_back(sizes: list[int]) -> None:
    datagrams = [bytes([i & 0xFF]) * size for i, size in enumerate(sizes)]
    batches = gso_batches(datagrams)
    assert [d for buf, size in batches for d in split_gro(buf, size)] == datagrams
    for buf, size in batches:
        assert len(buf) <= gso.UDP_MAX_PAYLOAD
        assert size == 0 or len(buf) <= size * gso.UDP_MAX_SEGMENTS


@pytest.mark.skipif(_segment is None, reason="uspan.daemon._segment was not built")
@given(sizes=st.lists(st.sampled_from([1, 40, 99, 100, 1440, 1441]), max_size=80),
       max_bytes=st.sampled_from([1, 100, 300, 1440 * 3, gso.UDP_MAX_PAYLOAD]),
       max_segments=st.integers(min_value=1, max_value=70), bytearrays=st.booleans())
def test_compiled_batches_are_the_python_ones(sizes: list[int], max_bytes: int,
                                              max_segments: int, bytearrays: bool) -> None:
    """``_segment.batches`` makes the same buffers as gso_batches' Python loop."""
    assert _segment is not None
    datagrams = [bytes([i & 0xFF]) * size for i, size in enumerate(sizes)]
    saved, gso._segment = gso._segment, None
    try:
        expected = gso_batches(datagrams, max_bytes, max_segments)
    finally:
        gso._segment = saved
    given_ = [bytearray(d) for d in datagrams] if bytearrays else datagrams
    assert _segment.batches(given_, max_bytes, max_segments) == expected


@pytest.mark.skipif(_segment is None, reason="uspan.daemon._segment was not built")
@given(length=st.integers(min_value=0, max_value=5000),
       gso_size=st.sampled_from([-1, 0, 1, 7, 1440, 4999, 5000, 5001]),
       kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_compiled_split_gro_is_the_python_one(length: int, gso_size: int,
                                             kind: type) -> None:
    """``_segment.split_gro`` cuts as gso.split_gro's slices do, into bytes."""
    assert _segment is not None
    data = bytes(i & 0xFF for i in range(length))
    saved, gso._segment = gso._segment, None
    try:
        expected = split_gro(data, gso_size)
    finally:
        gso._segment = saved
    got = _segment.split_gro(kind(data), gso_size)
    assert got == expected and all(type(piece) is bytes for piece in got)


def test_uso_keeps_datagram_boundaries_when_mtu_is_stale() -> None:
    """UDP datagrams are the sender's: never re-cut, even if our MTU is out of date."""
    payload = os.urandom(1200 * 3)
    datagrams = gso.segment(*uso(payload, 1200), mtu=1000)
    assert [len(d) - 28 for d in datagrams] == [1200, 1200, 1200]
    assert b"".join(d[28:] for d in datagrams) == payload


def ipv4_reserved_flag(packet: bytes) -> bytes:
    """The packet with the IPv4 reserved flag (0x8000 of the fragment word) set, its
    header checksum made valid again."""
    out = bytearray(packet)
    out[6] |= 0x80
    out[10:12] = b"\0\0"
    out[10:12] = (0xFFFF - sum(int.from_bytes(out[i:i + 2], "big") for i in range(0, 20, 2))
                  % 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def test_coalesce_refuses_the_ipv4_reserved_flag() -> None:
    """The kernel merges no packet whose fragment word has a bit set other than DF."""
    parts = [ipv4_reserved_flag(part) for part in stream(3, 1000)]
    assert all(gso.l4_checksum_ok(part) for part in parts)
    assert coalesce(parts) == unmerged(parts)
