"""Two plane threads as a tunnel over real sockets: each "TUN" a SOCK_SEQPACKET pair
(one packet per read and write, as a TUN), the network UDP on 127.0.0.1 or ::1. Pings
both ways, the one eventfd signal for many packets, and the core's calls racing the
threads carrying traffic (scripts/sanitize-plane runs these under TSAN and ASAN)."""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time

import pytest

from tests.unit.planekit import (
    INNER4,
    INNER6,
    End,
    address_of,
    install_pair,
    packet,
    prefixes,
    tunnel,
)
from uspan.plane._plane import NEWS_URGENT


def _ping(sender: End, receiver: End, source: str, destination: str, n: int = 5) -> None:
    for i in range(n):
        sent = packet(source, destination, b"ping %d" % i)
        sender.write_tun(sent)
        assert receiver.read_tun() == sent


@pytest.mark.parametrize("outer", [socket.AF_INET, socket.AF_INET6], ids=["udp4", "udp6"])
def test_pings_cross_both_ways_v4_and_v6_inside(outer: int) -> None:
    with tunnel(outer) as (a, b):
        for inner in (INNER4, INNER6):
            _ping(a, b, inner[0], inner[1])
            _ping(b, a, inner[1], inner[0])
        records, _, _ = a.plane.collect()
        (record,) = records
        assert record[0] == a.peer and record[7] > 0 and record[8] > 0  # rx, tx bytes
        counts = a.plane.counters()
    assert counts["sealed"] == counts["opened"] == 10
    assert counts["decrypt_failed"] == counts["replay"] == counts["send_errors"] == 0


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_many_packets_signal_the_eventfd_once() -> None:
    with tunnel() as (a, b):
        a.plane.collect()
        b.plane.collect()
        assert not _readable(b.plane.fileno(), 0.1)
        for i in range(50):
            a.write_tun(packet(INNER4[0], INNER4[1], b"%d" % i))
        for _ in range(50):
            b.read_tun()
        assert _readable(b.plane.fileno(), 1.0)  # written once the step ends: after the TUN's
        assert os.read(b.plane.fileno(), 8) == (1).to_bytes(8, "little")  # one write
        records, _, _ = b.plane.collect()
        assert [r[0] for r in records] == [b.peer]
        assert not _readable(b.plane.fileno(), 0.1)  # nothing since the collect
        a.write_tun(packet(INNER4[0], INNER4[1]))
        b.read_tun()
        assert _readable(b.plane.fileno(), 1.0)  # the next news signals again


def test_a_punt_signals_again_while_records_wait_for_their_collect() -> None:
    """A shell that read a records-only signal defers its collect (a second at most) but
    is woken at once by a punt: the eventfd then counts NEWS_URGENT, and only once."""
    with tunnel() as (a, b):
        b.plane.collect()
        a.write_tun(packet(INNER4[0], INNER4[1]))
        b.read_tun()
        assert _readable(b.plane.fileno(), 1.0)  # written once the step ends: after the TUN's
        assert os.read(b.plane.fileno(), 8) == (1).to_bytes(8, "little")  # records
        a.write_tun(packet(INNER4[0], INNER4[1]))
        b.read_tun()
        assert not _readable(b.plane.fileno(), 0.1)  # more records: no signal
        punted = b.plane.counters()["punts"]
        for _ in range(2):  # handshake initiations: punted, not handled in the thread
            a.udp4.sendto(b"\x01\0\0\0" + bytes(144), b.udp4.getsockname())
        assert _readable(b.plane.fileno(), 1.0)
        deadline = time.monotonic() + 10  # both punted: waited for, not guessed by a sleep
        while b.plane.counters()["punts"] < punted + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        value = int.from_bytes(os.read(b.plane.fileno(), 8), "little")
        assert value == NEWS_URGENT  # one signal for both punts
        records, punts, _ = b.plane.collect()
        assert [r[0] for r in records] == [b.peer] and len(punts) == 2


