"""The demux on real UDP sockets, in a namespace of the test's own: a datagram tagged for
the owner reaches its handler and never the core; the owner's reply leaves from the
WireGuard port."""

from __future__ import annotations

import sys

import pytest

from uspan.daemon import dataplane
from uspan.testbed import Lab

pytestmark = pytest.mark.system

# argv: "plane" (the C data plane reads the sockets and punts uspan's datagrams; its
# "TUN" a SOCK_SEQPACKET socket, as in the plane's unit tests) or "trio".
SCRIPT = r"""
import socket, sys, trio
from uspan.daemon.clock import MonotonicClock
from uspan.daemon.daemon import Daemon
from uspan.daemon.demux import tag
from uspan.daemon.memory import MemoryTun
from uspan.daemon.udp import UdpBind

async def main():
    bind = UdpBind.open(0)
    plane = None
    if sys.argv[1] == "plane":
        from uspan.plane._plane import Plane
        tun, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tun.setblocking(False)
        plane = Plane(tun.fileno(), bind.filenos(), 1420)
    daemon = Daemon(MemoryTun(), bind, plane=plane)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    got = []
    def handler(data, source):
        got.append((data, source))
        daemon.start_soon(daemon.send_datagrams, [(tag(b"PRB") + b"reply", source)])
    daemon.demux.register(tag(b"PRB"), handler)
    async with daemon.running():
        port = daemon.bind.port
        peer.sendto(tag(b"PRB") + b"hello", ("127.0.0.1", port))
        peer.sendto(b"\xffXYZ", ("127.0.0.1", port))
        data, source = await trio.to_thread.run_sync(peer.recvfrom, 100)
        with trio.move_on_after(10):  # the garbage, sent second, judged too (no sleep's guess)
            while daemon.stats()["drop_bad_type"] == 0:
                await trio.sleep(0.01)
        stats = daemon.stats()
    print(data == tag(b"PRB") + b"reply", source[1] == port,
          [(d, s.address) for d, s in got] == [(tag(b"PRB") + b"hello", peer.getsockname())],
          stats["udp_own_claimed"], stats["udp_own_unclaimed"], stats["drop_bad_type"],
          stats.get("plane_punts", 0) >= 2)

trio.run(main, clock=MonotonicClock())
"""


@pytest.mark.parametrize("path", ["plane", "trio"])
def test_real_udp_datagrams_of_the_owner_reach_its_handler_and_replies_leave_from_its_port(
        lab: Lab, path: str) -> None:
    if path == "plane" and not dataplane.COMPILED:
        pytest.skip("uspan/plane was not built")
    ns = lab.namespace("demux")
    ns.ip("link", "set", "lo", "up")
    out = ns.run(sys.executable, "-c", SCRIPT, path).stdout.split()
    assert out == ["True", "True", "True", "1", "1", "1", str(path == "plane")]
