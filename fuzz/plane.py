"""The C data plane (``uspan/plane/_plane.c`` over its core, ``uspan/csrc/plane*.c``) on
hostile datagrams and TUN reads. Pairs of planes with a live session each (as
tests/unit/planekit builds them): one driven through the steps' test hooks (synchronous,
at a chosen time), two started, their threads reading a "TUN" (with a virtio_net_hdr, or
without) and UDP sockets (with UDP_GRO, or without). The input's first pick is one of:

- 0: a batch of datagrams into B's UDP step: raw bytes, a transport header with B's
  receiver index, messages really sealed under A's session (fuzzed plaintext: an inner
  packet from A, from elsewhere, junk, a keepalive; some sent twice), messages replayed
  from earlier inputs, handshake-sized messages with and without a valid mac1, a cookie
  reply or demux mark, each from A's address or a stranger's; B's gate under a hostile
  plan (budgets, lane bytes), at the session's time or past its expiry;
- 1: a batch of TUN packets into A's TUN step (routed to B, to a peer without a session,
  nowhere, junk, too long), what it seals then opened by B's step;
- 2: a TUN read of the started A: a virtio_net_hdr and a TSO/USO super-segment whose
  header fields the input may leave broken (fuzz/segment's), cut by seg_cut, sealed, sent
  with UDP_SEGMENT to the started B, received (UDP_GRO), opened and merged for its TUN;
- 3: a coalesced run into the started B (one UDP_SEGMENT send to its UDP_GRO socket):
  messages sealed under A's session with fuzzed inner packets (headers that may merge),
  forged, duplicated, junk and handshake pieces, cut to the first's size, B's gate under
  a hostile plan (its cookie replies really sent);
- 4: TUN reads of the started pair without offloads: packets (some past a slot) read one
  at a time, sealed, sent and received as single datagrams, written as they are.

Properties after every input: only the documented errors escape (``ValueError`` for a
refused plan or a packet too long for the hook); every datagram and TUN packet ends in
exactly one count (a drop counter, the gate's counts, a punt, a seal or a TUN write);
what reaches B's TUN is exactly the plaintext sealed that B must accept (for 0 and 1 in
order; for 2 and 3 as the kernel would cut B's merged writes), trimmed to the inner
packet's length; a datagram that is not a fresh authentic message moves no endpoint and
changes no session (B's replay window and roles: what is authentic after it still
passes); punts and records stay bounded by the peers.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from collections import deque
from contextlib import ExitStack, suppress
from typing import TYPE_CHECKING

import atheris

with atheris.instrument_imports(include=["uspan"]):
    from uspan.daemon import gso, offload
    from uspan.wg import crypto
    from uspan.wg.constants import COOKIE_REPLY_SIZE, INITIATION_SIZE, MAC_SIZE, RESPONSE_SIZE
    from uspan.wg.messages import padded_length

from fuzz.harness import PropertyFailure, check, main
from fuzz.segment import _super_segment
from tests.unit.planekit import (
    ALL_OFFLOADS,
    INNER4,
    INNER6,
    MTU,
    SECOND,
    End,
    Plane,
    address_of,
    install_pair,
    packet,
    prefixes,
    tunnel,
)

if TYPE_CHECKING:
    from uspan.plane._plane import PeerRecord

MAX_PACKET = 9216 + 128 - 16 - 32  # the hook's largest packet (uspan/csrc/plane.h)
CUT_MAX = 128  # segments of one TSO read
A_ADDR, B_ADDR = (b"\x7f\x00\x00\x01", 40001), (b"\x7f\x00\x00\x01", 40002)
STRANGER = (b"\x7f\x00\x00\x09", 40999)
IA, IB = 0x1111, 0x2222
MAC1_KEY, COOKIE_KEY, SECRET = bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))
A_INNER = {ipaddress.ip_address(a).packed for a in (INNER4[0], INNER6[0])}
B_INNER = {ipaddress.ip_address(a).packed for a in (INNER4[1], INNER6[1])}
B_ENDS = ("bad_length", "bad_type", "unknown_index", "expired_key", "decrypt_failed",
          "replay", "bad_inner_packet", "not_allowed_source", "keepalives", "punts")
A_ENDS = ("bad_length", "bad_inner_packet", "no_route", "no_endpoint", "sealed", "punts",
          "send_errors")

# The hooks' pair: A (INNER*[0]) and B (INNER*[1]), a session created at T0.
hook_a, hook_b = Plane(-1, [], MTU), Plane(-1, [], MTU)
a_peer, b_peer, lonely = hook_a.add_peer(), hook_b.add_peer(), hook_a.add_peer()
hook_a.add_routes(a_peer, prefixes(f"{INNER4[1]}/32", f"{INNER6[1]}/128"))
hook_a.add_routes(lonely, prefixes("10.88.0.0/16"))  # a peer without a session: punts
hook_b.add_routes(b_peer, prefixes(f"{INNER4[0]}/32", f"{INNER6[0]}/128"))
hook_a.set_endpoint(a_peer, *B_ADDR)
hook_b.set_endpoint(b_peer, *A_ADDR)
T0 = time.monotonic_ns()
install_pair(hook_a, a_peer, hook_b, b_peer, IA, IB, T0)
_replays: deque[bytes] = deque(maxlen=16)  # authentic datagrams B has taken

# The started pairs: with every offload (a stranger's socket sends it coalesced runs), and
# with none (a TUN read a packet, a datagram a receive).
_stack = ExitStack()
live_a, live_b = _stack.enter_context(tunnel(offloads=ALL_OFFLOADS))
plain_a, plain_b = _stack.enter_context(tunnel())
_sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_sender.bind(("127.0.0.1", 0))
_sender.setblocking(False)
_sentinels = 0
_sessions: dict[int, tuple[int, int, int]] = {}  # id(A's plane): A's index, B's, created


def _fresh(a: End, b: End) -> int:
    """A's index of a session with B less than a minute old: the started planes keep the
    clock, and past 180 s a session is rejected (then nothing would pass)."""
    ia, ib, created = _sessions.get(id(a.plane), (0x1111, 0x2222, T0))
    now = time.monotonic_ns()
    if now - created > 60 * SECOND:
        install_pair(a.plane, a.peer, b.plane, b.peer, ia + 2, ib + 2, now)
        a.plane.drop(ia)
        b.plane.drop(ib)
        ia, ib, created = ia + 2, ib + 2, now
        _sessions[id(a.plane)] = ia, ib, created
    return ia


def inner_length(plain: bytes) -> int:
    """The inner packet's own length in a padded plaintext, 0 if not whole (_plane.c)."""
    version = plain[0] >> 4 if plain else 0
    if version == 4 and len(plain) >= 20:
        total = int.from_bytes(plain[2:4], "big")
        return total if 20 <= total <= len(plain) else 0
    if version == 6 and len(plain) >= 40:
        total = 40 + int.from_bytes(plain[4:6], "big")
        return total if total <= len(plain) else 0
    return 0


