"""The offload layer against the real kernel, inside a namespace of our own.

A TUN opened with IFF_VNET_HDR and TSO: we play the remote TCP peer by hand. The
kernel's SYN arrives with a partial checksum that ``segment`` completes; our SYN-ACK
opens the connection; a super-segment from ``coalesce`` is accepted by the kernel and
its bytes reach the socket in order; the socket's data comes back as TSO
super-segments that ``segment`` splits into valid packets. On loopback, one
``sendmsg`` with UDP_SEGMENT arrives as one UDP_GRO receive that splits back exactly.

Each scenario runs in a child process started with ``ip netns exec`` and prints a JSON
summary (what the kernel accepted) as its last line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_gso import (
    ACK,
    PSH,
    SYN,
    check_ip,
    ip_parts,
    l4_valid,
    tcp_fields,
    tcp_packet,
    udp_packet,
)
from uspan.daemon import gso, offload
from uspan.testbed import Lab, Namespace

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
        reason="needs root and /dev/net/tun",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
MSS = 1400
SERVER_PORT = 5201
TIMEOUT = 5.0


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with Lab(prefix="usp-off-") as lab:
        yield lab.namespace("k")


def in_namespace(ns: Namespace, scenario: str, v6: bool) -> dict:
    """Run ``scenario(v6)`` of this module in ``ns``; return its JSON summary."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
        "from tests.system import test_offload_kernel as t; "
        f"print(json.dumps(t.{scenario}({v6!r})))"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    if done.returncode != 0:
        pytest.fail(f"{scenario}(v6={v6}) in {ns.name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- run inside the namespace ------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _open_vnet_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    flags = offload.IFF_TUN | offload.IFF_NO_PI | offload.IFF_VNET_HDR
    fcntl.ioctl(fd, offload.TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    return fd


def _read_tcp(fd: int, peer: bytes) -> tuple[bytes, bytes]:
    """The next (virtio_net_hdr, packet) the kernel sends to ``peer`` over TCP."""
    while True:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        assert ready, "no TCP packet from the kernel on the TUN"
        data = os.read(fd, 65536 + gso.VNET_HDR_LEN)
        vnet, packet = data[: gso.VNET_HDR_LEN], data[gso.VNET_HDR_LEN :]
        if not packet or packet[0] >> 4 not in (4, 6):
            continue
        _, _, _, dst, proto = ip_parts(packet)
        if proto == 6 and dst == peer:
            return vnet, packet


def _wait(sock: socket.socket, *, write: bool = False) -> None:
    ready = select.select([], [sock], [], TIMEOUT)[1] if write else select.select(
        [sock], [], [], TIMEOUT)[0]
    assert ready, f"socket not {'writable' if write else 'readable'} in {TIMEOUT}s"


def _connected(client: socket.socket, fd: int, peer: bytes, synack: bytes) -> None:
    """Wait until ``client`` is connected, answering a retransmitted SYN again as a real
    server would: on a loaded machine the kernel may drop our first SYN-ACK."""
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        ready, writable, _ = select.select([fd], [client], [], left)
        if writable:
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            return
        if ready:
            data = os.read(fd, 65536 + gso.VNET_HDR_LEN)
            packet = data[gso.VNET_HDR_LEN :]
            if packet and packet[0] >> 4 in (4, 6):
                _, _, _, dst, proto = ip_parts(packet)
                if proto == 6 and dst == peer and tcp_fields(packet)[2] & SYN:
                    assert os.write(fd, synack) == len(synack)
    raise AssertionError(f"client not connected in {TIMEOUT}s")


def tcp_through_tun(v6: bool) -> dict:
    """One TCP connection over a vnet-header TUN, the far end played by hand."""
    name = f"usoff{secrets.token_hex(4)}"
    fd = _open_vnet_tun(name)
    accepted = offload.enable_tun_offload(fd)
    family = socket.AF_INET6 if v6 else socket.AF_INET
    local, peer = ("fd00:77::1", "fd00:77::2") if v6 else ("10.77.0.1", "10.77.0.2")
    _ip("addr", "add", f"{local}/64" if v6 else f"{local}/24", "dev", name,
        *(["nodad"] if v6 else []))
    _ip("link", "set", name, "up")
    peer_packed, local_packed = socket.inet_pton(family, peer), socket.inet_pton(family, local)
    addresses = {"src": peer_packed, "dst": local_packed}

    client = socket.socket(family, socket.SOCK_STREAM)
    client.setblocking(False)
    client.connect_ex((peer, SERVER_PORT))

    # The SYN: GSO_NONE, checksum partial if the kernel kept TUN_F_CSUM.
    vnet, syn = _read_tcp(fd, peer_packed)
    syn_hdr = gso.parse_vnet_hdr(vnet)
    assert syn_hdr.gso_type == gso.GSO_NONE
    [syn] = gso.segment(vnet, syn, 1500)
    assert l4_valid(syn), "SYN checksum after segment()"
    check_ip(syn)
    client_isn, _, flags, _ = tcp_fields(syn)
    assert flags & SYN
    _, ip_len, *_ = ip_parts(syn)
    client_port = struct.unpack_from("!H", syn, ip_len)[0]

    def reply(payload: bytes, seq: int, ack: int, flags: int, ident: int, **kw) -> bytes:
        extra = {} if v6 else {"ident": ident & 0xFFFF}
        return tcp_packet(payload, v6=v6, seq=seq, ack=ack, flags=flags, sport=SERVER_PORT,
                          dport=client_port, window=65535, **extra, **addresses, **kw)

    server_seq = 7000
    client_next = (client_isn + 1) & 0xFFFFFFFF
    mss_option = struct.pack("!BBH", 2, 4, MSS)
    synack = reply(b"", server_seq, client_next, SYN | ACK, 1, options=mss_option)
    assert os.write(fd, gso.VNET_NONE + synack) == gso.VNET_HDR_LEN + len(synack)
    server_seq += 1
    _connected(client, fd, peer_packed, gso.VNET_NONE + synack)

    # Server -> client: ten segments coalesced into one GSO write.
    payload = os.urandom(10 * 1000)
    parts = [reply(payload[i : i + 1000], server_seq + i, client_next,
                   ACK | (PSH if i == 9000 else 0), 100 + i // 1000)
             for i in range(0, len(payload), 1000)]
    [(vnet, packet)] = gso.coalesce(parts)
    gso_hdr = gso.parse_vnet_hdr(vnet)
    assert gso_hdr.gso_type == (gso.GSO_TCPV6 if v6 else gso.GSO_TCPV4)
    written = os.write(fd, vnet + packet)
    assert written == len(vnet) + len(packet)
    server_seq += len(payload)
    received = b""
    while len(received) < len(payload):
        _wait(client)
        received += client.recv(65536)
    assert received == payload

    # Client -> server: TSO super-segments, split and checked, acknowledged as we go.
    data = os.urandom(100_000)
    sent = 0
    got: dict[int, bytes] = {}
    next_seq = client_next
    base = client_next
    reads = gso_reads = max_segments = 0
    while next_seq != (base + len(data)) & 0xFFFFFFFF:
        if sent < len(data):
            with contextlib.suppress(BlockingIOError):
                sent += client.send(data[sent:])
        vnet, packet = _read_tcp(fd, peer_packed)
        hdr = gso.parse_vnet_hdr(vnet)
        reads += 1
        segments = gso.segment(vnet, packet, 1500)
        if hdr.gso_type != gso.GSO_NONE:
            gso_reads += 1
            assert hdr.gso_type == (gso.GSO_TCPV6 if v6 else gso.GSO_TCPV4)
        max_segments = max(max_segments, len(segments))
        for seg in segments:
            assert len(seg) <= 1500
            check_ip(seg)
            assert l4_valid(seg), "segment checksum"
            seq, _, _, chunk = tcp_fields(seg)
            if chunk:
                got[seq] = chunk
        while next_seq in got:
            next_seq = (next_seq + len(got[next_seq])) & 0xFFFFFFFF
        ack = reply(b"", server_seq, next_seq, ACK, 200 + reads)
        os.write(fd, gso.VNET_NONE + ack)
    stream = b""
    seq = base
    while seq in got and len(stream) < len(data):
        stream += got[seq]
        seq = (seq + len(got[seq])) & 0xFFFFFFFF
    assert stream == data
    client.close()
    os.close(fd)
    return {
        "accepted": sorted(accepted),
        "syn_vnet": syn_hdr._asdict(),
        "coalesced_write": written,
        "reads": reads,
        "gso_reads": gso_reads,
        "max_segments_per_read": max_segments,
    }


def many_udp_through_tun(v6: bool) -> dict:
    """200 small datagrams of one flow in one batch, coalesced with USO into the TUN:
    since Linux 6.11 a write of more than 64 is refused (EINVAL), losing them all."""
    name = f"usoff{secrets.token_hex(4)}"
    fd = _open_vnet_tun(name)
    accepted = offload.enable_tun_offload(fd)
    if not {"uso4", "uso6"} <= accepted:
        return {"accepted": sorted(accepted)}
    family = socket.AF_INET6 if v6 else socket.AF_INET
    local, peer = ("fd00:77::1", "fd00:77::2") if v6 else ("10.77.0.1", "10.77.0.2")
    _ip("addr", "add", f"{local}/64" if v6 else f"{local}/24", "dev", name,
        *(["nodad"] if v6 else []))
    _ip("link", "set", name, "up")
    rx = socket.socket(family, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, 33, 1 << 24)  # SO_RCVBUFFORCE: room for all 200
    rx.bind((local, 4500))  # udp_packet's destination port
    rx.setblocking(False)
    addresses = {"src": socket.inet_pton(family, peer), "dst": socket.inet_pton(family, local)}
    sent = [i.to_bytes(2, "big") * 8 for i in range(200)]
    parts = [udp_packet(payload, v6=v6, **addresses, **({} if v6 else {"ident": i}))
             for i, payload in enumerate(sent)]
    writes = gso.coalesce(parts, udp=True)
    refused, lost = 0, []
    for _ in range(3):  # again only if none arrived: the losses are reported, not hidden
        before = _drop_counters()
        for vnet, packet in writes:
            try:
                os.write(fd, vnet + packet)
            except OSError:
                refused += 1
        received = []
        while len(received) < len(sent) and select.select([rx], [], [], 1.0)[0]:
            received.append(rx.recv(2048))
        if received or refused:
            break
        after = _drop_counters()
        lost.append({name: after[name] - before.get(name, 0) for name in after
                     if after[name] != before.get(name, 0)})
    rx.close()
    os.close(fd)
    return {"accepted": sorted(accepted), "writes": len(writes), "refused": refused,
            "in_order": received == sent, "received": len(received), "lost": lost}


def _drop_counters() -> dict[str, int]:
    """The namespace's kernel counters that count a dropped or refused packet."""
    out = subprocess.run(["nstat", "-as"], check=True, capture_output=True, text=True).stdout
    counters = (line.split() for line in out.splitlines() if not line.startswith("#"))
    return {fields[0]: int(fields[1]) for fields in counters
            if any(word in fields[0] for word in ("Err", "Discard", "NoRoute", "NoPort", "Drop"))}


def udp_gso_gro(v6: bool) -> dict:
    """One UDP_SEGMENT send on loopback, received as one UDP_GRO batch."""
    _ip("link", "set", "lo", "up")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    address = "::1" if v6 else "127.0.0.1"
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    rx.bind((address, 0))
    rx.setblocking(False)
    gro = offload.enable_gro(rx)
    offload.enable_pktinfo(rx)
    gso_on = offload.probe_udp_gso(tx)
    assert gro and gso_on, f"UDP_GRO {gro}, UDP_SEGMENT {gso_on}"
    datagrams = [bytes([i]) * 1200 for i in range(9)] + [b"z" * 500]
    [(buffer, size)] = gso.gso_batches(datagrams)
    destination = rx.getsockname()
    assert tx.sendmsg([buffer], [offload.gso_cmsg(size)], 0, destination) == len(buffer)
    _wait(rx)
    buf = bytearray(offload.RECV_BUFFER_SIZE)
    batch, truncated = offload.recv_batch_gro(rx, buf)
    assert truncated == 0
    assert [d for item in batch for d in item.datagrams] == datagrams
    assert len(batch) == 1, f"{len(batch)} receives: not coalesced"
    [item] = batch
    assert item.gso_size == 1200
    assert offload.arrival(item.address, item.pktinfo) == (address, socket.if_nametoindex("lo"))
    assert item.address[:2] == (address, tx.getsockname()[1])

    # More control messages than GRO_ANCBUFSIZE has room for: dropped and counted,
    # not misread.
    if v6:
        rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
    else:
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        rx.setsockopt(socket.IPPROTO_IP, 12, 1)  # IP_RECVTTL
    rx.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
    tx.sendmsg([buffer], [offload.gso_cmsg(size)], 0, destination)
    _wait(rx)
    batch, truncated = offload.recv_batch_gro(rx, buf)
    assert not batch
    rx.close()
    tx.close()
    return {"udp_gro": gro, "udp_segment": gso_on, "gso_size": item.gso_size,
            "truncation": truncated}


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tcp_over_vnet_tun(ns: Namespace, v6: bool) -> None:
    result = in_namespace(ns, "tcp_through_tun", v6)
    print(json.dumps(result))
    assert {"csum", "tso4", "tso6"} <= set(result["accepted"])
    assert result["syn_vnet"]["flags"] == gso.VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert result["gso_reads"] >= 1, "the kernel never sent a TSO super-segment"
    assert result["max_segments_per_read"] > 1


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_many_small_udp_datagrams_through_a_uso_tun(ns: Namespace, v6: bool) -> None:
    result = in_namespace(ns, "many_udp_through_tun", v6)
    print(json.dumps(result))
    if "writes" not in result:
        pytest.skip(f"the TUN did not accept USO: {result['accepted']}")
    assert result["refused"] == 0
    assert result["received"] == 200 and result["in_order"], result["lost"]
    assert result["writes"] == 4


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_gso_gro_loopback(ns: Namespace, v6: bool) -> None:
    result = in_namespace(ns, "udp_gso_gro", v6)
    print(json.dumps(result))
    assert result["udp_gro"] and result["udp_segment"]
    assert result["truncation"] == 1
