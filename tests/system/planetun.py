"""Checks of the plane against a real TUN, run inside a namespace by
tests/system/test_plane_tun.py (``ip netns exec NS python -m tests.system.planetun
CHECK TUN``); prints its findings as JSON.

``flags``: what ``Plane(...)`` says to TUNs set up unlike its flags (IFF_VNET_HDR with and
without OFFLOAD_TUN_VNET) and to a TUN whose MTU its slots cannot carry. ``oversize``:
a plane with a keyed peer on a TUN whose MTU is raised after the plane was made past
what a slot holds; a packet that long, then a short one, go to the peer; prints the
sizes of the datagrams the peer's endpoint (a socket on loopback) received and the
plane's counters.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

import pytun

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
    plane = _plane.Plane(tun.fileno(), [sock.fileno()], MTU)
    peer = plane.add_peer()
    plane.install(peer, 1, 2, os.urandom(32), os.urandom(32), time.monotonic_ns(), True)
    plane.assign(peer, -1, 1, -1)
    plane.set_endpoint(peer, socket.inet_aton("127.0.0.1"), far.getsockname()[1])
    plane.add_routes(peer, [prefix.parse(f"{INNER[1]}/32")])
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


def main() -> int:
    check, name = sys.argv[1:3]
    print(json.dumps(flags(name) if check == "flags" else oversize(name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