def address(packet: bytes, source: bool) -> bytes | None:
    """An inner packet's source or destination, None if no whole enough IP header."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        return packet[12:16] if source else packet[16:20]
    if version == 6 and len(packet) >= 40:
        return packet[8:24] if source else packet[24:40]
    return None


def padded(plain: bytes) -> bytes:
    """The plaintext as sealed: zeros to a multiple of 16, within the MTU."""
    return plain.ljust(padded_length(len(plain), MTU), b"\0")


def accepted(plain: bytes) -> bytes | None:
    """What B writes to its TUN of an authentic fresh message's plaintext, or None."""
    whole = padded(plain)
    length = inner_length(whole)
    if not length or address(whole, True) not in A_INNER:
        return None
    return whole[:length]


def _inner(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A plaintext for A to seal: a packet from A to B (v4 or v6, its length field right
    or not), one from elsewhere, junk, or nothing (a keepalive)."""
    shape = fdp.ConsumeIntInRange(0, 4)
    payload = bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1400)))
    if shape == 4:
        return b""
    if shape == 3:
        return payload
    v6 = fdp.ConsumeBool()
    source = ("10.77.0.9", "fd77::9")[v6] if shape == 2 else (INNER4[0], INNER6[0])[v6]
    body = bytearray(packet(source, (INNER4[1], INNER6[1])[v6], payload))
    if shape == 1:  # its length field fuzzed
        at = 4 if v6 else 2
        body[at:at + 2] = fdp.ConsumeIntInRange(0, 0xFFFF).to_bytes(2, "big")
    return bytes(body)


def _handshake(fdp: atheris.FuzzedDataProvider) -> bytes:
    """An initiation, response or cookie reply by type and size, mac1 valid or not."""
    size = fdp.PickValueInList([INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE])
    body = bytearray(fdp.ConsumeBytes(size).ljust(size, b"\0"))
    body[0:4] = bytes([{INITIATION_SIZE: 1, RESPONSE_SIZE: 2}.get(size, 3), 0, 0, 0])
    if size != COOKIE_REPLY_SIZE and fdp.ConsumeBool():
        mac1_at = size - 2 * MAC_SIZE
        body[mac1_at:mac1_at + MAC_SIZE] = crypto.mac(MAC1_KEY, bytes(body[:mac1_at]))
    return bytes(body)


def _plan(fdp: atheris.FuzzedDataProvider, plane: Plane) -> None:
    """A hostile plan for the plane's gate, or none; a refused one is a ValueError."""
    if fdp.ConsumeIntInRange(0, 3) == 0:
        plane.set_gate()
        return
    with suppress(ValueError):
        plane.set_gate(MAC1_KEY, COOKIE_KEY, SECRET if fdp.ConsumeBool() else None,
                       fdp.ConsumeBool(), fdp.ConsumeIntInRange(-(1 << 62), 1 << 62),
                       fdp.ConsumeIntInRange(-3, 40),
                       fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)))


