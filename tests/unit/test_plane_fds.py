"""The fds the plane is handed and its own: made non-blocking, a broken one let go and
reported to the shell (a counter and the eventfd), the plane's lifecycle around them."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import threading
import time

import pytest

from tests.unit.planekit import INNER4, MTU, Plane, packet, prefixes, tunnel


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


def test_a_closed_and_reused_socket_number_is_never_the_threads() -> None:
    """The plane works on its own dups: the shell closing its socket and reusing the
    number for another leaves the tunnel on the socket the plane was given (until
    set_sockets), and nothing of the tunnel's on the other. The plane closes its dups
    (set_sockets, close): no fd is left behind."""
    before = set(os.listdir("/proc/self/fd"))
    with tunnel() as (a, b):
        number = b.udp4.fileno()
        b.udp4.close()
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            other.bind(("127.0.0.1", 0))
            assert other.fileno() == number  # the number reused
            for i in range(3):
                a.write_tun(packet(INNER4[0], INNER4[1], b"to b %d" % i))
                assert b.read_tun() == packet(INNER4[0], INNER4[1], b"to b %d" % i)
                b.write_tun(packet(INNER4[1], INNER4[0], b"to a %d" % i))
                assert a.read_tun() == packet(INNER4[1], INNER4[0], b"to a %d" % i)
            assert select.select([other], [], [], 0.1)[0] == []
            b.plane.set_sockets([b.udp6.fileno()])  # its dup closed at a batch boundary
        finally:
            other.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_failed_init_leaves_a_closed_plane_and_a_closed_one_inits_again() -> None:
    plane = Plane(-1, [], MTU)
    peer = plane.add_peer()
    plane.add_routes(peer, prefixes("10.1.0.0/16"))
    plane.close()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            plane.__init__(-1, [null], MTU)  # no socket
    finally:
        os.close(null)
    with pytest.raises(ValueError, match="closed"):
        plane.add_peer()
    plane.__init__(-1, [], MTU)
    try:
        assert plane.route(bytes([10, 1, 0, 1])) is None  # nothing of before
        peer = plane.add_peer()
        plane.add_routes(peer, prefixes("10.2.0.0/16"))
        assert plane.route(bytes([10, 2, 0, 1])) == peer
    finally:
        plane.close()



def _blocked(tid: str) -> int:
    with open(f"/proc/self/task/{tid}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigBlk")


def test_signals_are_blocked_in_the_thread() -> None:
    """A process signal must not land on a plane thread (a handler there, EINTR in its
    sends): it blocks them all, and the Python thread's mask is unchanged."""
    before = set(os.listdir("/proc/self/task"))
    mask = _blocked(str(threading.get_native_id()))
    wanted = 1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1) | 1 << (signal.SIGALRM - 1)
    with tunnel():
        threads = set(os.listdir("/proc/self/task")) - before
        assert len(threads) == 4  # the two planes' data and routes threads
        assert all(_blocked(tid) & wanted == wanted for tid in threads)
    assert _blocked(str(threading.get_native_id())) == mask


def test_only_the_thread_that_made_a_plane_calls_it() -> None:
    """Another Python thread's call could deadlock on the GIL and a peer's lock, or close
    the plane under a call: it is refused. counters() reads atomics: any thread."""
    plane = Plane(-1, [], MTU)
    errors: list[BaseException] = []

    def other() -> None:
        for call in (plane.add_peer, plane.collect, plane.close):
            try:
                call()
            except RuntimeError as error:
                errors.append(error)
        plane.counters()

    try:
        runner = threading.Thread(target=other)
        runner.start()
        runner.join()
        assert len(errors) == 3
        assert plane.add_peer() >= 0  # still open, for its own thread
    finally:
        plane.close()
