"""The relay's port 0 (``uspan relay --listen HOST:0``, the lab's and the tests'): the
kernel picks a free UDP port, whose TCP twin another program may hold. The relay must
then take another, never fail, in a namespace whose ephemeral range is two ports wide."""

from __future__ import annotations

import sys

import pytest

from uspan.testbed import Lab

pytestmark = pytest.mark.system

LOW = 40000  # the namespace's ephemeral range: LOW and LOW + 1

# Inside the namespace: TCP LOW taken, then the relay on port 0, whose UDP bind the
# kernel may give LOW (TCP refused: retry, holding LOW) or LOW + 1 (taken at once).
SCRIPT = r"""
import socket, sys, trio
from uspan.relay.server import RelayServer
low = int(sys.argv[1])
holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
holder.bind(("127.0.0.1", low))
holder.listen()

async def main():
    server = RelayServer()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        print(port)
        nursery.cancel_scope.cancel()

for _ in range(8):  # the kernel's pick is random: both orders, most likely
    trio.run(main)
"""


def test_port_zero_skips_a_udp_port_whose_tcp_twin_is_taken(lab: Lab) -> None:
    ns = lab.namespace("relayports")
    ns.ip("link", "set", "lo", "up")
    ns.run("sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={LOW} {LOW + 1}")
    done = ns.run(sys.executable, "-c", SCRIPT, str(LOW), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(LOW + 1)] * 8