def _deltas(before: dict[str, int], after: dict[str, int], names: tuple[str, ...]) -> int:
    return sum(after[k] - before[k] for k in names)


def _gate_ends(plane: Plane) -> int:
    """The handshake messages the gate ended without a punt since the last take: bad
    mac1, answered with a cookie reply, dropped (after a collect: its counts move then)."""
    bad_mac1, _, cookies, dropped, _, _ = plane.gate_take()
    return bad_mac1 + cookies + dropped


def _collect_bounded(plane: Plane, peers: int) -> list[PeerRecord]:
    records, punts, _ = plane.collect()
    check(len(records) <= peers, "more records than peers")
    check(len(punts) <= 256, "more punts than the ring holds")
    return records


def _udp_batch(fdp: atheris.FuzzedDataProvider) -> None:
    now = T0 + fdp.PickValueInList([0, SECOND, 181 * SECOND])
    expired = now - T0 >= 180 * SECOND
    _plan(fdp, hook_b)
    hook_b.collect()
    _gate_ends(hook_b)
    batch: list[tuple[bytes, bytes, int]] = []
    authentic: list[tuple[bytes, bytes]] = []  # (datagram, plaintext)
    for _ in range(fdp.ConsumeIntInRange(1, 32)):
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind == 0:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        elif kind == 1:  # a transport header with a known index, a fuzzed counter
            data = (b"\x04\0\0\0" + IB.to_bytes(4, "little")
                    + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200)))
        elif kind == 2 or (kind == 3 and not authentic):
            plain = _inner(fdp)
            (data,) = hook_a.seal(IA, [plain])
            authentic.append((data, plain))
        elif kind == 3:  # one sent again, maybe flipped
            data = authentic[fdp.ConsumeIntInRange(0, len(authentic) - 1)][0]
            if fdp.ConsumeBool():
                flipped = bytearray(data)
                flipped[fdp.ConsumeIntInRange(0, len(data) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
                data = bytes(flipped)
        elif kind == 4:
            data = _replays[fdp.ConsumeIntInRange(0, len(_replays) - 1)] if _replays else b""
        else:
            data = _handshake(fdp) if fdp.ConsumeBool() else b"\xff" + fdp.ConsumeBytes(60)
        batch.append((data, *(STRANGER if fdp.ConsumeBool() else A_ADDR)))
    # What B must do: each authentic message once, before its expiry; a roam each time one
    # comes from other than the endpoint of the moment.
    plains = dict(authentic)
    expected, roams, endpoint, seen = [], 0, A_ADDR, set()
    for data, host, port in batch:
        if data not in plains or data in seen or expired:
            continue
        seen.add(data)
        if (host, port) != endpoint:
            roams, endpoint = roams + 1, (host, port)
        if (out := accepted(plains[data])) is not None:
            expected.append(out)
    before = hook_b.counters()
    got = hook_b._udp_step([*batch], now)
    after = hook_b.counters()
    records = _collect_bounded(hook_b, 1)
    ends = _deltas(before, after, B_ENDS) + len(got) + _gate_ends(hook_b)
    check(ends == len(batch), f"{len(batch)} datagrams, {ends} ends")
    check(got == expected, "B's TUN got other than the plaintext sealed")
    check(after["roams"] - before["roams"] == roams, "a roam without a fresh authentic message")
    check(not roams or (bool(records) and records[0][9] is not None), "a roam not reported")
    check(hook_b.send_counter(IB) == 0, "B's sending session changed")
    _replays.extend(data for data in seen)
    if roams:
        hook_b.set_endpoint(b_peer, *A_ADDR)


def _tun_batch(fdp: atheris.FuzzedDataProvider) -> None:
    now = T0 + fdp.PickValueInList([0, SECOND, 181 * SECOND])
    packets = []
    for _ in range(fdp.ConsumeIntInRange(1, 32)):
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind <= 1:
            packets.append(_inner(fdp))
        elif kind == 2:
            packets.append(packet(INNER4[0], fdp.PickValueInList(["10.88.3.4", "10.99.0.1"]),
                                  fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100))))
        elif kind == 3:
            packets.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100)))
        else:  # long: past an MTU, to the hook's limit and beyond
            size = fdp.PickValueInList([MTU + 1, MAX_PACKET, MAX_PACKET + 1])
            packets.append(packet(INNER4[0], INNER4[1], bytes(size - 20)))
    before = hook_a.counters()
    try:
        sent = hook_a._tun_step(packets, now)
    except ValueError as error:
        check(str(error) == "packet too large" and any(len(p) > MAX_PACKET for p in packets),
              f"the TUN step refused: {error}")
        check(hook_a.counters() == before, "a refused batch was counted")
        return
    after = hook_a.counters()
    _collect_bounded(hook_a, 2)
    ends = _deltas(before, after, A_ENDS)
    check(ends == len(packets), f"{len(packets)} TUN packets, {ends} ends")
    for_b = [p for p in packets if address(p, False) in B_INNER]
    if now - T0 >= 180 * SECOND:
        check(sent == [], "sealed under an expired session")
        return
    check(len(sent) == len(for_b), "not every packet for B was sealed")
    check(all(where == (*B_ADDR, b"", 0) for _, where in sent), "sent elsewhere than B")
    got = hook_b._udp_step([(d, *A_ADDR) for d, _ in sent], now)
    check(got == [out for p in for_b if (out := accepted(p)) is not None],
          "B's TUN got other than the TUN packet A read")
    hook_b.collect()