def test_the_cores_calls_race_the_threads_carrying_traffic() -> None:
    """install/assign/drop/add_routes/remove_routes/add_peer/remove_peer/collect from a
    Python thread while packets flow both ways: nothing crashes, and a session
    installed at the end carries pings."""
    with tunnel() as (a, b):
        stop = threading.Event()
        failures: list[BaseException] = []

        def traffic() -> None:
            try:
                while not stop.is_set():
                    for _ in range(20):
                        a.write_tun(packet(INNER4[0], INNER4[1]))
                        b.write_tun(packet(INNER6[1], INNER6[0]))
                    for end in (a, b):
                        while select.select([end.tun], [], [], 0.001)[0]:
                            end.tun.recv(65536)
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        runner = threading.Thread(target=traffic)
        runner.start()
        index = 0x10000
        try:
            deadline = time.monotonic() + 3.0
            old: list[int] = []
            while time.monotonic() < deadline:
                index += 2
                install_pair(a.plane, a.peer, b.plane, b.peer, index, index + 1,
                             time.monotonic_ns(), roles=False)
                a.plane.assign(a.peer, old[-1] if old else -1, index, -1)
                b.plane.assign(b.peer, -1, old[-1] + 1 if old else -1, index + 1)
                for gone in old[:-1]:
                    a.plane.drop(gone)
                    b.plane.drop(gone + 1)
                old = [*old[-1:], index]
                extra = a.plane.add_peer()
                a.plane.add_routes(extra, prefixes("10.90.0.0/16", f"{INNER4[1]}/32"))
                a.plane.remove_routes(extra, prefixes(f"{INNER4[1]}/32"))
                a.plane.add_routes(a.peer, prefixes(f"{INNER4[1]}/32"))
                a.plane.remove_peer(extra)
                a.plane.collect()
                b.plane.collect()
        finally:
            stop.set()
            runner.join()
        assert not failures
        for end in (a, b):  # the traffic's stragglers (still queued or in the thread)
            while select.select([end.tun], [], [], 0.2)[0]:
                end.tun.recv(65536)
        index += 2
        install_pair(a.plane, a.peer, b.plane, b.peer, index, index + 1, time.monotonic_ns())
        _ping(a, b, INNER4[0], INNER4[1])
        _ping(b, a, INNER6[1], INNER6[0])
        assert a.plane.counters()["sealed"] > 100


def test_a_tun_closed_under_the_thread_is_let_go() -> None:
    """The far end of the TUN gone: the thread stops polling it (counted) instead of
    spinning on the hang-up, and keeps serving the network."""
    with tunnel() as (a, b):
        a.tun.close()
        deadline = time.monotonic() + 2
        while a.plane.counters()["fd_errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        wakes = a.plane.counters()["wakes"]
        time.sleep(0.2)
        assert a.plane.counters()["fd_errors"] == 1
        assert a.plane.counters()["wakes"] - wakes < 5  # not spinning
        b.write_tun(packet(INNER4[1], INNER4[0]))
        while a.plane.counters()["opened"] == 0 and time.monotonic() < deadline + 2:
            time.sleep(0.01)
        assert a.plane.counters()["opened"] == 1  # the network side still served


def test_new_sockets_after_a_rebind_carry_the_tunnel() -> None:
    """set_sockets: after B rebinds, its thread reads and sends on the new socket (A is
    told B's new endpoint, as the core would after a rebind)."""
    with tunnel() as (a, b):
        fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fresh.bind(("127.0.0.1", 0))
        fresh.setblocking(False)
        try:
            b.plane.set_sockets([fresh.fileno()])
            a.plane.set_endpoint(a.peer, *address_of(fresh))
            _ping(a, b, INNER4[0], INNER4[1])
            _ping(b, a, INNER4[1], INNER4[0])
            assert b.plane.counters()["send_errors"] == 0
        finally:
            b.plane.set_sockets([])
            fresh.close()


def test_random_datagrams_at_the_thread_are_all_counted() -> None:
    """Junk at B's socket, some longer than the thread's buffers (cut by the kernel:
    counted as bad_length), ends in exactly one count each; the tunnel still works."""
    rng = random.Random(5)
    ends = ("bad_length", "bad_type", "unknown_index", "punts")
    with tunnel() as (a, b):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sizes: list[int] = []
        try:
            for _ in range(30):  # ten at a time: the socket's buffer holds them all
                for _ in range(10):
                    size = rng.choice([1, 3, 4, 31, 32, 148, 1500, 9400, 20000])
                    head = rng.choice([b"\x04\x00\x00\x00", b"\x01\x00\x00\x00", b"\xff", b""])
                    sender.sendto((head + rng.randbytes(size))[:size], b.udp4.getsockname())
                    sizes.append(size)
                deadline = time.monotonic() + 5
                while (sum(b.plane.counters()[k] for k in ends) < len(sizes)
                       and time.monotonic() < deadline):
                    time.sleep(0.005)
                b.plane.collect()  # the punt ring does not fill
        finally:
            sender.close()
        counts = b.plane.counters()
        assert sum(counts[k] for k in ends) == len(sizes) == counts["udp_reads"]
        assert counts["bad_length"] >= sizes.count(9400) + sizes.count(20000)
        assert counts["punts_dropped"] == 0
        _ping(a, b, INNER4[0], INNER4[1])
