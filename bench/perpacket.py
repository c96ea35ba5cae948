"""Per-packet cost of the core's data path, in process (no network, no daemon).

One single-stream TCP super-segment's worth of packets (47 IPv4 TCP segments of 1,408
bytes, as ``gso.segment`` makes of 64 KiB) goes through ``Device.send`` on A and the
resulting datagrams through ``Device.receive`` on B, over a session made by an in-memory
handshake. The ``gso.segment`` stage splits that super-segment itself, ``gso.coalesce``
merges the 47 segments back for the TUN, and ``receive side`` is ``Device.receive`` and
``gso.coalesce`` of its output: what the receiver does per packet before the TUN write
(compiled ``_segment``, or with ``--fallback`` gso's numpy/Python paths).

    bench/perpacket                 # fastest of 2,000 calls, us per packet
    bench/perpacket --callgrind     # instructions per packet (valgrind), robust under load
    bench/perpacket --lone [--callgrind]  # one ping's packet instead of a TCP burst

``--lone``: what a ping through an idle tunnel costs per packet, where every wake-up
handles one packet on cold caches (a packet's latency there is the instructions it
touches): ``Device.send`` and ``Device.receive`` of one ICMP echo request, and the read
of its datagram from a real loopback socket through the compiled gate
(``UdpSocket.receive_batch`` on a keyed device), beyond a plain ``recv`` of it.

The minimum over many calls is what one call costs when nothing else runs; instructions
are the run with the stage minus the same run without it. B's replay window is reset
between calls (untimed) so the same datagrams can be received again.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from uspan.daemon import gso
from uspan.daemon.udp import UdpSocket
from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.crypto import clamp, public_key
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint
from uspan.wg.keypair import Keypair
from uspan.wg.replay import ReplayWindow

PACKETS = 47
PACKET_SIZE = 1408
NOW = 1000.0
A_ENDPOINT, B_ENDPOINT = Endpoint("192.0.2.1", 51820), Endpoint("192.0.2.2", 51820)


def pair() -> tuple[Device, Device]:
    """A and B with a confirmed session, A the initiator."""
    a, b = Device(), Device()
    keys = [clamp(bytes([n]) * 32) for n in (1, 2)]
    for device, key, other, endpoint, allowed in (
            (a, keys[0], keys[1], B_ENDPOINT, "10.0.0.2/32"),
            (b, keys[1], keys[0], A_ENDPOINT, "10.0.0.1/32")):
        device.apply(DeviceChange(private_key=key, peers=[PeerChange(
            public_key(other), endpoint=endpoint,
            allowed_ips=[prefix.parse(allowed)])]), NOW)
    wire = a.send(batch()[:1], NOW)
    for _ in range(4):  # initiation, response, keepalive, staged packet
        to_b = b.receive([(d, A_ENDPOINT) for d, _ in wire], NOW)[1]
        wire = a.receive([(d, B_ENDPOINT) for d, _ in to_b], NOW)[1]
    assert b.peers[public_key(keys[0])].current is not None, "no session"
    return a, b


def _receive_stage(a: Device, b: Device) -> tuple[Keypair, list[tuple[bytes, Endpoint]]]:
    """B's session and A's datagrams of one batch, as B receives them."""
    datagrams = [(d, A_ENDPOINT) for d, _ in a.send(batch(), NOW)]
    keypair = next(iter(b.peers.values())).current
    assert keypair is not None
    return keypair, datagrams


def batch() -> list[bytes]:
    """The TCP segments of ``super_segment``: valid checksums, so they coalesce."""
    return gso.segment(*super_segment(), PACKET_SIZE)


def super_segment() -> tuple[bytes, bytes]:
    """The TSO super-segment (virtio_net_hdr, packet) that ``gso.segment`` cuts into
    PACKETS packets of PACKET_SIZE bytes at MTU PACKET_SIZE."""
    payload = PACKET_SIZE - 40
    size = 40 + PACKETS * payload
    header = bytes([0x45, 0, size >> 8, size & 0xFF, 0, 0, 0x40, 0, 64, 6, 0, 0,
                    10, 0, 0, 1, 10, 0, 0, 2])
    tcp = bytes([0x9C, 0x40, 0x14, 0x51, 0, 0, 0x03, 0xE8, 0, 0, 0, 77, 0x50, 0x18, 1, 0xF6,
                 0, 0, 0, 0])
    vnet = gso.VirtioNetHdr(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_TCPV4, 40, payload,
                            20, 16).pack()
    return vnet, header + tcp + bytes((n * 7) & 0xFF for n in range(PACKETS * payload))


def stages() -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """Each stage's call on one batch, and the (untimed) reset of B's replay window that
    lets B receive the same datagrams again."""
    a, b = pair()
    packets = batch()
    keypair, datagrams = _receive_stage(a, b)
    vnet, packet = super_segment()

    def reset() -> None:
        keypair.replay = ReplayWindow()

    def receive() -> list[bytes]:
        return b.receive(datagrams, NOW)[0]

    reset()
    assert receive() == packets and len(gso.coalesce(packets)) == 1, "no merge"
    return {
        "gso.segment": lambda: gso.segment(vnet, packet, PACKET_SIZE),
        "Device.send": lambda: a.send(packets, NOW),
        "Device.receive": receive,
        "gso.coalesce": lambda: gso.coalesce(packets),
        "receive side": lambda: gso.coalesce(receive()),
    }, reset


ECHO = bytes([0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
              8, 0, 0, 0, 0, 1, 0, 1]) + bytes(56)  # 10.0.0.1 -> 10.0.0.2, as ping sends


def lone_stages() -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """Each lone stage's call, and the reset before each call: B's replay window
    renewed and one datagram sent to a loopback socket. Every call consumes that
    datagram, with a plain ``recv`` (the "none" stage's whole call) or by the read
    measured, so the "none" run subtracts it."""
    a, b = pair()
    datagrams = [(d, A_ENDPOINT) for d, _ in a.send([ECHO], NOW)]
    keypair = next(iter(b.peers.values())).current
    assert keypair is not None
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    address, datagram = receiver.getsockname(), datagrams[0][0]
    udp = UdpSocket(receiver, offload_=True)
    udp.set_gate(lambda: b.gate_plan(NOW), lambda counts: b.gate_done(counts, NOW))
    recv = receiver.recv

    def reset() -> None:
        keypair.replay = ReplayWindow()
        sender.sendto(datagram, address)

    def read() -> list[tuple[bytes, Endpoint]]:
        return udp.receive_batch()

    reset()
    assert [d for d, _ in read()] == [datagram], "the gate did not hand the datagram up"
    return {
        "none": lambda: recv(2048),
        "lone Device.send": lambda: (a.send([ECHO], NOW), recv(2048)),
        "lone Device.receive": lambda: (b.receive(datagrams, NOW), recv(2048)),
        "lone socket read": read,
    }, reset


def timed(calls: int, lone: bool) -> None:
    if lone:
        calls_of, reset = lone_stages()
        base = min(_time(calls_of["none"], reset) for _ in range(calls))
        for name in LONE_STAGES:
            best = min(_time(calls_of[name], reset) for _ in range(calls)) - base
            print(f"{name:<20} {best / 1000:.2f} us (fastest of {calls}, less a recv's)")
        return
    calls_of, reset = stages()
    path = "compiled" if gso._segment is not None else "fallback"
    for name, call in calls_of.items():
        best = min(_time(call, reset) for _ in range(calls))
        print(f"{name:<15} {best / PACKETS / 1000:.2f} us per packet "
              f"(fastest of {calls}, {path})")


def _time(call: Callable[[], object], reset: Callable[[], None]) -> int:
    reset()
    start = time.perf_counter_ns()
    call()
    return time.perf_counter_ns() - start


def stage(name: str, calls: int, lone: bool) -> None:
    """Run one stage ``calls`` times (or nothing: the baseline) for callgrind."""
    calls_of, reset = lone_stages() if lone else stages()
    call = calls_of.get(name)
    for _ in range(calls):
        reset()
        if call is not None:
            call()


def callgrind(calls: int, fallback: bool, lone: bool) -> None:
    totals: dict[str, int] = {}
    extra = ["--fallback"] if fallback else []
    extra += ["--lone"] if lone else []
    names, packets = (LONE_STAGES, 1) if lone else (STAGES, PACKETS)
    # numpy's OpenBLAS threads spin at import, which blurs the differences by ~10k
    # instructions per packet; one thread keeps them exact.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    for name in ("none", *names):
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, __file__, "--stage", name, "--calls", str(calls), *extra],
            capture_output=True, text=True, check=True, env=env)
        found = re.search(r"Collected : (\d+)", run.stderr)
        assert found, run.stderr
        totals[name] = int(found.group(1))
    for name in names:
        per = (totals[name] - totals["none"]) / calls / packets
        print(f"{name:<20} {per / 1000:.1f}k instructions per packet ({calls} calls)")


STAGES = ("gso.segment", "Device.send", "Device.receive", "gso.coalesce", "receive side")
LONE_STAGES = ("lone Device.send", "lone Device.receive", "lone socket read")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int)
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--fallback", action="store_true",
                        help="split and coalesce with gso's numpy/Python paths, not _segment")
    parser.add_argument("--lone", action="store_true",
                        help="one ping's packet (and its socket read) instead of a TCP burst")
    parser.add_argument("--stage", choices=("none", *STAGES, *LONE_STAGES),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fallback:
        gso._segment = None  # type: ignore[assignment]
    if args.stage:
        stage(args.stage, args.calls or (1000 if args.lone else 30), args.lone)
    elif args.callgrind:
        callgrind(args.calls or (1000 if args.lone else 30), args.fallback, args.lone)
    else:
        timed(args.calls or 2000, args.lone)


if __name__ == "__main__":
    main()
