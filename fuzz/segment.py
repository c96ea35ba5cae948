"""Segmentation offload (``uspan.daemon._segment`` over ``uspan/csrc/segment.c``) on hostile
TUN reads and received batches. The first input byte picks what the rest becomes:

- 0: a TUN read (virtio_net_hdr, packet, MTU), the packet a TCP/UDP super-segment whose
  header fields the input may leave broken, cut by ``gso.segment`` with the C splitter,
  again with the numpy one, and by ``seg_cut`` (the data plane's send side);
- 1: a valid super-segment cut in C, then the batch of its segments mangled (bytes
  flipped, segments dropped, repeated, swapped, truncated) and merged by
  ``_segment.coalesce`` and by ``gso._coalesce_python``;
- 2: ``_segment.split`` called directly with any lengths and step.

Properties: the two splitters give the same segments or the same ``OffloadError``, and
nothing else escapes; ``seg_cut`` gives those segments or refuses as malformed; the two
merges give the same (virtio_net_hdr, packet) pairs; a direct split raises ``ValueError``
for lengths the packet does not hold, else returns segments that carry the packet's
payload, in order, exactly once.
"""

from __future__ import annotations

import struct
from unittest import mock

import atheris

with atheris.instrument_imports(include=["uspan"]):
    from uspan.daemon import _segment, gso

from fuzz.harness import check, main

_GSO_TYPES = [gso.GSO_NONE, gso.GSO_TCPV4, gso.GSO_TCPV6, gso.GSO_UDP_L4, gso.GSO_UDP,
              gso.GSO_TCPV4 | gso.GSO_ECN, 0x7F]


