"""The plane's two per-packet steps run synchronously at chosen times (the thread runs
the same functions): what passes, what is dropped and counted, what is punted, the
traffic records, roaming and the confirm of ``next``."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.planekit import (
    INNER4,
    INNER6,
    MTU,
    SECOND,
    Plane,
    _plane,
    install_pair,
    packet,
    prefixes,
)

A_ADDR, B_ADDR = (b"\x7f\x00\x00\x01", 40001), (b"\x7f\x00\x00\x01", 40002)
IA, IB = 0x1111, 0x2222


@dataclass
class Pair:
    a: Plane
    b: Plane
    a_peer: int  # A's id for B
    b_peer: int  # B's id for A
    t0: int

    def a_to_b(self, packets: list[bytes], now: int | None = None) -> list[bytes]:
        now = self.t0 if now is None else now
        sent = self.a._tun_step(packets, now)
        return self.b._udp_step([(d, *A_ADDR) for d, _ in sent], now)

    def b_to_a(self, packets: list[bytes], now: int | None = None) -> list[bytes]:
        now = self.t0 if now is None else now
        sent = self.b._tun_step(packets, now)
        return self.a._udp_step([(d, *B_ADDR) for d, _ in sent], now)


@pytest.fixture
def pair() -> Iterator[Pair]:
    a, b = Plane(-1, [], MTU), Plane(-1, [], MTU)
    try:
        a_peer, b_peer = a.add_peer(), b.add_peer()
        a.add_routes(a_peer, prefixes(f"{INNER4[1]}/32", f"{INNER6[1]}/128"))
        b.add_routes(b_peer, prefixes(f"{INNER4[0]}/32", f"{INNER6[0]}/128"))
        a.set_endpoint(a_peer, *B_ADDR)
        b.set_endpoint(b_peer, *A_ADDR)
        t0 = time.monotonic_ns()
        install_pair(a, a_peer, b, b_peer, IA, IB, t0)
        a.collect()
        b.collect()
        yield Pair(a, b, a_peer, b_peer, t0)
    finally:
        a.close()
        b.close()


def test_packets_pass_both_ways_v4_and_v6(pair: Pair) -> None:
    four = packet(INNER4[0], INNER4[1], b"echo")
    six = packet(INNER6[0], INNER6[1], b"echo6")
    sent = pair.a._tun_step([four, six], pair.t0)
    assert [where for _, where in sent] == [(*B_ADDR, b"", 0)] * 2
    assert pair.b._udp_step([(d, *A_ADDR) for d, _ in sent], pair.t0) == [four, six]
    back = [packet(INNER4[1], INNER4[0], b"reply"), packet(INNER6[1], INNER6[0], b"reply6")]
    assert pair.b_to_a(back) == back
    assert pair.a.counters()["sealed"] == 2 and pair.a.counters()["opened"] == 2


def test_drops_are_counted_under_the_cores_names(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert a._tun_step([packet(INNER4[0], "10.99.0.1"), b"\x45\x00", b""], pair.t0) == []
    assert a.counters()["no_route"] == 1 and a.counters()["bad_inner_packet"] == 2
    # an inner source B does not route to A
    assert pair.a_to_b([packet("10.77.0.9", INNER4[1])]) == []
    assert b.counters()["not_allowed_source"] == 1
    # a plaintext that is no whole IP packet
    (junk,) = a.seal(IA, [b"\x45" + bytes(10)])
    assert b._udp_step([(junk, *A_ADDR)], pair.t0) == []
    assert b.counters()["bad_inner_packet"] == 1
    (good,) = a._tun_step([packet(INNER4[0], INNER4[1])], pair.t0)
    datagram = good[0]
    unknown = datagram[:4] + (0x9999).to_bytes(4, "little") + datagram[8:]
    forged = datagram[:-1] + bytes([datagram[-1] ^ 1])
    assert b._udp_step([(unknown, *A_ADDR), (forged, *A_ADDR)], pair.t0) == []
    assert b.counters()["unknown_index"] == 1 and b.counters()["decrypt_failed"] == 1
    assert len(b._udp_step([(datagram, *A_ADDR)], pair.t0)) == 1
    assert b._udp_step([(datagram, *A_ADDR)], pair.t0) == []
    assert b.counters()["replay"] == 1
    (late,) = a._tun_step([packet(INNER4[0], INNER4[1])], pair.t0)
    assert b._udp_step([(late[0], *A_ADDR)], pair.t0 + 180 * SECOND) == []
    assert b.counters()["expired_key"] == 1
    assert b._udp_step([(b"\x04\x00\x00\x00" + bytes(20), *A_ADDR), (b"\x04", *A_ADDR),
                        (b"\x09\x00\x00\x00" + bytes(40), *A_ADDR),
                        (b"\x01\x00\x00\x00" + bytes(10), *A_ADDR)], pair.t0) == []
    assert b.counters()["bad_length"] == 3 and b.counters()["bad_type"] == 1
    b.set_endpoint(pair.b_peer, b"", 0)
    assert b._tun_step([packet(INNER4[1], INNER4[0])], pair.t0) == []
    assert b.counters()["no_endpoint"] == 1


def test_a_new_source_roams_the_peer_and_is_reported(pair: Pair) -> None:
    (sent,) = pair.a._tun_step([packet(INNER4[0], INNER4[1])], pair.t0)
    roamed = (b"\x7f\x00\x00\x01", 40999)
    assert len(pair.b._udp_step([(sent[0], *roamed)], pair.t0)) == 1
    records, _, _ = pair.b.collect()
    assert [r[9] for r in records] == [(*roamed, b"", 0)]
    (back,) = pair.b._tun_step([packet(INNER4[1], INNER4[0])], pair.t0)
    assert back[1] == (*roamed, b"", 0)
    assert pair.b.counters()["roams"] == 1
    # a replayed or forged datagram from elsewhere proves nothing: no roam
    assert pair.b._udp_step([(sent[0], b"\x7f\x00\x00\x01", 41000)], pair.t0) == []
    assert pair.b.counters()["roams"] == 1


def test_the_first_packet_under_next_confirms_it(pair: Pair) -> None:
    a, b = pair.a, pair.b
    # B (responder) has previous 0x2222... rather: current IB, a new session as next
    install_pair(a, pair.a_peer, b, pair.b_peer, 0x3333, 0x4444, pair.t0, roles=False)
    install_pair(a, pair.a_peer, b, pair.b_peer, 0x5555, 0x6666, pair.t0, roles=False)
    b.assign(pair.b_peer, 0x6666, IB, 0x4444)  # previous, current, next
    a.assign(pair.a_peer, IA, 0x3333, -1)
    (sent,) = a._tun_step([packet(INNER4[0], INNER4[1])], pair.t0)
    assert int.from_bytes(sent[0][4:8], "little") == 0x4444
    assert len(b._udp_step([(sent[0], *A_ADDR)], pair.t0)) == 1
    _, _, events = b.collect()
    assert events == [(_plane.EVENT_CONFIRMED, pair.b_peer, 0x4444)]
    with pytest.raises(KeyError):  # the old previous is dropped and freed
        b.send_counter(0x6666)
    (back,) = b._tun_step([packet(INNER4[1], INNER4[0])], pair.t0)
    assert int.from_bytes(back[0][4:8], "little") == 0x3333  # sealed under the new current
    assert b.send_counter(IB) == 0  # the old current stays, as previous
    assert b.counters()["confirmed"] == 1


def test_a_keypair_in_no_role_opens_nothing(pair: Pair) -> None:
    """Review L5: WireGuard opens a transport message only under the previous, current
    or next keypair. One the core moved out of every role was still opened until
    drop() took it from the index table."""
    a, b = pair.a, pair.b
    (early,) = a._tun_step([packet(INNER4[0], INNER4[1])], pair.t0)
    (late,) = a._tun_step([packet(INNER4[0], INNER4[1])], pair.t0)
    assert len(b._udp_step([(early[0], *A_ADDR)], pair.t0)) == 1
    b.collect()
    b.assign(pair.b_peer, -1, -1, -1)  # in no role, still installed
    assert b._udp_step([(late[0], *A_ADDR)], pair.t0) == []
    assert b.counters()["unknown_index"] == 1 and b.counters()["opened"] == 1
    assert b.collect() == ([], [], [])  # no traffic, no roam recorded
    b.assign(pair.b_peer, IB, -1, -1)  # previous again: it opens
    assert len(b._udp_step([(late[0], *A_ADDR)], pair.t0)) == 1


def test_punts_of_each_kind(pair: Pair) -> None:
    a, b = pair.a, pair.b
    lonely = a.add_peer()
    a.add_routes(lonely, prefixes("10.88.0.0/16"))
    stray = packet(INNER4[0], "10.88.1.1")
    assert a._tun_step([stray], pair.t0) == []
    initiation = b"\x01\x00\x00\x00" + os.urandom(144)
    demux = b"\xff" + os.urandom(40)
    assert b._udp_step([(initiation, *A_ADDR), (demux, *A_ADDR)], pair.t0) == []
    a.set_endpoint(pair.a_peer, b"", 0, relayed=True)
    relayed = packet(INNER4[0], INNER4[1])
    assert a._tun_step([relayed], pair.t0) == []
    _, punts, _ = a.collect()
    assert punts[0] == (_plane.PUNT_TUN, lonely, stray, None)
    kind, peer, egress, source = punts[1]
    assert (kind, peer, source) == (_plane.PUNT_EGRESS, pair.a_peer, None)
    assert b._udp_step([(egress, *A_ADDR)], pair.t0) == [relayed]  # a sealed datagram
    _, punts, _ = b.collect()
    assert punts == [(_plane.PUNT_UDP, None, initiation, (*A_ADDR, b"", 0, -1)),
                     (_plane.PUNT_UDP, None, demux, (*A_ADDR, b"", 0, -1))]
    # an expired current keypair punts as well
    assert a._tun_step([relayed], pair.t0 + 180 * SECOND) == []
    _, punts, _ = a.collect()
    assert [p[0] for p in punts] == [_plane.PUNT_TUN]


def _flood(plane: Plane, destination: str, count: int, now: int) -> None:
    for _ in range(count // 32):  # the hook's batch: 32 packets
        plane._tun_step([packet(INNER4[0], destination)] * 32, now)


def test_a_local_flood_leaves_room_for_the_handshake_that_ends_it(pair: Pair) -> None:
    """Review M4: packets for peers without a session punt (the core stages 128 a peer),
    and once filled the shared ring also dropped the handshakes that would give them
    one. A peer's TUN punts stop at 128 a collect, TUN punts leave 64 slots to UDP."""
    a = pair.a
    lonely = [a.add_peer(), a.add_peer()]
    for peer, net in zip(lonely, ("10.88.0.0/16", "10.89.0.0/16"), strict=True):
        a.add_routes(peer, prefixes(net))
    _flood(a, "10.88.1.1", 320, pair.t0)
    _flood(a, "10.89.1.1", 320, pair.t0)
    initiation = b"\x01\x00\x00\x00" + os.urandom(144)
    assert a._udp_step([(initiation, *B_ADDR)], pair.t0) == []
    _, punts, _ = a.collect()
    kinds = [(kind, peer) for kind, peer, _, _ in punts]
    assert kinds.count((_plane.PUNT_TUN, lonely[0])) == 128
    assert kinds.count((_plane.PUNT_TUN, lonely[1])) == 256 - 64 - 128
    assert kinds[-1] == (_plane.PUNT_UDP, None)
    counts = a.counters()
    assert counts["tun_punts_dropped"] == 640 - 192 and counts["udp_punts_dropped"] == 0
    assert counts["punts_dropped"] == 640 - 192
    _flood(a, "10.89.1.1", 32, pair.t0)  # a new collect round: the cap starts again
    assert len(a.collect()[1]) == 32


