"""The demux on real UDP sockets, in a namespace of the test's own: a datagram tagged for
the owner reaches its handler and never the core; the owner's reply leaves from the
WireGuard port."""

from __future__ import annotations

import sys

import pytest

from uspan.testbed import Lab

pytestmark = pytest.mark.system

SCRIPT = r"""
import socket, trio
from uspan.daemon.daemon import Daemon
from uspan.daemon.demux import tag
from uspan.daemon.memory import MemoryTun
from uspan.daemon.udp import UdpBind

async def main():
    daemon = Daemon(MemoryTun(), UdpBind.open(0))
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
        await trio.sleep(0.2)
        stats = daemon.stats()
    print(data == tag(b"PRB") + b"reply", source[1] == port,
          [(d, s.address) for d, s in got] == [(tag(b"PRB") + b"hello", peer.getsockname())],
          stats["udp_own_claimed"], stats["udp_own_unclaimed"], stats["drop_bad_type"])

trio.run(main)
"""


def test_real_udp_datagrams_of_the_owner_reach_its_handler_and_replies_leave_from_its_port(
        lab: Lab) -> None:
    ns = lab.namespace("demux")
    ns.ip("link", "set", "lo", "up")
    out = ns.run(sys.executable, "-c", SCRIPT).stdout.split()
    assert out == ["True", "True", "True", "1", "1", "1"]
