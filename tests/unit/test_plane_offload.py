"""Offloads in the plane thread (uspan/csrc/plane_thread.c, docs/dataplane.md): TSO/USO
super-segments read from a vnet-header "TUN" are cut, sealed and sent with UDP_SEGMENT;
UDP_GRO receives are cut, opened and merged back into super-segments for the TUN. Two
started planes over loopback (tests/unit/planekit: a SOCK_SEQPACKET pair as each TUN);
scripts/sanitize-plane runs these under TSAN and ASAN."""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from tests.unit.planekit import (
    ALL_OFFLOADS,
    INNER4,
    INNER6,
    MTU,
    End,
    _plane,
    address_of,
    tunnel,
)
from tests.unit.test_gso import partial, stream, tcp_packet, tso, udp_packet
from uspan.daemon import gso, offload

A4, B4 = (ipaddress.ip_address(a).packed for a in INNER4)
A6, B6 = (ipaddress.ip_address(a).packed for a in INNER6)
PAYLOAD = bytes(range(256)) * 150  # 38,400 bytes: 28-30 segments at MTU 1420


def _uso(payload: bytes, gso_size: int) -> tuple[bytes, bytes]:
    """A USO super-segment from A to B and its virtio_net_hdr."""
    packet = partial(udp_packet(payload, src=A4, dst=B4))
    header = gso.VirtioNetHdr(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_UDP_L4, 28, gso_size,
                              20, 6)
    return header.pack(), packet


def _wait(end: End, counter: str, value: int) -> dict[str, int]:
    deadline = time.monotonic() + 5
    while (counts := end.plane.counters())[counter] < value and time.monotonic() < deadline:
        time.sleep(0.005)
    return counts


def _received(end: End, size: int) -> list[tuple[gso.VirtioNetHdr, bytes]]:
    """TUN writes (header, packet) until their transport payloads add up to ``size``."""
    writes, got = [], 0
    while got < size:
        data = end.read_tun()
        header, packet = gso.parse_vnet_hdr(data[:10]), data[10:]
        writes.append((header, packet))
        got += len(packet) - _header_length(packet)
    assert got == size
    return writes


def _header_length(packet: bytes) -> int:
    v6 = packet[0] >> 4 == 6
    ip_len = 40 if v6 else (packet[0] & 15) * 4
    proto = packet[6] if v6 else packet[9]
    return ip_len + ((packet[ip_len + 12] >> 4) * 4 if proto == 6 else 8)


def _payload(writes: list[tuple[gso.VirtioNetHdr, bytes]]) -> bytes:
    """The transport payload carried, checking every packet the kernel would make of each
    write: its TCP/UDP checksum verifies."""
    out = b""
    for header, packet in writes:
        for part in gso.segment(header.pack(), packet, 65535):
            assert gso.l4_checksum_ok(part)
            out += part[_header_length(part):]
    return out


@pytest.mark.parametrize("outer", [socket.AF_INET, socket.AF_INET6], ids=["udp4", "udp6"])
@pytest.mark.parametrize("kind", ["tcp4", "tcp6", "udp4"])
def test_a_super_segment_crosses_as_datagrams_and_is_merged_back(kind: str, outer: int) -> None:
    """A TSO/USO read on A: cut into MTU-sized segments, sent with UDP_SEGMENT beside a
    sticky source (IP_PKTINFO / IPV6_PKTINFO), received by B as one UDP_GRO buffer,
    opened and merged into super-segments whose payload is the input's, checksums
    completed."""
    v6 = kind == "tcp6"
    src, dst = (A6, B6) if v6 else (A4, B4)
    if kind == "udp4":
        vnet, packet = _uso(PAYLOAD[:1300 * 20], 1300)
        payload, gso_type = PAYLOAD[:1300 * 20], gso.GSO_UDP_L4
    else:
        vnet, packet = tso(PAYLOAD, MTU - 40 - (40 if v6 else 20), v6=v6, src=src, dst=dst)
        payload, gso_type = PAYLOAD, gso.GSO_TCPV6 if v6 else gso.GSO_TCPV4
    segments = len(gso.segment(vnet, packet, MTU))
    with tunnel(outer, offloads=ALL_OFFLOADS) as (a, b):
        there = b.udp4 if outer == socket.AF_INET else b.udp6
        local = socket.inet_pton(outer, "127.0.0.1" if outer == socket.AF_INET else "::1")
        a.plane.set_endpoint(a.peer, *address_of(there), local=local)
        a.write_tun(vnet + packet)
        writes = _received(b, len(payload))
        a_counts, b_counts = _wait(a, "gso_sends", 1), _wait(b, "opened", segments)
    assert _payload(writes) == payload
    assert any(header.gso_type == gso_type for header, _ in writes)
    assert a_counts["tso_reads"] == 1 and a_counts["sealed"] == segments
    assert a_counts["gso_sends"] == 1 and a_counts["send_errors"] == 0
    assert b_counts["gro_receives"] >= 1 and b_counts["merged_writes"] >= 1
    assert b_counts["opened"] == b_counts["udp_reads"] == segments