def test_an_egress_punt_the_ring_drops_is_not_counted_sent(pair: Pair) -> None:
    """Review L4: a relayed peer's datagram counts as sent only once the ring has it."""
    a = pair.a
    a.set_endpoint(pair.a_peer, b"", 0, relayed=True)
    for _ in range(9):  # 288: more than the ring holds
        a._tun_step([packet(INNER4[0], INNER4[1])] * 32, pair.t0)
    (record,), punts, _ = a.collect()
    assert a.counters()["punts_dropped"] == 288 - len(punts) > 0
    assert record[8] == sum(len(data) for _, _, data, _ in punts)  # tx_bytes


def test_collect_loses_nothing_to_a_memory_error(pair: Pair) -> None:
    """Review L10: collect took the records and punts out of the plane, then built their
    Python objects; a MemoryError in between lost them. Every allocation in turn fails
    here: what one collect could not return, the next one does."""
    _testcapi = pytest.importorskip("_testcapi")
    a = pair.a
    lonely = a.add_peer()
    a.add_routes(lonely, prefixes("10.88.0.0/16"))
    strays = [packet(INNER4[0], "10.88.1.1", bytes([n])) for n in range(3)]
    complete = 0
    nothing: tuple[list[Any], list[Any], list[Any]] = ([], [], [])  # built before: the
    # except clause runs with the hooks still failing every allocation
    for fail_at in range(60):
        sent = a._tun_step([packet(INNER4[0], INNER4[1]), *strays], pair.t0)
        _testcapi.set_nomemory(fail_at, 0)
        try:
            first = a.collect()
        except MemoryError:
            first = nothing
        finally:
            _testcapi.remove_mem_hooks()
        second = a.collect()
        records = first[0] + second[0]
        assert [r[0] for r in records] == [pair.a_peer], fail_at
        assert records[0][8] == len(sent[0][0]), fail_at  # tx_bytes
        assert [p[2] for p in first[1] + second[1]] == strays, fail_at
        complete += len(first[1]) == len(strays)
    assert 0 < complete < 60  # failures before, inside and after the punts


