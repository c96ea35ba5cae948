"""What the kernel hands us malformed is dropped and counted, never raised into the daemon.

A TUN fd is stood in for by one end of a datagram socketpair (one read, one packet, as
a TUN gives), so this runs without root; UDP runs on loopback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.wgnet import ipv4_packet
from uspan.daemon import gso, offload
from uspan.daemon.tun import Tun
from uspan.daemon.udp import UdpSocket


class _FakeDevice:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:  # the daemon closes what it was given; so may the fixture
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@pytest.fixture
def tun_pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    tun = Tun(_FakeDevice(ours.detach()), "fake0", 1, 1420,
              frozenset({"csum", "tso4", "tso6", "uso4", "uso6"}))
    yield tun, theirs
    tun.close()
    theirs.close()


def test_a_malformed_super_segment_is_counted_and_the_batch_goes_on(tun_pair) -> None:
    tun, kernel = tun_pair
    good = ipv4_packet("10.0.0.1", "10.0.0.2")
    tso = struct.pack("=BBHHHH", 1, gso.GSO_TCPV4, 40, 1000, 20, 16)
    kernel.send(tso + b"\x45" + bytes(30))  # claims TCPv4 TSO: far too short
    kernel.send(struct.pack("=BBHHHH", 0, 0x77, 0, 0, 0, 0) + good)  # unknown gso_type
    kernel.send(gso.VNET_NONE + good)
    assert tun.read_batch() == [good]
    assert tun.read_dropped == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=10, max_size=10), st.binary(max_size=3000))
def test_segment_refuses_garbage_only_with_offload_error(vnet: bytes, packet: bytes) -> None:
    with contextlib.suppress(gso.OffloadError):
        gso.segment(vnet, packet, 1420)


def test_a_receive_with_truncated_control_data_is_dropped_and_counted() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    offload.enable_pktinfo(rx)
    udp = UdpSocket(rx, offload_=False)
    try:
        tx.sendto(b"first", rx.getsockname())
        assert trio.run(udp.receive)[0][0] == b"first"
        # More control messages than the receive has room for: the gso_size could be lost.
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        rx.setsockopt(socket.IPPROTO_IP, 12, 1)  # IP_RECVTTL
        rx.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
        tx.sendto(b"cut", rx.getsockname())
        trio.run(trio.sleep, 0.05)
        assert udp.receive_batch() == []
        assert udp.receive_dropped == 1
    finally:
        udp.close()
        tx.close()


def test_the_daemon_keeps_running_after_a_malformed_super_segment(tun_pair) -> None:
    from uspan.daemon.daemon import Daemon
    from uspan.daemon.memory import MemoryNetwork
    from uspan.wg.drops import Drop

    tun, kernel = tun_pair
    daemon = Daemon(tun, MemoryNetwork().bind("192.0.2.1", 51820))

    async def main() -> None:
        async with daemon.running():
            kernel.send(struct.pack("=BBHHHH", 1, gso.GSO_TCPV4, 40, 1000, 20, 16) + bytes(30))
            kernel.send(gso.VNET_NONE + ipv4_packet("10.0.0.1", "10.0.0.2"))  # no route
            with trio.fail_after(5):
                while not daemon.device.counters[Drop.NO_ROUTE]:
                    await trio.sleep(0.01)
            assert tun.read_dropped == 1 and not daemon.exit_reason

    trio.run(main)
    assert daemon.stats()["tun_read_dropped"] == 1