def test_udp_is_not_merged_without_uso() -> None:
    """OFFLOAD_TUN_USO off: the datagrams reach the TUN one by one (zero header)."""
    vnet, packet = _uso(PAYLOAD[:1300 * 4], 1300)
    flags = _plane.OFFLOAD_TUN_VNET | _plane.OFFLOAD_UDP_GSO
    with tunnel(offloads=flags) as (a, b):
        a.write_tun(vnet + packet)
        writes = _received(b, 1300 * 4)
    assert [header for header, _ in writes] == [gso.VirtioNetHdr()] * 4
    assert _payload(writes) == PAYLOAD[:1300 * 4]


def test_without_udp_gso_the_segments_go_as_datagrams_alone() -> None:
    """OFFLOAD_TUN_VNET alone: the cut segments leave one datagram each (sendmmsg), and
    the receiving plane, with no UDP_GRO buffer to cut, still carries them all."""
    vnet, packet = tso(PAYLOAD, MTU - 40, src=A4, dst=B4)
    segments = len(gso.segment(vnet, packet, MTU))
    with tunnel(offloads=_plane.OFFLOAD_TUN_VNET) as (a, b):
        a.write_tun(vnet + packet)
        writes = _received(b, len(PAYLOAD))
        a_counts, b_counts = _wait(a, "sealed", segments), _wait(b, "opened", segments)
    assert _payload(writes) == PAYLOAD
    assert a_counts["tso_reads"] == 1 and a_counts["gso_sends"] == 0
    assert a_counts["send_errors"] == 0
    assert b_counts["gro_receives"] == 0 and b_counts["udp_reads"] == segments


def test_a_partial_checksum_is_completed_and_a_lone_packet_written_plainly() -> None:
    """GSO_NONE with NEEDS_CSUM: one packet, its checksum finished before sealing; B
    writes it alone behind a zero virtio_net_hdr (the kernel checks it)."""
    packet = partial(tcp_packet(b"hello", src=A4, dst=B4))
    vnet = gso.VirtioNetHdr(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_NONE, 0, 0, 20, 16)
    with tunnel(offloads=ALL_OFFLOADS) as (a, b):
        a.write_tun(vnet.pack() + packet)
        data = b.read_tun()
    assert data[:10] == bytes(10)
    assert data[10:] == gso.segment(vnet.pack(), packet, MTU)[0]
    assert gso.l4_checksum_ok(data[10:])