def test_clear_source_forgets_the_source_of_the_endpoint_the_thread_has(pair: Pair) -> None:
    a = pair.a
    a.set_endpoint(pair.a_peer, *B_ADDR, local=b"\x7f\x00\x00\x01", ifindex=1)
    a.clear_source(pair.a_peer)
    ping = packet(INNER4[0], INNER4[1])
    assert [where for _, where in a._tun_step([ping], pair.t0)] == [(*B_ADDR, b"", 0)]
    roamed = (b"\x7f\x00\x00\x01", 40999)
    (sent,) = pair.b._tun_step([packet(INNER4[1], INNER4[0])], pair.t0)
    assert a._udp_step([(sent[0], *roamed)], pair.t0) != []
    a.clear_source(pair.a_peer)
    assert [where for _, where in a._tun_step([ping], pair.t0)] == [(*roamed, b"", 0)]
    with pytest.raises(KeyError):
        a.clear_source(pair.a_peer + 1)


def test_clear_source_keeps_the_scope_of_a_link_local_roam(pair: Pair) -> None:
    """clear_source zeroed the ifindex of a roam not yet collected: the core then heard
    of a link-local endpoint without its ``%scope`` (no use for sending, and a new
    address). Both the endpoint and the pending roam keep the interface."""
    a = pair.a
    link_local = (b"\xfe\x80" + bytes(13) + b"\x01", 40999)
    (sent,) = pair.b._tun_step([packet(INNER4[1], INNER4[0])], pair.t0)
    assert a._udp_step([(sent[0], *link_local, 7)], pair.t0) != []  # came on interface 7
    a.clear_source(pair.a_peer)
    (record,), _, _ = a.collect()
    assert record[9] == (*link_local, b"", 7)
    ping = packet(INNER4[0], INNER4[1])
    assert [where for _, where in a._tun_step([ping], pair.t0)] == [(*link_local, b"", 7)]