def _sentinel() -> bytes:
    """An inner packet from A to B that no merge joins (protocol 253), unique per input."""
    global _sentinels
    _sentinels += 1
    body = bytearray(packet(INNER4[0], INNER4[1], b"sentinel %d" % _sentinels))
    body[9] = 253
    return bytes(body)


def _tun_writes(end: End, until: bytes) -> list[bytes]:
    """The end's TUN writes up to the sentinel ``until``; with a virtio_net_hdr each as
    the kernel would cut it."""
    out: list[bytes] = []
    vnet = end is live_b
    deadline = time.monotonic() + 5
    while True:
        ready, _, _ = select.select([end.tun], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise PropertyFailure("the sentinel never came: the thread stuck or dropped it")
        data = end.tun.recv(70000)
        if not vnet:
            if data == until:
                return out
            out.append(data)
            continue
        header, inner = data[:gso.VNET_HDR_LEN], data[gso.VNET_HDR_LEN:]
        if inner == until:
            check(header == gso.VNET_NONE, "the sentinel written behind a header")
            return out
        out.extend(gso.segment(header, inner, 65535) if header != gso.VNET_NONE else [inner])


def _settle(plane: Plane, counter: str, value: int) -> dict[str, int]:
    deadline = time.monotonic() + 5
    while (counts := plane.counters())[counter] < value:
        if time.monotonic() > deadline:
            raise PropertyFailure(f"{counter} never reached {value}: {counts}")
        time.sleep(0.0005)
    return counts


def _tun_read(fdp: atheris.FuzzedDataProvider) -> None:
    _fresh(live_a, live_b)
    gso_type = fdp.PickValueInList([gso.GSO_NONE, gso.GSO_TCPV4, gso.GSO_TCPV6,
                                    gso.GSO_UDP_L4, gso.GSO_TCPV4 | gso.GSO_ECN, 0x7F])
    consistent, flags, ours = fdp.ConsumeBool(), fdp.ConsumeIntInRange(0, 3), fdp.ConsumeBool()
    gso_size = fdp.PickValueInList([1, 8, 536, 1368, fdp.ConsumeIntInRange(0, 65535)])
    csum_offset = fdp.ConsumeIntInRange(0, 20)
    whole, ip_len, hdr_len, v6, tcp = _super_segment(fdp)
    if consistent:
        gso_type = (gso.GSO_TCPV6 if v6 else gso.GSO_TCPV4) if tcp else gso.GSO_UDP_L4
    head = bytearray(whole)
    if ours and len(head) >= (40 if v6 else 20):  # from A to B: sealed, not just routed
        pair = (INNER6 if v6 else INNER4)
        at = 8 if v6 else 12
        size = 16 if v6 else 4
        head[at:at + size] = ipaddress.ip_address(pair[0]).packed
        head[at + size:at + 2 * size] = ipaddress.ip_address(pair[1]).packed
    vnet = gso.VirtioNetHdr(flags, gso_type, hdr_len, gso_size, ip_len, csum_offset).pack()
    try:
        parts = gso.segment(vnet, bytes(head), MTU)
    except gso.OffloadError:
        parts = []
    refused = not parts or len(parts) > CUT_MAX or len(parts[0]) > MAX_PACKET
    sentinel = _sentinel()
    a0, b0 = live_a.plane.counters(), live_b.plane.counters()
    live_a.write_tun(vnet + bytes(head))
    live_a.write_tun(gso.VNET_NONE + sentinel)
    writes = _tun_writes(live_b, sentinel)
    a1 = _settle(live_a.plane, "tun_reads", a0["tun_reads"] + 2)
    sealed = [p for p in parts if address(p, False) in B_INNER] if not refused else []
    b1 = _settle(live_b.plane, "udp_reads", b0["udp_reads"] + len(sealed) + 1)
    a_ends = _deltas(a0, a1, A_ENDS)
    check(a_ends == (1 if refused else len(parts)) + 1, f"A's TUN read: {a_ends} ends")
    check(a1["sealed"] - a0["sealed"] == len(sealed) + 1, "A sealed other than its routes say")
    expected = [out for p in sealed if (out := accepted(p)) is not None]
    b_ends = _deltas(b0, b1, B_ENDS) + len(expected) + 1  # written, the sentinel too
    check(b_ends == len(sealed) + 1, f"{len(sealed) + 1} datagrams to B, {b_ends} ends")
    check(writes == expected, "B's TUN got other than A's TUN read, cut")
    _collect_bounded(live_a.plane, 1)
    _collect_bounded(live_b.plane, 1)


def _coalesced(fdp: atheris.FuzzedDataProvider) -> None:
    index = _fresh(live_a, live_b)
    _plan(fdp, live_b.plane)
    live_b.plane.collect()
    _gate_ends(live_b.plane)
    pieces: list[bytes] = []
    plains: dict[bytes, bytes] = {}
    for _ in range(fdp.ConsumeIntInRange(1, 48)):
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind <= 1 or not plains:
            plain = _inner(fdp)
            (data,) = live_a.plane.seal(index, [plain])
            plains[data] = plain
        elif kind == 2:  # sent twice, or flipped
            data = list(plains)[fdp.ConsumeIntInRange(0, len(plains) - 1)]
            if fdp.ConsumeBool():
                flipped = bytearray(data)
                flipped[fdp.ConsumeIntInRange(0, len(data) - 1)] ^= 1
                data = bytes(flipped)
        elif kind == 3:
            data = _handshake(fdp)
        else:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        pieces.append(data)
    size = max(len(pieces[0]), 1)
    pieces = pieces[:min(64, 65000 // size)]
    pieces = [p[:size].ljust(size, b"\0") for p in pieces[:-1]] + [pieces[-1][:size]]
    if not pieces[-1]:
        pieces.pop()
    if not pieces:
        return
    expected, seen = [], set()
    for piece in pieces:
        if piece in plains and piece not in seen:
            seen.add(piece)
            if (out := accepted(plains[piece])) is not None:
                expected.append(out)
    sentinel = _sentinel()
    (marker,) = live_a.plane.seal(index, [sentinel])
    b0 = live_b.plane.counters()
    _sender.sendmsg([b"".join(pieces)], [offload.gso_cmsg(size)], 0, live_b.udp4.getsockname())
    _sender.sendto(marker, live_b.udp4.getsockname())
    writes = _tun_writes(live_b, sentinel)
    b1 = _settle(live_b.plane, "udp_reads", b0["udp_reads"] + len(pieces) + 1)
    live_b.plane.collect()
    ends = _deltas(b0, b1, B_ENDS) + len(expected) + 1 + _gate_ends(live_b.plane)
    check(ends == len(pieces) + 1, f"{len(pieces)} pieces and a marker, {ends} ends")
    check(writes == expected, "B's TUN got other than the plaintext sealed")
    live_b.plane.set_endpoint(live_b.peer, *address_of(live_a.udp4))  # roamed to _sender
    while True:  # the cookie replies
        try:
            _sender.recv(100)
        except BlockingIOError:
            break


def _plain_reads(fdp: atheris.FuzzedDataProvider) -> None:
    _fresh(plain_a, plain_b)
    packets = []
    for _ in range(fdp.ConsumeIntInRange(1, 16)):
        if fdp.ConsumeIntInRange(0, 7) == 0:  # long: past an MTU, to a slot's limit and beyond
            size = fdp.PickValueInList([MTU + 1, MAX_PACKET, MAX_PACKET + 1, 20000])
            packets.append(packet(INNER4[0], INNER4[1], bytes(size - 20)))
        else:
            packets.append(_inner(fdp) or b"\x45")  # a TUN never reads empty
    sentinel = _sentinel()
    a0, b0 = plain_a.plane.counters(), plain_b.plane.counters()
    for data in packets:
        plain_a.write_tun(data)
    plain_a.write_tun(sentinel)
    writes = _tun_writes(plain_b, sentinel)
    a1 = _settle(plain_a.plane, "tun_reads", a0["tun_reads"] + len(packets) + 1)
    sealed = [p for p in packets if address(p, False) in B_INNER and len(p) <= MAX_PACKET]
    b1 = _settle(plain_b.plane, "udp_reads", b0["udp_reads"] + len(sealed) + 1)
    a_ends = _deltas(a0, a1, A_ENDS)
    check(a_ends == len(packets) + 1, f"{len(packets) + 1} TUN reads, {a_ends} ends")
    check(a1["sealed"] - a0["sealed"] == len(sealed) + 1, "A sealed other than its routes say")
    expected = [out for p in sealed if (out := accepted(p)) is not None]
    b_ends = _deltas(b0, b1, B_ENDS) + len(expected) + 1
    check(b_ends == len(sealed) + 1, f"{len(sealed) + 1} datagrams to B, {b_ends} ends")
    check(writes == expected, "B's TUN got other than A's TUN reads")
    _collect_bounded(plain_a.plane, 1)
    _collect_bounded(plain_b.plane, 1)


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    (_udp_batch, _tun_batch, _tun_read, _coalesced,
     _plain_reads)[fdp.ConsumeIntInRange(0, 4)](fdp)


def seeds() -> list[bytes]:
    return [bytes([mode]) + bytes(range(256)) * 8 for mode in range(5)]


if __name__ == "__main__":
    main(test_one, seeds())
