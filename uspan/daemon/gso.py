"""Software segmentation offload: the pure half of the offload data path (no system calls).

With ``IFF_VNET_HDR`` every TUN read starts with a 10-byte ``virtio_net_hdr`` and may
carry a TCP (TSO) or UDP (USO) super-segment of up to 64 KiB; ``segment`` splits it into
packets that fit the MTU, with every header and checksum right, and raises OffloadError
(nothing else) for whatever is malformed. ``coalesce`` does the reverse for packets going
into the TUN, following the kernel's GRO rules, so a batch of decrypted TCP segments
becomes one write. ``gso_batches`` groups datagrams for one ``UDP_SEGMENT`` send and
``split_gro`` cuts a ``UDP_GRO`` receive apart. ``offload`` holds the system calls.

Checksums: the ones' complement sum of 16-bit words equals the buffer read as one big
integer modulo 0xFFFF (2**16 is 1 modulo 0xFFFF), so ``int.from_bytes(b, "little") %
0xFFFF`` sums one buffer in C. Little-endian words give the byte-swapped sum, and a
byte-swapped sum written little-endian is the big-endian checksum, so no swap is needed.
Sums of parts that start at even offsets simply add up. Many equal-length rows (the
segments of a super-segment, a batch of same-size packets) are summed at once with
numpy: 0.25 us per 1368-byte segment against 2.05 us for ``from_bytes`` and ``%``
(development VM, Python 3.11; ``sum(array('H'))`` is 10x slower still).

Per-packet work is done per batch where it can be: ``segment`` checks a super-segment in
Python, then builds its segments in C (the library ``uspan/csrc/segment.c`` through its
binding ``_segment``: header, payload chunk and checksums per segment, the GIL released),
or, where that extension was not built, as numpy columns with the same bytes
(``_split_numpy``). ``coalesce`` runs in C too
(``_segment.coalesce``: flows, checksum checks, the merge and the copies, the GIL
released), else in Python with a stretch of equal-length segments of one flow checked as
numpy rows (``_coalesce_python``), the same decisions and bytes. A line of Python per
packet costs ~0.1 us, a numpy call ~1 us once per super-segment (issue 11: 30.7k -> 18.6k
and 35.6k -> 18.7k instructions per packet; the C splitter: 17.4k -> 2.5k, 1.85 -> 0.21
us; the C merge: see bench/RESULTS.md "GRO merge in C").

Write a ``(vnet_hdr, packet)`` pair to the TUN with one ``os.writev``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple, TypeGuard

import numpy as np

try:
    from uspan.daemon import _segment
except ImportError:  # built without a compiler: the numpy columns below
    _segment = None  # type: ignore[assignment]
COMPILED = _segment is not None  # split and merge in C (the tests patch _segment)

# --- virtio_net_hdr (include/uapi/linux/virtio_net.h), native byte order ---------------

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UDP fragmentation offload (UFO): never enabled, refused by ``segment``
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # UDP segmentation offload (USO)
GSO_ECN = 0x80  # flag on gso_type: the TCP super-segment carries CWR

_VNET = struct.Struct("=BBHHHH")
VNET_NONE = bytes(VNET_HDR_LEN)  # GSO_NONE, flags 0: the kernel checks every checksum

# The kernel refuses more datagrams per UDP_SEGMENT send, and (since Linux 6.11) per USO
# write to a TUN; _segment.c's UDP_MAX_SEGMENTS (the tests check they agree).
UDP_MAX_SEGMENTS = 64
UDP_MAX_PAYLOAD = 65535 - 20 - 8  # the largest UDP payload over IPv4

_PROTO_TCP = 6
_PROTO_UDP = 17
_TCP_FIN = 0x01
_TCP_PSH = 0x08
_TCP_ACK = 0x10
_TCP_CWR = 0x80
_IPV4_DF = 0x40
_IPV4_NOT_DF = 0xBFFF  # the reserved and more-fragments flags, the fragment offset
_MAX_IP_PACKET = 65535
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class OffloadError(ValueError):
    """A virtio_net_hdr, super-segment or control message is malformed or unsupported."""


class VirtioNetHdr(NamedTuple):
    """The header the TUN puts before (and expects before) every packet."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return _VNET.pack(*self)