def test_a_keypair_created_in_the_future_fails_closed(pair: Pair) -> None:
    """A creation ahead of the clock (a clock not to be trusted) is no key that never
    expires: install refuses more than 1 s ahead, and the steps find one that is ahead
    of their clock by more than that expired (punted, counted)."""
    a, b = pair.a, pair.b
    with pytest.raises(ValueError):
        a.install(pair.a_peer, 0x5555, 0x6666, bytes(32), bytes(32),
                  time.monotonic_ns() + 2 * SECOND, True)
    ahead = time.monotonic_ns() + SECOND // 2
    install_pair(a, pair.a_peer, b, pair.b_peer, 0x5555, 0x6666, ahead)
    ping = packet(INNER4[0], INNER4[1])
    (sent,) = a._tun_step([ping], ahead)
    assert b._udp_step([(sent[0], *A_ADDR)], ahead - SECOND // 2) == [ping]  # within 1 s
    assert b._udp_step([(a.seal(0x5555, [ping])[0], *A_ADDR)], ahead - 2 * SECOND) == []
    assert b.counters()["expired_key"] == 1
    a.collect()
    assert a._tun_step([ping], ahead - 2 * SECOND) == []
    _, punts, _ = a.collect()
    assert punts == [(_plane.PUNT_TUN, pair.a_peer, ping, None)]


def test_no_confirm_is_lost_however_many_come_between_collects() -> None:
    """A confirm the core never hears of leaves its roles behind the thread's for good:
    more confirms than any ring would hold all reach the next collect."""
    peers = 1100
    a, b = Plane(-1, [], MTU), Plane(-1, [], MTU)
    try:
        now = time.monotonic_ns()
        keepalives = []
        for i in range(peers):
            a_peer, b_peer = a.add_peer(), b.add_peer()
            install_pair(b, b_peer, a, a_peer, 0x10000 + i, 0x20000 + i, now, roles=False)
            b.assign(b_peer, -1, 0x10000 + i, -1)
            a.assign(a_peer, -1, -1, 0x20000 + i)  # next, confirmed by its first packet
            keepalives.append((b.seal(0x10000 + i, [b""])[0], *B_ADDR))
        for first in range(0, peers, 32):
            a._udp_step(keepalives[first:first + 32], now)
        _, _, events = a.collect()
        assert sorted(index for _, _, index in events) == [0x20000 + i for i in range(peers)]
        assert a.counters()["confirmed"] == peers
    finally:
        a.close()
        b.close()


def test_a_stale_peer_id_is_refused(pair: Pair) -> None:
    a = pair.a
    a.remove_peer(pair.a_peer)
    for call in (lambda: a.set_endpoint(pair.a_peer, *B_ADDR),
                 lambda: a.add_routes(pair.a_peer, prefixes("10.1.0.0/16")),
                 lambda: a.install(pair.a_peer, 9, 9, bytes(32), bytes(32), 0, False),
                 lambda: a.remove_peer(pair.a_peer)):
        with pytest.raises(KeyError):
            call()
    reused = a.add_peer()
    assert reused != pair.a_peer and reused & 0xFFFFFFFF == pair.a_peer & 0xFFFFFFFF
    with pytest.raises(KeyError):
        a.clear_routes(pair.a_peer)
    assert a.route(bytes([10, 77, 0, 2])) is None  # its routes went with it
    with pytest.raises(KeyError):
        a.send_counter(IA)  # and its keypairs


# proto/timersync.py's Recorder, ported with ns times (0: none), the C record's twin.
@dataclass
class Record:
    last_sent: int = 0
    last_received: int = 0
    data_sent_since_received: int = 0
    data_received_since_sent: int = 0
    data_received_again: bool = False
    data_received_before_sent: bool = False


class Recorder:
    def __init__(self) -> None:
        self.record = Record()

    def sent(self, now: int, data: bool) -> None:
        r = self.record
        r.last_sent = now
        r.data_received_since_sent = 0
        if data and not r.data_sent_since_received:
            r.data_sent_since_received = now

    def received(self, now: int, data: bool) -> None:
        r = self.record
        r.last_received = now
        r.data_sent_since_received = 0
        if data:
            if not r.data_received_since_sent:
                r.data_received_since_sent = now
            else:
                r.data_received_again = True
            if not r.last_sent:
                r.data_received_before_sent = True

    def take(self) -> Record:
        record, self.record = self.record, Record()
        return record


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["send", "recv", "keepalive_in", "collect"]),
                                st.integers(1, 10**9)), max_size=30))
