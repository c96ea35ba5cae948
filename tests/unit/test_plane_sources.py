"""Where the plane says a datagram came from (uspan/csrc/plane_thread.c, source_of): the
sticky source read from IP_PKTINFO beside whatever other control messages the socket
carries (review M1), and the address replies leave from rather than the one the datagram
was sent to (L1). Real sockets on loopback, two planes joined by tests/unit/planekit.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.unit.planekit import ALL_OFFLOADS, INNER4, INNER6, End, packet, tunnel
from uspan.daemon import offload
from uspan.wg.plane import endpoint_of

SO_TIMESTAMPING = 37
SOFTWARE_RX_STAMPS = 1 << 3 | 1 << 4  # SOF_TIMESTAMPING_RX_SOFTWARE | _SOFTWARE
LOOPBACK = socket.inet_aton("127.0.0.1")


@contextmanager
def _sender(*, broadcast: bool = False) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        yield sock
    finally:
        sock.close()


def _roamed(a: End, b: End, sender: socket.socket, to: tuple[str, int]) -> object:
    """B's record of a packet sealed by A and sent from ``sender`` to ``to``: the roam."""
    a.plane.collect()
    b.plane.collect()
    (sealed,) = a.plane.seal(0x1111, [packet(INNER4[0], INNER4[1])])
    sender.sendto(sealed, to)
    b.read_tun()
    deadline = time.monotonic() + 5
    while not (records := b.plane.collect()[0]) and time.monotonic() < deadline:
        time.sleep(0.005)
    (record,) = records
    return record[9]


def test_the_sticky_source_is_read_beside_a_timestamp() -> None:
    """A socket that also carries SO_TIMESTAMPING (64 bytes of control) filled the old
    64-byte control buffer: IP_PKTINFO was cut (MSG_CTRUNC) and the roam had no source."""
    with tunnel(offloads=ALL_OFFLOADS) as (a, b), _sender() as sender:
        b.udp4.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, SOFTWARE_RX_STAMPS)
        roamed = _roamed(a, b, sender, b.udp4.getsockname())
        port = sender.getsockname()[1]
    assert roamed == (LOOPBACK, port, LOOPBACK, socket.if_nametoindex("lo"))


def test_the_sticky_source_is_the_address_replies_leave_from() -> None:
    """A datagram sent to the broadcast address: IP_PKTINFO's ipi_addr is that address,
    which no reply can leave from; ipi_spec_dst is the interface's own (127.0.0.1)."""
    wildcard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wildcard.bind(("0.0.0.0", 0))
        wildcard.setblocking(False)
        offload.enable_pktinfo(wildcard)
        with tunnel(offloads=ALL_OFFLOADS) as (a, b), _sender(broadcast=True) as sender:
            b.plane.set_sockets([wildcard.fileno(), b.udp6.fileno()])
            to = ("127.255.255.255", wildcard.getsockname()[1])
            roamed = _roamed(a, b, sender, to)
            port = sender.getsockname()[1]
    finally:
        wildcard.close()
    assert roamed == (LOOPBACK, port, LOOPBACK, socket.if_nametoindex("lo"))


def test_a_sticky_source_that_is_gone_is_forgotten_and_the_core_told() -> None:
    """A's endpoint for B says to send from an address this host does not have (it went
    away): the packet still goes, from the kernel's choice, and the endpoint forgets the
    source at once (the core hears of it as a roam to the same address without one), so
    the next packets are sent once each rather than failed and resent."""
    gone = socket.inet_aton("192.0.2.55")
    with tunnel() as (a, b):
        address, port = b.udp4.getsockname()
        a.plane.set_endpoint(a.peer, socket.inet_aton(address), port, local=gone)
        a.plane.collect()
        for i in range(3):
            sent = packet(INNER4[0], INNER4[1], b"ping %d" % i)
            a.write_tun(sent)
            assert b.read_tun() == sent
        assert a.plane.counters()["sticky_failed"] == 1
        (record,) = a.plane.collect()[0]
    assert record[9] == (socket.inet_aton(address), port, b"", 0)


def test_a_link_local_endpoint_that_forgets_its_source_keeps_its_scope() -> None:
    """A link-local endpoint's interface is its scope, not only a sticky source: the roam
    the core hears of keeps it (the core's endpoint is ``fe80::1%scope``, as its own
    Endpoint.without_source keeps it). Without it the core's endpoint had no scope, so
    its own sends there failed, and it counted a roam to a new address."""
    lo = socket.if_nametoindex("lo")
    peer_address = socket.inet_pton(socket.AF_INET6, "fe80::1")
    with tunnel(socket.AF_INET6) as (a, b):
        port = b.udp6.getsockname()[1]
        a.plane.set_endpoint(a.peer, peer_address, port,
                             local=socket.inet_pton(socket.AF_INET6, "fe80::55"), ifindex=lo)
        a.plane.collect()
        a.write_tun(packet(INNER6[0], INNER6[1], b"to a link-local peer"))
        deadline = time.monotonic() + 5
        while a.plane.counters()["sticky_failed"] == 0:
            assert time.monotonic() < deadline, a.plane.counters()
            time.sleep(0.005)
        (record,) = a.plane.collect()[0]
    assert record[9] == (peer_address, port, b"", lo)
    assert endpoint_of(*record[9]).host == f"fe80::1%{lo}"
