"""Helpers for the plane's tests (uspan/plane/_plane.c): inner packets, and two planes
joined as a tunnel over real sockets (a SOCK_SEQPACKET pair for each TUN, UDP on
loopback), keyed with matching keypairs through the public ``install``. With offloads
the "TUN" carries a virtio_net_hdr before each packet and the sockets have UDP_GRO and
IP_PKTINFO (loopback honours UDP_SEGMENT and UDP_GRO without root)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import select
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from uspan.daemon import offload
from uspan.wg import prefix


def _load_build(path: str) -> None:
    """A build of _plane.c made elsewhere (scripts/sanitize-plane, scripts/fuzz-plane: with
    a sanitizer), put in place of the installed one before anything imports that."""
    spec = importlib.util.spec_from_file_location("uspan.plane._plane", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["uspan.plane._plane"] = module


if build := os.environ.get("USPAN_PLANE_BUILD"):
    _load_build(build)
if build or os.environ.get("USPAN_REQUIRE_COMPILED") == "1":  # CI: a missing build fails
    from uspan.plane import _plane
else:
    _plane = pytest.importorskip("uspan.plane._plane")
Plane = _plane.Plane
ALL_OFFLOADS = _plane.OFFLOAD_TUN_VNET | _plane.OFFLOAD_TUN_USO | _plane.OFFLOAD_UDP_GSO

MTU = 1420
SECOND = 1_000_000_000
INNER4 = ("10.77.0.1", "10.77.0.2")
INNER6 = ("fd77::1", "fd77::2")


def packet(source: str, destination: str, payload: bytes = b"ping") -> bytes:
    """A minimal IPv4 or IPv6 packet (UDP-numbered, checksums not needed here)."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if src.version == 4:
        total = 20 + len(payload)
        header = bytes([0x45, 0, total >> 8, total & 255, 0, 0, 0, 0, 64, 17, 0, 0])
        return header + src.packed + dst.packed + payload
    header = bytes([0x60, 0, 0, 0, len(payload) >> 8, len(payload) & 255, 17, 64])
    return header + src.packed + dst.packed + payload


def prefixes(*texts: str) -> list[int]:
    return [prefix.parse(text) for text in texts]


@dataclass
class End:
    """One side: its plane, the far end of its TUN, its UDP sockets and its peer's id."""

    plane: Plane
    tun: socket.socket
    udp4: socket.socket
    udp6: socket.socket
    peer: int

    def write_tun(self, data: bytes) -> None:
        self.tun.send(data)

    def read_tun(self, timeout: float = 2.0) -> bytes:
        ready, _, _ = select.select([self.tun], [], [], timeout)
        assert ready, "nothing reached the TUN"
        return self.tun.recv(70000)  # a merged write: virtio_net_hdr and 64 KiB

    def quiet_tun(self, wait: float = 0.2) -> bool:
        ready, _, _ = select.select([self.tun], [], [], wait)
        return not ready


def keys() -> tuple[bytes, bytes]:
    return os.urandom(32), os.urandom(32)


def install_pair(a: Plane, a_peer: int, b: Plane, b_peer: int, ia: int, ib: int,
                 created: int, *, roles: bool = True) -> None:
    """Matching keypairs: a's local ia is b's remote and the other way round; a initiates."""
    k1, k2 = keys()
    a.install(a_peer, ia, ib, k1, k2, created, True)
    b.install(b_peer, ib, ia, k2, k1, created, False)
    if roles:
        a.assign(a_peer, -1, ia, -1)
        b.assign(b_peer, -1, ib, -1)


def _udp(family: int, offloads: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    sock.setblocking(False)
    if offloads:
        assert offload.enable_gro(sock)
        offload.enable_pktinfo(sock)
    return sock


def _end(offloads: int) -> tuple[Plane, socket.socket, socket.socket, socket.socket,
                                 socket.socket]:
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inner.setblocking(False)
    udp4, udp6 = _udp(socket.AF_INET, offloads), _udp(socket.AF_INET6, offloads)
    plane = Plane(inner.fileno(), [udp4.fileno(), udp6.fileno()], MTU, offloads=offloads)
    return plane, inner, outer, udp4, udp6


def address_of(sock: socket.socket) -> tuple[bytes, int]:
    host, port = sock.getsockname()[:2]
    return socket.inet_pton(sock.family, host), port


@contextmanager
def tunnel(outer: int = socket.AF_INET, *, start: bool = True,
           offloads: int = 0) -> Iterator[tuple[End, End]]:
    """Two started planes with a session: A (INNER*[0]) and B (INNER*[1]) route each
    other's /32 and /128 and reach each other over UDP of family ``outer``; both with
    ``offloads`` (and then UDP_GRO and IP_PKTINFO on their sockets)."""
    made = [_end(offloads), _end(offloads)]
    ends = []
    try:
        for plane, _, outer_tun, udp4, udp6 in made:
            ends.append(End(plane, outer_tun, udp4, udp6, plane.add_peer()))
        a, b = ends
        a.plane.add_routes(a.peer, prefixes(f"{INNER4[1]}/32", f"{INNER6[1]}/128"))
        b.plane.add_routes(b.peer, prefixes(f"{INNER4[0]}/32", f"{INNER6[0]}/128"))
        for here, there in ((a, b), (b, a)):
            sock = there.udp4 if outer == socket.AF_INET else there.udp6
            here.plane.set_endpoint(here.peer, *address_of(sock))
        install_pair(a.plane, a.peer, b.plane, b.peer, 0x1111, 0x2222, time.monotonic_ns())
        if start:
            a.plane.start()
            b.plane.start()
        yield a, b
    finally:
        for plane, inner, outer_tun, udp4, udp6 in made:
            plane.close()
            for sock in (inner, outer_tun, udp4, udp6):
                sock.close()