def test_a_malformed_virtio_net_hdr_is_dropped_and_counted() -> None:
    vnet, packet = tso(PAYLOAD[:4000], 1380, src=A4, dst=B4)
    bad = [
        vnet[:5],  # shorter than the header
        gso.VirtioNetHdr(1, 0x7F, 40, 1380, 20, 16).pack() + packet,  # unknown gso_type
        gso.VirtioNetHdr(1, gso.GSO_TCPV6, 60, 1380, 40, 16).pack() + packet,  # not IPv6
        gso.VirtioNetHdr(1, gso.GSO_TCPV4, 40, 0, 20, 16).pack() + packet,  # gso_size 0
        gso.VirtioNetHdr(1, gso.GSO_NONE, 0, 0, 20, 5000).pack() + packet,  # csum past end
    ]
    with tunnel(offloads=ALL_OFFLOADS) as (a, b):
        for data in bad:
            a.write_tun(data)
        counts = _wait(a, "bad_inner_packet", len(bad))
        assert b.quiet_tun()
        a.write_tun(vnet + packet)  # the thread goes on
        assert _payload(_received(b, 4000)) == PAYLOAD[:4000]
    assert counts["bad_inner_packet"] == len(bad) and counts["sealed"] == 0


def test_a_gro_receive_with_a_bad_datagram_in_the_middle() -> None:
    """Ten sealed segments sent as one UDP_SEGMENT buffer, the fifth's tag broken: B cuts
    the GRO buffer, counts the one, writes the rest (merged on either side of the hole),
    and the sender's IP_PKTINFO source is seen beside the UDP_GRO size."""
    parts = stream(10, 1300, src=A4, dst=B4)
    with tunnel(offloads=ALL_OFFLOADS) as (a, b):
        a.plane.collect()
        b.plane.collect()
        sealed = a.plane.seal(0x1111, parts)
        broken = bytearray(sealed[4])
        broken[-1] ^= 1
        sealed[4] = bytes(broken)
        assert len({len(s) for s in sealed}) == 1
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sender.bind(("127.0.0.1", 0))
            sender.sendmsg([b"".join(sealed)], [offload.gso_cmsg(len(sealed[0]))], 0,
                           b.udp4.getsockname())
            writes = _received(b, 1300 * 9)
        finally:
            sender.close()
        counts = _wait(b, "opened", 9)
        (record,) = b.plane.collect()[0]
    assert _payload(writes) == b"".join(p[40:] for i, p in enumerate(parts) if i != 4)
    assert counts["gro_receives"] == 1 and counts["udp_reads"] == 10
    assert counts["decrypt_failed"] == 1 and counts["opened"] == 9
    assert counts["merged_writes"] == 2
    roamed = record[9]  # the new source, with the local address from IP_PKTINFO
    assert roamed is not None and roamed[2] == socket.inet_aton("127.0.0.1")


def test_a_path_that_cannot_segment_turns_udp_segment_off() -> None:
    """UDP-Lite sockets refuse UDP_SEGMENT sends with EIO (as a route through xfrm does):
    A's first such send goes out a datagram at a time, and so does everything after."""
    vnet, packet = tso(PAYLOAD, MTU - 40, src=A4, dst=B4)
    segments = len(gso.segment(vnet, packet, MTU))
    lite = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDPLITE)
            for _ in range(2)]
    try:
        with tunnel(offloads=ALL_OFFLOADS) as (a, b):
            for end, sock in zip((a, b), lite, strict=True):
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
                end.plane.set_sockets([sock.fileno()])
            a.plane.set_endpoint(a.peer, *address_of(lite[1]))
            b.plane.set_endpoint(b.peer, *address_of(lite[0]))
            for _ in range(2):
                a.write_tun(vnet + packet)
                assert _payload(_received(b, len(PAYLOAD))) == PAYLOAD
            counts = _wait(a, "sealed", 2 * segments)
            a.plane.set_sockets([])
            b.plane.set_sockets([])
    finally:
        for sock in lite:
            sock.close()
    assert counts["gso_sends"] == 0 and counts["send_errors"] == 0
    assert counts["tso_reads"] == 2


def test_offload_flags_are_checked() -> None:
    with pytest.raises(ValueError):
        _plane.Plane(-1, [], MTU, offloads=_plane.OFFLOAD_TUN_USO)  # USO needs the header
    with pytest.raises(ValueError):
        _plane.Plane(-1, [], MTU, offloads=64)