def test_records_are_the_recorders(steps: list[tuple[str, int]]) -> None:
    """A's record between collects equals the Recorder fed the same events."""
    a, b = Plane(-1, [], MTU), Plane(-1, [], MTU)
    try:
        a_peer, b_peer = a.add_peer(), b.add_peer()
        a.add_routes(a_peer, prefixes(f"{INNER4[1]}/32"))
        b.add_routes(b_peer, prefixes(f"{INNER4[0]}/32"))
        a.set_endpoint(a_peer, *B_ADDR)
        b.set_endpoint(b_peer, *A_ADDR)
        now = time.monotonic_ns()
        install_pair(a, a_peer, b, b_peer, IA, IB, now)
        recorder, rx, tx = Recorder(), 0, 0

        def check() -> None:
            nonlocal rx, tx
            expected = recorder.take()
            records, _, _ = a.collect()
            if expected == Record():
                assert records == []
            else:
                (r,) = records
                assert r[0] == a_peer and Record(*r[1:7]) == expected
                assert (r[7], r[8], r[9], r[10]) == (rx, tx, None, 0)
            rx = tx = 0

        for kind, step in steps:
            now += step
            if kind == "send":
                (sent,) = a._tun_step([packet(INNER4[0], INNER4[1])], now)
                recorder.sent(now, True)
                tx += len(sent[0])
            elif kind == "collect":
                check()
            else:
                inner = [packet(INNER4[1], INNER4[0])] if kind == "recv" else [b""]
                (datagram,) = b.seal(IB, inner)
                a._udp_step([(datagram, *B_ADDR)], now)
                recorder.received(now, kind == "recv")
                rx += len(datagram)
        check()
    finally:
        a.close()
        b.close()


