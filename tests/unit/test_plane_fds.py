"""The fds the plane is handed and its own: made non-blocking, a broken one let go and
reported to the shell (a counter and the eventfd), the plane's lifecycle around them."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import time

from tests.unit.planekit import MTU, Plane


def _blocking(fd: int) -> bool:
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def _wait(plane: Plane, counter: str, timeout: float = 2.0) -> int:
    deadline = time.monotonic() + timeout
    while plane.counters()[counter] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return plane.counters()[counter]


def test_blocking_fds_are_made_non_blocking() -> None:
    """A blocking TUN or socket would hang the thread in a read, and close() with it."""
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fresh = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    plane = Plane(inner.fileno(), [udp.fileno()], MTU)
    try:
        assert not _blocking(inner.fileno()) and not _blocking(udp.fileno())
        plane.set_sockets([fresh.fileno()])
        assert not _blocking(fresh.fileno())
    finally:
        plane.close()
        for sock in (inner, outer, udp, fresh):
            sock.close()


def test_a_broken_tun_is_let_go_and_reported() -> None:
    """EPOLLERR (here the write end of a pipe whose reader is gone, as a deleted TUN
    device) is a hang-up: the thread stops polling it instead of spinning, counts
    tun_lost and signals the eventfd, so the shell hears of it."""
    reader, writer = os.pipe()
    plane = Plane(writer, [], MTU)
    try:
        plane.start()
        os.close(reader)
        assert _wait(plane, "tun_lost") == 1
        assert select.select([plane.fileno()], [], [], 1.0)[0]
        wakes = plane.counters()["wakes"]
        time.sleep(0.2)
        assert plane.counters()["wakes"] - wakes < 5  # not spinning
        assert plane.counters()["fd_errors"] == 1
    finally:
        plane.close()
        os.close(writer)