def parse_vnet_hdr(data: bytes | bytearray | memoryview) -> VirtioNetHdr:
    """Parse the first 10 bytes of ``data`` as a virtio_net_hdr."""
    if len(data) < VNET_HDR_LEN:
        raise OffloadError(f"virtio_net_hdr: {len(data)} bytes, need {VNET_HDR_LEN}")
    return VirtioNetHdr._make(_VNET.unpack_from(data))


# --- checksums --------------------------------------------------------------------------


def _fold(total: int) -> int:
    """A sum of little-endian 16-bit words folded to 16 bits (0 only for a zero sum)."""
    folded = total % 0xFFFF
    return folded if folded or not total else 0xFFFF


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def _row_sums(data: bytes | bytearray | memoryview, width: int, rows: int,
              skip: int = 0) -> list[int]:
    """Little-endian 16-bit word sums of ``rows`` consecutive ``width``-byte rows of
    ``data``, each from byte ``skip`` on (``width`` and ``skip`` even)."""
    words = np.frombuffer(data, dtype="<u2", count=rows * width // 2).reshape(rows, -1)
    if skip:
        words = words[:, skip // 2 :]
    sums: list[int] = words.sum(axis=1, dtype=np.uint64).tolist()
    return sums


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The RFC 1071 Internet checksum of ``data``, as the big-endian value of the field."""
    return _swap16(0xFFFF - _fold(int.from_bytes(data, "little")))


def _pseudo_sum(packet: bytes | bytearray | memoryview, v6: bool, proto: int,
                l4_len: int) -> int:
    """The little-endian word sum of the TCP/UDP pseudo-header of an IP packet."""
    addresses = packet[8:40] if v6 else packet[12:20]
    return int.from_bytes(addresses, "little") + (proto << 8) + _swap16(l4_len)


def l4_checksum_ok(packet: bytes | bytearray | memoryview) -> bool:
    """Whether the TCP or UDP checksum of an unfragmented IPv4/IPv6 packet verifies.

    IPv6 extension headers are not followed (False); an IPv4 UDP checksum of zero means
    "none" and does not verify either.
    """
    if len(packet) < 20:
        return False
    v6 = packet[0] >> 4 == 6
    ip_len = 40 if v6 else (packet[0] & 0x0F) * 4
    proto = packet[6] if v6 else packet[9]
    if proto not in (_PROTO_TCP, _PROTO_UDP) or len(packet) < ip_len + 8:
        return False
    if not v6 and proto == _PROTO_UDP and packet[ip_len + 6 : ip_len + 8] == b"\0\0":
        return False
    total = _pseudo_sum(packet, v6, proto, len(packet) - ip_len)
    total += int.from_bytes(packet[ip_len:], "little")
    return total % 0xFFFF == 0


def complete_checksum(packet: bytes | bytearray | memoryview, csum_start: int,
                      csum_offset: int) -> bytes:
    """Finish a CHECKSUM_PARTIAL packet: sum from ``csum_start`` into the field.

    The field holds the pseudo-header sum already; a result of zero is written as
    0xFFFF, as the kernel does (required for UDP, equivalent for TCP).
    """
    at = csum_start + csum_offset
    if csum_offset < 0 or at + 2 > len(packet):
        raise OffloadError(
            f"virtio_net_hdr csum_start {csum_start} + csum_offset {csum_offset}: "
            f"beyond the {len(packet)}-byte packet"
        )
    out = bytearray(packet)
    value = 0xFFFF - _fold(int.from_bytes(memoryview(out)[csum_start:], "little"))
    out[at : at + 2] = (value or 0xFFFF).to_bytes(2, "little")
    return bytes(out)


# --- splitting what the TUN hands us ----------------------------------------------------


def segment(vnet: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview,
            mtu: int) -> list[bytes]:
    """Turn one TUN read (header and packet) into packets of at most ``mtu`` bytes.

    GSO_NONE packets are returned whole, with a partial checksum completed if the header
    asks for it. TCP and UDP super-segments are cut into ``gso_size`` payload chunks
    (TCP ones smaller if ``mtu`` demands it; a UDP datagram is never re-cut), each with
    its own lengths, IPv4 ID and header checksum, TCP sequence number and flags, and full
    TCP/UDP checksum.
    """
    hdr = parse_vnet_hdr(vnet)
    gso_type = hdr.gso_type & ~GSO_ECN
    if gso_type == GSO_NONE:
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [complete_checksum(packet, hdr.csum_start, hdr.csum_offset)]
        return [bytes(packet)]
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        return _split(hdr, memoryview(packet), mtu, gso_type == GSO_TCPV6, _PROTO_TCP)
    if gso_type == GSO_UDP_L4:
        v6 = len(packet) > 0 and packet[0] >> 4 == 6
        return _split(hdr, memoryview(packet), mtu, v6, _PROTO_UDP)
    raise OffloadError(f"virtio_net_hdr gso_type {hdr.gso_type:#x}: not supported")


def _ip_header_len(hdr: VirtioNetHdr, packet: memoryview, v6: bool) -> int:
    """The IP header length of a super-segment, checked against the packet itself."""
    if len(packet) < (40 if v6 else 20) or packet[0] >> 4 != (6 if v6 else 4):
        raise OffloadError(
            f"super-segment of gso_type {hdr.gso_type:#x}: not an IPv{6 if v6 else 4} packet"
        )
    if v6:
        ip_len = hdr.csum_start if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM else 40
        if ip_len < 40:
            raise OffloadError(f"virtio_net_hdr csum_start {ip_len}: inside the IPv6 header")
        return ip_len
    ip_len = (packet[0] & 0x0F) * 4
    if ip_len < 20 or (hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and hdr.csum_start != ip_len):
        raise OffloadError(
            f"virtio_net_hdr csum_start {hdr.csum_start}: IPv4 header is {ip_len} bytes"
        )
    return ip_len


def _split(hdr: VirtioNetHdr, packet: memoryview, mtu: int, v6: bool,
           proto: int) -> list[bytes]:
    ip_len = _ip_header_len(hdr, packet, v6)
    if not v6 and packet[9] != proto:
        raise OffloadError(f"IPv4 protocol {packet[9]}: gso_type {hdr.gso_type:#x} needs {proto}")
    tcp = proto == _PROTO_TCP
    # The transport header length comes from the packet: the kernel's hdr_len may cover
    # the whole first segment on the forwarding path.
    l4_hdr_len = (packet[ip_len + 12] >> 4) * 4 if tcp and len(packet) > ip_len + 12 else 8
    hdr_len = ip_len + l4_hdr_len
    if (tcp and l4_hdr_len < 20) or hdr_len > len(packet):
        raise OffloadError(
            f"super-segment of {len(packet)} bytes: transport header of {l4_hdr_len} bytes "
            f"at {ip_len} does not fit"
        )
    # TCP may be cut finer if the MTU shrank; UDP datagram boundaries belong to the sender.
    step = min(hdr.gso_size, mtu - hdr_len) if tcp else hdr.gso_size
    if step <= 0:
        raise OffloadError(
            f"virtio_net_hdr gso_size {hdr.gso_size} with mtu {mtu} and {hdr_len} header "
            "bytes: no room for payload"
        )
    if _segment is not None and len(packet) <= _MAX_IP_PACKET:
        return _segment.split(packet, ip_len, hdr_len, step, v6, tcp)
    return _split_numpy(packet, ip_len, hdr_len, step, v6, tcp)


def _split_numpy(packet: memoryview, ip_len: int, hdr_len: int, step: int, v6: bool,
                 tcp: bool) -> list[bytes]:
    """``_segment.split`` in numpy: the segments of a super-segment ``_split`` checked."""
    proto = _PROTO_TCP if tcp else _PROTO_UDP
    seq, flags = (_U32.unpack_from(packet, ip_len + 4)[0], packet[ip_len + 13]) if tcp else (0, 0)
    ip_id = _U16.unpack_from(packet, 4)[0]
    # Sums of the headers with every per-segment field zeroed; each segment adds its own
    # fields (a big-endian 16-bit field v adds _swap16(v) to a little-endian word sum).
    template = bytearray(packet[:hdr_len])
    check_at = ip_len + (16 if tcp else 6)
    template[check_at : check_at + 2] = b"\0\0"
    if v6:
        template[4:6] = b"\0\0"
        ip_base = 0
    else:
        template[2:6] = b"\0\0\0\0"
        template[10:12] = b"\0\0"
        ip_base = int.from_bytes(template[:ip_len], "little")
    if tcp:
        template[ip_len + 4 : ip_len + 8] = b"\0\0\0\0"
        template[ip_len + 13] = 0
    else:
        template[ip_len + 4 : ip_len + 6] = b"\0\0"
    l4_base = (int.from_bytes(packet[8:40] if v6 else packet[12:20], "little") + (proto << 8)
               + int.from_bytes(template[ip_len:], "little"))
    payload = packet[hdr_len:]
    size = len(payload)
    full = size // step
    if step % 2 == 0 and full > 1:
        chunk_sums = _row_sums(payload, step, full)
    else:
        chunk_sums = [_fold(int.from_bytes(payload[i * step : (i + 1) * step], "little"))
                      for i in range(full)]
    tail = size % step or not size  # a last, shorter segment (or the only, empty one)
    if tail:
        chunk_sums.append(_fold(int.from_bytes(payload[full * step :], "little")))
    # Every segment's varying fields at once, as numpy columns (one row per segment):
    # numpy's per-call cost is paid per super-segment, not per packet.
    count = len(chunk_sums)
    index = np.arange(count, dtype=np.uint64)
    totals = np.full(count, hdr_len + step, dtype=np.uint64)
    totals[-1] = hdr_len + size - (count - 1) * step
    l4_lens = totals - ip_len
    headers = np.tile(np.frombuffer(template, dtype=np.uint8), (count, 1))
    if v6:
        _put_be16(headers, 4, totals - 40)
    else:
        ids = (index + ip_id) & 0xFFFF
        _put_be16(headers, 2, totals)
        _put_be16(headers, 4, ids)
        ip_sums = _swap_array(totals) + _swap_array(ids) + _fold(ip_base)
        _put_le16(headers, 10, 0xFFFF - _fold_array(ip_sums))
    l4_sums = np.asarray(chunk_sums, dtype=np.uint64) + _swap_array(l4_lens) + _fold(l4_base)
    if tcp:
        seqs = (index * step + seq) & 0xFFFFFFFF
        seg_flags = np.full(count, flags & ~(_TCP_FIN | _TCP_PSH), dtype=np.uint64)
        seg_flags[-1] = flags
        seg_flags[1:] &= ~_TCP_CWR & 0xFF
        _put_be16(headers, ip_len + 4, seqs >> 16)
        _put_be16(headers, ip_len + 6, seqs & 0xFFFF)
        headers[:, ip_len + 13] = seg_flags
        l4_sums += _swap_array(seqs >> 16) + _swap_array(seqs & 0xFFFF) + (seg_flags << 8)
        values = 0xFFFF - _fold_array(l4_sums)
    else:
        _put_be16(headers, ip_len + 4, l4_lens)
        l4_sums += _swap_array(l4_lens)
        values = 0xFFFF - _fold_array(l4_sums)
        values[values == 0] = 0xFFFF
    _put_le16(headers, check_at, values)
    out: list[bytes] = []
    if full:
        width = hdr_len + step
        rows = np.empty((full, width), dtype=np.uint8)
        rows[:, :hdr_len] = headers[:full]
        rows[:, hdr_len:] = np.frombuffer(payload, dtype=np.uint8,
                                          count=full * step).reshape(full, step)
        blob = rows.tobytes()
        out = [blob[at : at + width] for at in range(0, full * width, width)]
    if tail:
        out.append(b"".join((headers[-1].tobytes(), payload[full * step :])))
    return out


def _swap_array(values: np.ndarray) -> np.ndarray:
    """``_swap16`` of a column of 16-bit values."""
    return ((values & 0xFF) << 8) | (values >> 8)


def _fold_array(totals: np.ndarray) -> np.ndarray:
    """``_fold`` of a column of word sums, none of them zero (each has a header's sum)."""
    return (totals - 1) % 0xFFFF + 1


def _put_be16(rows: np.ndarray, at: int, values: np.ndarray) -> None:
    """Write a column of 16-bit values big-endian at byte ``at`` of each row."""
    rows[:, at] = values >> 8
    rows[:, at + 1] = values & 0xFF


def _put_le16(rows: np.ndarray, at: int, values: np.ndarray) -> None:
    """Write a column of checksums summed as little-endian words (see the module doc)."""
    rows[:, at] = values & 0xFF
    rows[:, at + 1] = values >> 8


# --- coalescing what goes into the TUN ---------------------------------------------------


class _Run:
    """Consecutive segments of one flow being merged into a super-segment."""

    __slots__ = ("count", "ended", "fixed_id", "gso_size", "hdr_len", "head",
                 "ip_len", "next_seq", "parts", "proto", "psh", "size", "v6", "verified")

    def __init__(self, packet: bytes, v6: bool, proto: int, ip_len: int, hdr_len: int,
                 payload: int) -> None:
        self.head = packet
        self.v6 = v6
        self.proto = proto
        self.ip_len = ip_len
        self.hdr_len = hdr_len
        self.gso_size = payload
        self.size = len(packet)
        self.count = 1
        self.parts = [memoryview(packet)[hdr_len:]]
        self.verified = False
        self.ended = False
        self.fixed_id: bool | None = None  # IPv4: DF with one ID, or IDs incrementing
        self.psh = False
        self.next_seq = 0
        if proto == _PROTO_TCP:
            self.next_seq = (_U32.unpack_from(packet, ip_len + 4)[0] + payload) & 0xFFFFFFFF
            self.psh = bool(packet[ip_len + 13] & _TCP_PSH)
            self.ended = self.psh

    def accepts(self, packet: bytes, payload: int) -> bool:
        """Whether ``packet`` (same flow, same header lengths) may be appended."""
        head, ip_len = self.head, self.ip_len
        if (self.ended or payload > self.gso_size
                or self.size + payload > _MAX_IP_PACKET):
            return False
        if self.v6:
            if head[:4] != packet[:4] or head[7] != packet[7]:  # class, flow label, hops
                return False
        else:
            if head[1] != packet[1] or head[8] != packet[8] or head[6] >> 5 != packet[6] >> 5:
                return False  # TOS, TTL, DF
            head_id, ip_id = _U16.unpack_from(head, 4)[0], _U16.unpack_from(packet, 4)[0]
            fixed = bool(head[6] & _IPV4_DF) and ip_id == head_id
            if not fixed and ip_id != (head_id + self.count) & 0xFFFF:
                return False
            if self.fixed_id is not None and fixed != self.fixed_id:
                return False
        if self.proto == _PROTO_TCP:  # ack, data offset and reserved bits, window, options
            return (
                _U32.unpack_from(packet, ip_len + 4)[0] == self.next_seq
                and packet[ip_len + 8 : ip_len + 13] == head[ip_len + 8 : ip_len + 13]
                and packet[ip_len + 14 : ip_len + 16] == head[ip_len + 14 : ip_len + 16]
                and packet[ip_len + 20 : self.hdr_len] == head[ip_len + 20 : self.hdr_len]
            )
        return self.count < UDP_MAX_SEGMENTS

    def append(self, packet: bytes, payload: int) -> None:
        if not self.v6:
            self.fixed_id = _U16.unpack_from(packet, 4)[0] == _U16.unpack_from(self.head, 4)[0]
        self.parts.append(memoryview(packet)[self.hdr_len :])
        self.size += payload
        self.count += 1
        if payload < self.gso_size:
            self.ended = True
        if self.proto == _PROTO_TCP:
            self.next_seq = (self.next_seq + payload) & 0xFFFFFFFF
            if packet[self.ip_len + 13] & _TCP_PSH:
                self.psh = self.ended = True

    def build(self) -> tuple[bytes, bytes]:
        """The (virtio_net_hdr, packet) to write: a GSO super-segment once merged."""
        if self.count == 1:
            return VNET_NONE, self.head
        ip_len, hdr_len, tcp = self.ip_len, self.hdr_len, self.proto == _PROTO_TCP
        out = bytearray(self.head[:hdr_len])
        out += b"".join(self.parts)
        l4_len = len(out) - ip_len
        if self.v6:
            _U16.pack_into(out, 4, l4_len)
        else:
            _U16.pack_into(out, 2, len(out))
            out[10:12] = b"\0\0"
            value = 0xFFFF - _fold(int.from_bytes(memoryview(out)[:ip_len], "little"))
            out[10:12] = value.to_bytes(2, "little")
        if tcp:
            if self.psh:
                out[ip_len + 13] |= _TCP_PSH
            check_at, gso_type = ip_len + 16, GSO_TCPV6 if self.v6 else GSO_TCPV4
        else:
            _U16.pack_into(out, ip_len + 4, l4_len)
            check_at, gso_type = ip_len + 6, GSO_UDP_L4
        # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not inverted.
        partial = _fold(_pseudo_sum(out, self.v6, self.proto, l4_len))
        out[check_at : check_at + 2] = partial.to_bytes(2, "little")
        vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, self.gso_size,
                          ip_len, check_at - ip_len)
        return vnet, bytes(out)


_Flow = tuple[bytes, bool, int, int, int, int]


def _flow(packet: bytes, udp: bool) -> _Flow | None:
    """(flow key, v6, proto, ip header len, header len, payload len) of a GRO candidate.

    Also returns the flow of TCP/UDP packets that cannot merge (payload length -1), so
    they end their flow's run and keep their place in it.
    """
    size = len(packet)
    if size < 28:
        return None
    version = packet[0] >> 4
    if version == 4:
        proto = packet[9]
        ip_len = (packet[0] & 0x0F) * 4
        addresses = packet[12:20]
        # The header checksum too: merging rewrites it, and the kernel drops a packet
        # whose header does not verify.
        simple = (ip_len == 20 and _U16.unpack_from(packet, 2)[0] == size
                  and not _U16.unpack_from(packet, 6)[0] & _IPV4_NOT_DF
                  and int.from_bytes(packet[:20], "little") % 0xFFFF == 0)
    elif version == 6 and size >= 48:
        proto = packet[6]
        ip_len = 40
        addresses = packet[8:40]
        simple = _U16.unpack_from(packet, 4)[0] == size - 40
    else:
        return None
    if proto == _PROTO_TCP:
        if size < ip_len + 20:
            return None
        hdr_len = ip_len + (packet[ip_len + 12] >> 4) * 4
        mergeable = (packet[ip_len + 13] in (_TCP_ACK, _TCP_ACK | _TCP_PSH)
                     and ip_len + 20 <= hdr_len < size)
    elif proto == _PROTO_UDP:
        hdr_len = ip_len + 8
        # A zero checksum field: "none" over IPv4, invalid over IPv6; neither merges.
        mergeable = (udp and hdr_len < size
                     and _U16.unpack_from(packet, ip_len + 4)[0] == size - ip_len
                     and packet[ip_len + 6 : ip_len + 8] != b"\0\0")
    else:
        return None
    key = b"".join((addresses, packet[ip_len : ip_len + 4], bytes((proto,))))
    payload = size - hdr_len if simple and mergeable else -1
    return key, version == 6, proto, ip_len, hdr_len, payload


def _checksums_ok(packets: list[bytes], flows: list[_Flow | None]) -> list[bool]:
    """Whether each mergeable packet's TCP/UDP checksum verifies (others: False).

    Packets of equal length and IP header length are summed together (numpy).
    """
    ok = [False] * len(packets)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, flow in enumerate(flows):
        if flow is not None and flow[5] >= 0:
            groups.setdefault((len(packets[index]), flow[3]), []).append(index)
    for (length, ip_len), members in groups.items():
        if length % 2 or len(members) == 1:
            for index in members:
                ok[index] = l4_checksum_ok(packets[index])
            continue
        joined = b"".join([packets[index] for index in members])
        sums = _row_sums(joined, length, len(members), ip_len)
        pseudo: dict[bytes, int] = {}  # by flow: the same addresses, protocol and length
        for index, total in zip(members, sums, strict=True):
            key, v6, proto, *_ = flows[index]  # type: ignore[misc]
            flow_sum = pseudo.get(key)
            if flow_sum is None:
                flow_sum = pseudo[key] = _pseudo_sum(packets[index], v6, proto, length - ip_len)
            ok[index] = (total + flow_sum) % 0xFFFF == 0
    return ok


def coalesce(packets: Sequence[bytes], *, udp: bool = False) -> list[tuple[bytes, bytes]]:
    """Merge consecutive segments of each flow into GSO super-segments for the TUN.

    TCP segments merge when the kernel's GRO would merge them: same addresses, ports,
    ACK, header length, reserved bits, window and options, IP TOS/TTL/DF (IPv6 class,
    flow label, hop limit), IPv4 IDs incrementing (or fixed under DF), contiguous
    sequence numbers, only ACK or ACK|PSH (PSH ends a run), equal payload sizes except a
    shorter last one, at most 64 KiB. With ``udp`` (only if the TUN accepted USO) UDP
    datagrams merge likewise, at most ``UDP_MAX_SEGMENTS`` in one (the kernel refuses a
    larger USO write), never with a zero checksum field. Each segment's TCP/UDP checksum
    and IPv4 header checksum are verified before it is merged (the merge rewrites both);
    segments that are not merged get a GSO_NONE header with no flags, so the kernel
    verifies them itself.
    Order within a flow is kept. Returns the (virtio_net_hdr, packet) pairs to write.

    In C (``_segment.coalesce``, the GIL released for checksums and copies) where it was
    built, else ``_coalesce_python``: the same decisions and bytes.
    """
    if _segment is not None:
        return _segment.coalesce(packets, udp)
    return _coalesce_python(packets, udp)


def _coalesce_python(packets: Sequence[bytes], udp: bool) -> list[tuple[bytes, bytes]]:
    """``coalesce`` in Python, a stretch of one flow's equal segments as numpy rows."""
    order: list[_Run | bytes] = []
    runs: dict[bytes, _Run] = {}
    packets = [bytes(packet) for packet in packets]
    lengths = [len(packet) for packet in packets]
    start, end = 0, len(packets)
    while start < end:
        # A stretch of equal-length packets with the same addresses and ports (IPv4
        # without options, IPv6): checked at once if it is one TCP run (the common case: a
        # stream's full-size segments), else merged one packet at a time.
        first = packets[start]
        length, stop = lengths[start], start + 1
        at, until = (8, 44) if first and first[0] >> 4 == 6 else (12, 24)
        addresses = first[at:until]
        while (stop < end and lengths[stop] == length
               and packets[stop][at:until] == addresses):
            stop += 1
        flow = _flow(packets[start], udp) if stop - start >= _UNIFORM_MIN else None
        fit = (_MAX_IP_PACKET - flow[4]) // flow[5] if flow is not None and flow[5] > 0 else 0
        if (fit >= 2 and flow is not None and flow[2] == _PROTO_TCP
                and not _joins(runs.get(flow[0]), packets[start], flow)):
            stop = min(stop, start + fit)
            run = _uniform_run(packets[start:stop], flow)
            if run is not None:
                runs[flow[0]] = run
                order.append(run)
                start = stop
                continue
        _merge_each(packets[start:stop], udp, runs, order)
        start = stop
    return [(VNET_NONE, item) if isinstance(item, bytes) else item.build() for item in order]


def _joins(run: _Run | None, packet: bytes, flow: _Flow) -> TypeGuard[_Run]:
    """Whether ``packet`` (a mergeable one of ``flow``) may join the open ``run``."""
    _, _, proto, _, hdr_len, payload = flow
    return (run is not None and run.verified and run.proto == proto
            and run.hdr_len == hdr_len and run.accepts(packet, payload))


def _merge_each(packets: list[bytes], udp: bool, runs: dict[bytes, _Run],
                order: list[_Run | bytes]) -> None:
    """Add packets one at a time to the runs of their flows (``coalesce``'s rules)."""
    flows = [_flow(packet, udp) for packet in packets]
    valid = _checksums_ok(packets, flows)
    for packet, flow, ok in zip(packets, flows, valid, strict=True):
        if flow is None:
            order.append(packet)
            continue
        key, v6, proto, ip_len, hdr_len, payload = flow
        run = runs.get(key)
        if payload < 0:
            runs.pop(key, None)
            order.append(packet)
            continue
        if _joins(run, packet, flow):
            if ok:
                run.append(packet, payload)
            else:  # pass it through alone; nothing after it can follow the run
                del runs[key]
                order.append(packet)
            continue
        run = _Run(packet, v6, proto, ip_len, hdr_len, payload)
        run.verified = ok
        runs[key] = run
        order.append(run)


_UNIFORM_MIN = 4  # equal-length packets worth checking together
_BE32 = np.array([1 << 24, 1 << 16, 1 << 8, 1], dtype=np.uint64)


def _uniform_run(packets: list[bytes], flow: _Flow) -> _Run | None:
    """Equal-length TCP segments that all merge into one run, checked as numpy rows.

    The same rules as ``_Run.accepts`` and the same checksum verification, for all rows
    at once: headers equal to the first but for IPv4 ID and header checksum (which must
    verify) and TCP sequence number, flags and checksum; sequence numbers contiguous;
    IPv4 IDs incrementing or fixed under DF; flags ACK (the last may add PSH). None if
    any row breaks a rule: the caller then merges them one by one.
    """
    _, v6, proto, ip_len, hdr_len, payload = flow
    count, length = len(packets), len(packets[0])
    if length % 2 or count < 2:
        return None
    joined = b"".join(packets)
    rows = np.frombuffer(joined, dtype=np.uint8).reshape(count, length)
    same = _same_columns(ip_len, hdr_len, v6)
    if not (rows[:, :hdr_len][:, same] == rows[0, :hdr_len][same]).all():
        return None
    flags = rows[:, ip_len + 13]
    if not ((flags[:-1] == _TCP_ACK).all() and flags[-1] in (_TCP_ACK, _TCP_ACK | _TCP_PSH)):
        return None
    steps = np.arange(count, dtype=np.uint64)
    seqs = rows[:, ip_len + 4 : ip_len + 8].astype(np.uint64) @ _BE32
    if not ((seqs - seqs[0]) & 0xFFFFFFFF == steps * payload).all():
        return None
    words = np.frombuffer(joined, dtype="<u2").reshape(count, length // 2)
    fixed_id = False
    if not v6:
        if (words[:, :10].sum(axis=1, dtype=np.uint64) % 0xFFFF).any():
            return None  # an IPv4 header checksum does not verify
        ids = rows[:, 4].astype(np.uint64) * 256 + rows[:, 5]
        fixed_id = bool(rows[0, 6] & _IPV4_DF) and bool((ids == ids[0]).all())
        if not fixed_id and not ((ids - ids[0]) & 0xFFFF == steps).all():
            return None
    sums = words[:, ip_len // 2 :].sum(axis=1, dtype=np.uint64)
    if ((sums + _fold(_pseudo_sum(packets[0], v6, proto, length - ip_len))) % 0xFFFF).any():
        return None
    run = _Run(packets[0], v6, proto, ip_len, hdr_len, payload)
    run.verified = True
    run.parts = [memoryview(rows[:, hdr_len:].tobytes())]
    run.count = count
    run.size += (count - 1) * payload
    run.next_seq = (int(seqs[0]) + count * payload) & 0xFFFFFFFF
    run.fixed_id = None if v6 else fixed_id
    run.psh = run.ended = bool(flags[-1] & _TCP_PSH)
    return run


_SAME_COLUMNS: dict[tuple[int, int, bool], np.ndarray] = {}


def _same_columns(ip_len: int, hdr_len: int, v6: bool) -> np.ndarray:
    """Which header bytes must equal the run's head (a boolean mask, cached)."""
    mask = _SAME_COLUMNS.get((ip_len, hdr_len, v6))
    if mask is None:
        mask = np.ones(hdr_len, dtype=bool)
        if not v6:
            mask[[4, 5, 10, 11]] = False  # ID, header checksum
        tcp = ip_len + np.array([4, 5, 6, 7, 13, 16, 17])  # seq, flags, check
        mask[tcp] = False
        mask = _SAME_COLUMNS.setdefault((ip_len, hdr_len, v6), mask)
    return mask


# --- UDP_SEGMENT and UDP_GRO buffers ----------------------------------------------------


def gso_batches(datagrams: Sequence[bytes], max_bytes: int = UDP_MAX_PAYLOAD,
                max_segments: int = UDP_MAX_SEGMENTS) -> list[tuple[bytes, int]]:
    """Group datagrams for one destination into UDP_SEGMENT sends, keeping their order.

    Returns (buffer, segment size) pairs; a size of 0 means a single datagram to send
    without the control message. A batch has at most ``max_segments`` datagrams and
    ``max_bytes`` bytes; all are as long as its first except a shorter last one. In C
    (``_segment.batches``) where it was built.
    """
    if _segment is not None:
        return _segment.batches(datagrams, max_bytes, max_segments)
    out: list[tuple[bytes, int]] = []
    batch: list[bytes] = []
    size = total = 0
    for datagram in datagrams:
        length = len(datagram)
        if (batch and length <= size and len(batch) < max_segments
                and total + length <= max_bytes and len(batch[-1]) == size):
            batch.append(datagram)
            total += length
            continue
        if batch:
            out.append((b"".join(batch), size) if len(batch) > 1 else (batch[0], 0))
        batch, size, total = [datagram], length, length
    if batch:
        out.append((b"".join(batch), size) if len(batch) > 1 else (batch[0], 0))
    return out


def split_gro(data: bytes | bytearray | memoryview, gso_size: int) -> list[bytes]:
    """Cut a coalesced receive into its datagrams (``gso_size`` 0: one datagram); in C
    (``_segment.split_gro``) where it was built."""
    if _segment is not None:
        return _segment.split_gro(data, gso_size)
    if gso_size <= 0 or len(data) <= gso_size:
        return [bytes(data)]
    view = memoryview(data)
    return [bytes(view[i : i + gso_size]) for i in range(0, len(view), gso_size)]