def _super_segment(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, int, int, bool, bool]:
    """A packet, its IP and full header lengths, v6 and tcp: header bytes from the input,
    the lengths, version, fragment bits and TCP flags made right (so runs can merge)
    unless the input says to leave them; the payload's length from the input and its
    bytes the rest of it, repeated. Call it after everything else is drawn."""
    v6, tcp, fix = fdp.ConsumeBool(), fdp.ConsumeBool(), fdp.ConsumeIntInRange(0, 7) != 0
    ip_len = 40 if v6 else 4 * fdp.ConsumeIntInRange(5, 15)
    l4_len = 4 * fdp.ConsumeIntInRange(5, 15) if tcp else 8
    hdr_len = ip_len + l4_len
    size = fdp.ConsumeIntInRange(0, 65535 - hdr_len)
    headers = bytearray(fdp.ConsumeBytes(hdr_len).ljust(hdr_len, b"\0"))
    pattern = fdp.ConsumeBytes(size) or b"\x5a"
    payload = (pattern * (size // len(pattern) + 1))[:size]
    if fix:
        total = hdr_len + size
        if v6:
            headers[0] = 0x60 | headers[0] & 0x0F
            headers[4:7] = struct.pack("!HB", total - 40, 6 if tcp else 17)
        else:
            headers[0] = 0x40 | ip_len // 4
            headers[2:4] = struct.pack("!H", total)
            headers[6] &= 0x40  # DF or nothing: no fragment
            headers[7] = 0
            headers[9] = 6 if tcp else 17
        if tcp:
            headers[ip_len + 12] = l4_len // 4 << 4 | headers[ip_len + 12] & 0x0F
            headers[ip_len + 13] &= 0x08 | 0x10  # ACK and PSH at most
    return bytes(headers) + payload, ip_len, hdr_len, v6, tcp


def _split_both(fdp: atheris.FuzzedDataProvider) -> None:
    gso_type = fdp.PickValueInList(_GSO_TYPES)
    consistent, flags = fdp.ConsumeBool(), fdp.ConsumeIntInRange(0, 3)
    gso_size = fdp.PickValueInList([1, 8, 1207, 1368, 1448, fdp.ConsumeIntInRange(0, 65535)])
    csum_offset = fdp.ConsumeIntInRange(0, 20)
    mtu = fdp.PickValueInList([1280, 1420, 1500, fdp.ConsumeIntInRange(0, 9000)])
    packet, ip_len, hdr_len, v6, tcp = _super_segment(fdp)
    if consistent:
        gso_type = (gso.GSO_TCPV6 if v6 else gso.GSO_TCPV4) if tcp else gso.GSO_UDP_L4
    vnet = gso.VirtioNetHdr(flags, gso_type, hdr_len, gso_size, ip_len, csum_offset).pack()
    results: list[object] = []
    for module in (_segment, None):
        with mock.patch.object(gso, "_segment", module):
            try:
                results.append(gso.segment(vnet, packet, mtu))
            except gso.OffloadError as error:
                results.append(str(error))
    check(results[0] == results[1], "the C and numpy splitters disagree")
    parts = results[1]
    if isinstance(parts, list):  # seg_cut, the plane's send side, lays out the same
        stride = 16 + max(map(len, parts))
        buffer, places = _segment.cut(vnet, packet, mtu, 16, stride, len(parts))
        check([buffer[at : at + size] for at, size in places] == parts, "seg_cut disagrees")
    else:
        try:
            _segment.cut(vnet, packet, mtu, 16, 2048, 64)
        except ValueError as error:
            check(str(error) == "cut: malformed", "seg_cut refuses for another reason")
        else:
            check(False, "seg_cut accepts what gso.segment refuses")


def _merge_both(fdp: atheris.FuzzedDataProvider) -> None:
    step, udp = fdp.ConsumeIntInRange(1, 1500), fdp.ConsumeBool()
    changes = [(fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(0, 2**16),
                fdp.ConsumeIntInRange(0, 2**16), fdp.ConsumeIntInRange(1, 255))
               for _ in range(fdp.ConsumeIntInRange(0, 8))]
    packet, ip_len, hdr_len, v6, tcp = _super_segment(fdp)
    try:
        segments = _segment.split(packet, ip_len, hdr_len, step, v6, tcp)[:256]
    except ValueError:
        return
    for action, which, where, value in changes:
        if not segments:
            break
        k = which % len(segments)
        if action == 0 and segments[k]:  # a byte flipped
            mangled = bytearray(segments[k])
            mangled[where % len(mangled)] ^= value
            segments[k] = bytes(mangled)
        elif action == 1:
            del segments[k]
        elif action == 2:
            segments.insert(k, segments[k])
        elif action == 3 and k + 1 < len(segments):
            segments[k], segments[k + 1] = segments[k + 1], segments[k]
        else:
            segments[k] = segments[k][: where % (len(segments[k]) + 1)]
    merged = _segment.coalesce(segments, udp)
    check(merged == gso._coalesce_python(segments, udp), "the C and Python merges disagree")


def _split_raw(fdp: atheris.FuzzedDataProvider) -> None:
    lengths = [fdp.PickValueInList([fdp.ConsumeIntInRange(-(2**63), 2**63 - 1),
                                    fdp.ConsumeIntInRange(0, 120)]) for _ in range(3)]
    v6, tcp = fdp.ConsumeBool(), fdp.ConsumeBool()
    packet = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 70000))
    ip_len, hdr_len, step = lengths
    try:
        segments = _segment.split(packet, ip_len, hdr_len, step, v6, tcp)
    except ValueError:
        return
    check(b"".join(part[hdr_len:] for part in segments) == packet[hdr_len:]
          and all(hdr_len <= len(part) <= hdr_len + step for part in segments),
          "a direct split lost, repeated or overran payload")


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    (_split_both, _merge_both, _split_raw)[fdp.ConsumeIntInRange(0, 2)](fdp)


def seeds() -> list[bytes]:
    return [bytes([mode]) + bytes(range(256)) * 8 for mode in range(3)]


if __name__ == "__main__":
    main(test_one, seeds())
