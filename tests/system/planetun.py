"""Checks of the plane against a real TUN, run inside a namespace by
tests/system/test_plane_tun.py (``ip netns exec NS python -m tests.system.planetun
CHECK TUN``); prints its findings as JSON.

``flags``: what ``Plane(...)`` says to TUNs set up unlike its flags (IFF_VNET_HDR with and
without OFFLOAD_TUN_VNET) and to a TUN whose MTU its slots cannot carry. ``oversize``:
a plane with a keyed peer on a TUN whose MTU is raised after the plane was made past
what a slot holds; a packet that long, then a short one, go to the peer; prints the
sizes of the datagrams the peer's endpoint (a socket on loopback) received and the
plane's counters. ``linklocal``: the same for a short packet to a peer at a link-local
address over a veth pair.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytun

from tests.unit.planekit import packet
from uspan.plane import _plane
from uspan.wg import prefix

MTU = 1420
BIG = 16000  # past the plane's slots (9296 bytes an inner packet)
INNER = ("10.79.0.1", "10.79.0.2")


def _tun(name: str, *, vnet: bool = False, mtu: int = MTU) -> pytun.TunTapDevice:
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet else 0)
    tun = pytun.TunTapDevice(name=name, flags=flags)
    tun.mtu = mtu
    return tun


def _refusal(tun: pytun.TunTapDevice, offloads: int) -> str | None:
    """The ValueError's text, or None if the plane took the TUN."""
    try:
        plane = _plane.Plane(tun.fileno(), [], MTU, offloads=offloads)
    except ValueError as exc:
        return str(exc)
    plane.close()
    return None


def flags(name: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    tun = _tun(name, vnet=True)
    found["vnet_without_flag"] = _refusal(tun, 0)
    found["vnet_with_flag"] = _refusal(tun, _plane.OFFLOAD_TUN_VNET)
    tun.close()
    tun = _tun(name)
    found["flag_without_vnet"] = _refusal(tun, _plane.OFFLOAD_TUN_VNET)
    found["plain"] = _refusal(tun, 0)
    tun.mtu = BIG
    found["mtu_too_big"] = _refusal(tun, 0)
    tun.close()
    return found


def oversize(name: str) -> dict[str, object]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tun = _tun(name)
    tun.addr, tun.netmask = INNER[0], "255.255.255.0"
    tun.up()
    far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    far.bind(("127.0.0.1", 0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    plane, peer = _keyed_plane(tun, sock)
    plane.set_endpoint(peer, socket.inet_aton("127.0.0.1"), far.getsockname()[1])
    plane.start()
    tun.mtu = BIG  # after the plane was made: only its reads can catch it
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"x" * (BIG - 100), (INNER[1], 9))
    sender.sendto(b"short", (INNER[1], 9))
    sizes = []
    while select.select([far], [], [], 1.0)[0]:
        sizes.append(len(far.recv(70000)))
    counters = plane.counters()
    counters["mtu"] = tun.mtu
    plane.close()
    tun.close()
    return {"sizes": sizes, "counters": counters}


def _keyed_plane(tun: pytun.TunTapDevice, sock: socket.socket,
                 keys: tuple[bytes, bytes] = (b"", b"")) -> tuple[_plane.Plane, int]:
    """A plane on ``tun`` with one peer keyed (local index 1, remote 2; random keys if
    not given) and routed at INNER[1], not started."""
    send, receive = keys if keys[0] else (os.urandom(32), os.urandom(32))
    plane = _plane.Plane(tun.fileno(), [sock.fileno()], MTU)
    peer = plane.add_peer()
    plane.install(peer, 1, 2, send, receive, time.monotonic_ns(), True)
    plane.assign(peer, -1, 1, -1)
    plane.add_routes(peer, [prefix.parse(f"{INNER[1]}/32")])
    return plane, peer


def linklocal(name: str) -> dict[str, object]:
    """A peer at a link-local address (fe80::2 on v1, a veth whose other end v0 has
    fe80::1) roams in from there, on a socket without IPV6_PKTINFO (only the source's
    scope says which interface), and the plane's reply goes back to it."""
    for command in (["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                    ["addr", "add", "fe80::1/64", "dev", "v0", "nodad"],
                    ["addr", "add", "fe80::2/64", "dev", "v1", "nodad"],
                    ["link", "set", "v0", "up"], ["link", "set", "v1", "up"]):
        subprocess.run(["ip", *command], check=True)
    deadline = time.monotonic() + 5
    carrier = Path("/sys/class/net/v0/carrier")
    while carrier.read_text() != "1\n" and time.monotonic() < deadline:
        time.sleep(0.05)
    v0 = socket.if_nametoindex("v0")
    tun = _tun(name)
    tun.addr, tun.netmask = INNER[0], "255.255.255.0"
    tun.up()
    far = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    far.bind(("fe80::2", 0, 0, socket.if_nametoindex("v1")))
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::", 0))
    keys = os.urandom(32), os.urandom(32)
    plane, _ = _keyed_plane(tun, sock, keys)
    plane.start()
    sealer = _plane.Plane(-1, [], MTU)  # the far end's keypair: seals what plane opens
    sealer.install(sealer.add_peer(), 2, 1, keys[1], keys[0], time.monotonic_ns(), False)
    (sealed,) = sealer.seal(2, [packet(INNER[1], INNER[0])])
    sealer.close()
    far.sendto(sealed, ("fe80::1", sock.getsockname()[1], 0, socket.if_nametoindex("v1")))
    deadline = time.monotonic() + 5
    while plane.counters()["roams"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"hello", (INNER[1], 9))
    sizes = []
    while select.select([far], [], [], 1.0)[0]:
        sizes.append(len(far.recv(70000)))
    records, _, _ = plane.collect()
    counters = plane.counters()
    plane.close()
    tun.close()
    roamed = records[0][9]
    return {"sizes": sizes, "counters": counters, "roamed_ifindex": roamed[3], "v0": v0}


CHECKS = {"flags": flags, "oversize": oversize, "linklocal": linklocal}


def main() -> int:
    check, name = sys.argv[1:3]
    print(json.dumps(CHECKS[check](name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
