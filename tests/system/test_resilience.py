"""What a real network does to a daemon: links going down, small outer MTUs, shaped
uplinks that fill the send buffer, big fwmarks. uspan-wg keeps running and delivering."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.system.conftest import Combination, Pair
from tests.system.test_interop import INNER, assert_ping, ping, transfer, tunnel
from uspan.testbed import Lab, poll

pytestmark = pytest.mark.system


@pytest.mark.parametrize("combo", ["wireguardgo-uspan", "uspan-uspan"], indirect=True)
def test_interface_down_then_up(pair: Pair, combo: Combination) -> None:
    """Packets for a downed interface are dropped; the daemon stays (like wireguard-go)."""
    _wa, wb = tunnel(pair, combo)
    assert_ping(pair.a, INNER[4][1])
    pair.b.ip("link", "set", wb.name, "down")
    assert not ping(pair.a, INNER[4][1], count=3, wait=1)  # decrypted, refused by the TUN
    assert wb.alive()
    pair.b.ip("link", "set", wb.name, "up")
    poll(lambda: ping(pair.a, INNER[4][1]), what="ping after link up", timeout=20)
    assert wb.alive()


@pytest.mark.parametrize("combo", ["uspan-uspan", "uspan-wireguardgo"], indirect=True)
def test_outer_mtu_smaller_than_tunnel_datagrams(
    pair: Pair, combo: Combination, tmp_path: Path
) -> None:
    """Tunnel MTU 1420 over a 1400-byte link: the kernel refuses UDP_SEGMENT runs of
    1452-byte datagrams (EINVAL); they go out one by one and IP fragments them."""
    pair.a.ip("link", "set", pair.link.a_dev, "mtu", "1400")
    pair.b.ip("link", "set", pair.link.b_dev, "mtu", "1400")
    tunnel(pair, combo)
    started = time.monotonic()
    transfer(pair.a, pair.b, INNER[4][1], tmp_path, 8 << 20)
    transfer(pair.b, pair.a, INNER[6][0], tmp_path, 8 << 20)
    # A broken fallback stalls TCP at a few hundred kbit/s: 16 MB would take minutes.
    assert time.monotonic() - started < 30


def test_shaped_uplink_with_concurrent_senders(lab: Lab, tmp_path: Path) -> None:
    """A 2 Mbit/s token bucket fills the socket buffer; several tasks then wait for the
    same fd at once, which trio only allows one at a time: no crash, nothing lost."""
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.veth(a, b, ["192.0.2.1/24"], ["192.0.2.2/24"])
    a.run("tc", "qdisc", "add", "dev", link.a_dev, "root", "tbf", "rate", "2mbit",
          "burst", "16kb", "latency", "400ms")
    script = tmp_path / "senders.py"
    script.write_text(textwrap.dedent('''
        import socket, trio
        from uspan.daemon.udp import UdpBind
        from uspan.wg.endpoint import Endpoint

        async def main():
            bind = UdpBind.open(0)
            for udp in bind.sockets:
                udp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            peer = Endpoint("192.0.2.2", 40009)
            async def sender():
                for _ in range(100):
                    await bind.send([(b"x" * 1200, peer)] * 3)
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(sender)
            print("errors", bind.send_errors)

        trio.run(main)
    '''))
    done = a.run(sys.executable, str(script), timeout=120)
    assert done.stdout.strip() == "errors 0"