def test_seal_is_not_recorded_and_the_threads_sends_want_rekeying(pair: Pair) -> None:
    """The core counts and times what it seals itself (docs/dataplane.md, "Sync")."""
    assert len(pair.a.seal(IA, [b"", packet(INNER4[0], INNER4[1])])) == 2
    assert pair.a.collect() == ([], [], [])
    old = pair.t0 - 170 * SECOND  # an initiator's keypair past both rekey ages
    install_pair(pair.a, pair.a_peer, pair.b, pair.b_peer, 0x7777, 0x8888, old)
    pair.b.assign(pair.b_peer, -1, IB, 0x8888)
    assert pair.a_to_b([packet(INNER4[0], INNER4[1])])
    (record,), _, _ = pair.a.collect()
    assert record[10] == 1  # the send side wants a handshake
    pair.b.assign(pair.b_peer, -1, 0x8888, -1)
    assert pair.b_to_a([packet(INNER4[1], INNER4[0])])
    (record,), _, _ = pair.a.collect()
    assert record[10] == 2  # the receive side does


def test_random_bytes_are_dropped_and_counted(pair: Pair) -> None:
    """Fuzz-style: every random datagram and packet ends in exactly one count."""
    rng = random.Random(1)
    before_b, before_a = pair.b.counters(), pair.a.counters()
    datagrams, packets = 0, 0
    for _ in range(400):
        batch = []
        for _ in range(rng.randrange(1, 20)):
            kind = rng.choice([b"", b"\x04\x00\x00\x00", b"\x01\x00\x00\x00", b"\xff"])
            data = kind + rng.randbytes(rng.choice([0, 3, 12, 28, 60, 144, 1500]))
            if kind == b"\x04\x00\x00\x00" and rng.random() < 0.5:
                data = data[:4] + IB.to_bytes(4, "little") + data[8:]  # a known index
            batch.append((data, *A_ADDR))
        datagrams += len(batch)
        assert pair.b._udp_step(batch, pair.t0) == []
        inner = [rng.choice([b"\x45", b"\x60", b""]) + rng.randbytes(rng.randrange(0, 200))
                 for _ in range(rng.randrange(1, 20))]
        packets += len(inner)
        pair.a._tun_step(inner, pair.t0)
        pair.a.collect()
        pair.b.collect()
    after_b, after_a = pair.b.counters(), pair.a.counters()
    ends = ("bad_length", "bad_type", "unknown_index", "decrypt_failed", "punts")
    assert sum(after_b[k] - before_b[k] for k in ends) == datagrams
    ends = ("bad_inner_packet", "no_route", "sealed")
    assert sum(after_a[k] - before_a[k] for k in ends) == packets
