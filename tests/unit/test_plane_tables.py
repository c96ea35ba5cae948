"""The plane's tables: routes as longest prefix match for IPv4 and IPv6 (against a
brute-force model, and a million of them), keypairs by local index."""

from __future__ import annotations

import ipaddress
import os
import random
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.unit.planekit import MTU, Plane, prefixes
from uspan.wg import prefix


def test_compiled_module_is_used_when_required() -> None:
    """CI sets USPAN_REQUIRE_COMPILED=1 (scripts/test): a silent fallback fails here."""
    if os.environ.get("USPAN_REQUIRE_COMPILED") != "1":
        pytest.skip("USPAN_REQUIRE_COMPILED is not set")
    from uspan.plane import _plane

    assert _plane.Plane is Plane


def _owner(table: dict[int, int], address: bytes) -> int | None:
    """The brute-force longest match."""
    ip = ipaddress.ip_address(address)
    best: tuple[int, int] | None = None
    for p, owner in table.items():
        net = prefix.network(p)
        if net.version == ip.version and ip in net and (
                best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, owner)
    return None if best is None else best[1]


@contextmanager
def _plane(started: bool) -> Iterator[Plane]:
    """A plane on a SOCK_SEQPACKET "TUN" and a loopback socket: started, its routes
    thread applies route changes; not started, each call applies its own."""
    tun, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    plane = Plane(tun.fileno(), [udp.fileno()], MTU)  # it keeps dups of the fds
    try:
        if started:
            plane.start()
        yield plane
    finally:
        plane.close()
        for sock in (tun, far, udp):
            sock.close()


@pytest.mark.parametrize("started", [False, True], ids=["in the call", "routes thread"])
@pytest.mark.parametrize("version", [4, 6])
def test_longest_prefix_match_is_the_models(version: int, started: bool) -> None:
    rng = random.Random(version)
    width = 32 if version == 4 else 128
    with _plane(started) as plane:
        peers = [plane.add_peer() for _ in range(5)]
        table: dict[int, int] = {}
        base = rng.getrandbits(width) & ~((1 << (width - 8)) - 1)  # one /8: overlaps
        for _ in range(300):
            length = rng.choice([0, 8, 9, 12, 16, 24, width - 1, width, rng.randrange(width)])
            address = base | rng.getrandbits(width - 8)
            net = ipaddress.ip_network((address, length), strict=False)
            owner = rng.choice(peers)
            p = prefix.of(net)
            if rng.random() < 0.2 and table:  # remove one (only its owner can)
                gone = rng.choice(list(table))
                plane.remove_routes(table[gone], [gone])
                del table[gone]
            plane.add_routes(owner, [p])
            table[p] = owner
        for _ in range(300):
            address = (base | rng.getrandbits(width - 8)).to_bytes(width // 8, "big")
            assert plane.route(address) == _owner(table, address)
        plane.clear_routes(peers[0])
        table = {p: o for p, o in table.items() if o != peers[0]}
        for _ in range(100):
            address = (base | rng.getrandbits(width - 8)).to_bytes(width // 8, "big")
            assert plane.route(address) == _owner(table, address)


@pytest.mark.parametrize("started", [False, True], ids=["in the call", "routes thread"])
def test_only_the_owner_removes_a_prefix_and_a_takeover_moves_it(started: bool) -> None:
    with _plane(started) as plane:
        a, b = plane.add_peer(), plane.add_peer()
        plane.add_routes(a, prefixes("10.0.0.0/8", "fd00::/8"))
        plane.remove_routes(b, prefixes("10.0.0.0/8"))
        assert plane.route(bytes([10, 1, 2, 3])) == a
        plane.add_routes(b, prefixes("10.0.0.0/8"))
        assert plane.route(bytes([10, 1, 2, 3])) == b
        assert plane.route(bytes.fromhex("fd" + "00" * 15)) == a
        assert plane.route(bytes([11, 0, 0, 1])) is None
        for bad in ([1 << 32 | 5], [-1], [(129 << 1 | 1) << 128], ["10.0.0.0/8"]):
            with pytest.raises(ValueError):
                plane.add_routes(a, bad)  # type: ignore[list-item]
        assert plane.route(bytes([10, 1, 2, 3])) == b  # a refused call changes nothing


def _removes_set(plane: Plane, peer: int, count: int) -> float:
    """bench/control's ``removes`` as the core calls it (adds of ``count`` new /32s,
    then removals of the ``count`` the peer held, 256 a call): the calls' thread CPU."""
    old = [(11 << 24 | i) | 32 << 33 for i in range(count)]
    new = [(11 << 24 | i) | 32 << 33 for i in range(count, 2 * count)]
    for start in range(0, count, 256):
        plane.add_routes(peer, old[start:start + 256])
    plane.sync_routes()
    cpu = time.thread_time()
    for start in range(0, count, 256):
        plane.add_routes(peer, new[start:start + 256])
    for start in range(0, count, 256):
        plane.remove_routes(peer, old[start:start + 256])
    return time.thread_time() - cpu


def test_a_started_plane_changes_routes_beside_the_python_thread() -> None:
    """Once the thread runs, add_routes and remove_routes only parse and queue: the
    routes thread does the table work (cache misses, a rehash of megabytes: ~45 ms of a
    100k-prefix ``removes`` set, on the thread that runs the event loop before), in
    order, and sync_routes waits for it."""
    count = 100_000
    cpu = {}
    for started in (False, True):
        with _plane(started) as plane:
            peer = plane.add_peer()
            cpu[started] = _removes_set(plane, peer, count)
            plane.sync_routes()
            assert plane.routes_pending() == 0
            for i in (0, count - 1, count, 2 * count - 1):
                owner = None if i < count else peer
                assert plane.route((11 << 24 | i).to_bytes(4, "big")) == owner
    assert cpu[True] < 0.5 * cpu[False], f"queued {cpu[True]:.3f} s, in the call {cpu[False]:.3f} s"


def test_the_routes_fd_is_signalled_when_the_queue_drains() -> None:
    """The shell waits on ``routes_fileno`` for the queue to drain (configure's reply
    waits for its routes) instead of polling ``routes_pending``."""
    with _plane(started=True) as plane:
        peer, fd = plane.add_peer(), plane.routes_fileno()
        assert not select.select([fd], [], [], 0)[0]
        many = [(10 << 24 | i) | 32 << 33 for i in range(50_000)]
        for start in range(0, len(many), 256):
            plane.add_routes(peer, many[start:start + 256])
        while plane.routes_pending():
            assert select.select([fd], [], [], 10)[0], "the drain was not signalled"
            os.read(fd, 8)
        assert plane.route(bytes([10, 0, 195, 79])) == peer  # the last one: applied


def test_what_reads_or_clears_routes_waits_for_the_queue() -> None:
    """route(), remove_peer and clear_routes see every change queued before them, so a
    removed peer leaves no route behind for its slot's next peer."""
    with _plane(started=True) as plane:
        a, b = plane.add_peer(), plane.add_peer()
        many = [(10 << 24 | i) | 32 << 33 for i in range(50_000)]
        for start in range(0, len(many), 256):
            plane.add_routes(a, many[start:start + 256])
        plane.remove_peer(a)
        assert plane.routes_pending() == 0
        again = plane.add_peer()  # a's slot, a new generation
        assert plane.route(bytes([10, 0, 0, 7])) is None
        plane.add_routes(b, many[:256])
        plane.clear_routes(b)
        assert plane.routes_pending() == 0
        assert plane.route(bytes([10, 0, 0, 7])) is None
        plane.add_routes(again, many[:256])
        assert plane.route(bytes([10, 0, 0, 7])) == again
        for start in range(0, len(many), 256):  # left queued: close drops them
            plane.add_routes(b, many[start:start + 256])


def test_a_million_routes_insert_quickly_and_lookups_stay_right() -> None:
    plane = Plane(-1, [], MTU)
    try:
        peers = [plane.add_peer() for _ in range(4)]
        many = [(10 << 24 | i) | 32 << 33 for i in range(1_000_000)]  # 10.0.0.0 .. /32s
        start = time.process_time()
        for k, peer in enumerate(peers):
            plane.add_routes(peer, many[k::4])
        inserted = time.process_time() - start
        plane.add_routes(peers[0], prefixes("10.0.0.0/8"))
        assert inserted < 1.0, f"{inserted:.2f} s of CPU to insert a million prefixes"
        for i in (0, 1, 2, 3, 499_999, 999_999):
            assert plane.route((10 << 24 | i).to_bytes(4, "big")) == peers[i % 4]
        assert plane.route((10 << 24 | 2_000_000).to_bytes(4, "big")) == peers[0]
    finally:
        plane.close()


def test_keypairs_by_index_hold_many_and_refuse_reuse() -> None:
    plane = Plane(-1, [], MTU)
    try:
        peer = plane.add_peer()
        key = bytes(32)
        indices = random.Random(3).sample(range(1 << 32), 20_000)
        for index in indices:
            plane.install(peer, index, index, key, key, 0, False)
        with pytest.raises(ValueError):
            plane.install(peer, indices[5], 1, key, key, 0, False)
        for index in indices[::2]:
            plane.drop(index)
        plane.drop(12345678)  # unknown: a no-op
        for index in indices[:100]:
            if index in indices[::2]:
                with pytest.raises(KeyError):
                    plane.send_counter(index)
            else:
                assert plane.send_counter(index) == 0
        with pytest.raises(KeyError):  # roles are the peer's installed keypairs
            plane.assign(peer, -1, indices[0], -1)
        other = plane.add_peer()
        with pytest.raises(KeyError):
            plane.assign(other, -1, indices[1], -1)
    finally:
        plane.close()


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def test_a_big_route_table_is_on_huge_pages() -> None:
    """Every probe of a table of 100k+ routes is a cache miss; on 4 KiB pages a TLB miss
    and, while it fills, a page fault too: from 2 MiB a table asks for huge pages (the
    plane's table work of the removes set, in the call: 31 ms of CPU -> 22 ms)."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as thp:
        if "[never]" in thp.read():
            pytest.skip("transparent huge pages are off")
    with _plane(started=False) as plane:
        before = _anon_huge_kib()
        peer = plane.add_peer()
        many = [(11 << 24 | i) | 32 << 33 for i in range(200_000)]  # a 16 MiB table
        for start in range(0, len(many), 256):
            plane.add_routes(peer, many[start:start + 256])
        assert _anon_huge_kib() - before >= 4096
        assert plane.route(bytes([11, 3, 13, 63])) == peer  # 11.3.13.63: the 200,000th
