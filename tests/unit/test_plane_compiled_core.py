"""The core (``uspan.wg``) on the compiled plane rather than the fake one: the parts of
docs/dataplane.md that only the C side can break (what the core seals through the plane
is the core's to count; the thread's own roam is not undone by the core)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.unit.planekit import MTU, Plane
from tests.unit.wgnet import ipv4_packet, seeded_rng
from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.constants import KEEPALIVE_TIMEOUT, MSG_TRANSPORT
from uspan.wg.crypto import clamp, public_key
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint
from uspan.wg.peer import Peer
from uspan.wg.plane import nanoseconds

A_END, B_END = Endpoint("127.0.0.1", 51820), Endpoint("127.0.0.1", 51821)
A_TO_B = ipv4_packet("10.0.0.1", "10.0.0.2", b"ab")
B_TO_A = ipv4_packet("10.0.0.2", "10.0.0.1", b"ba")


@dataclass
class Session:
    """A (core on a compiled plane) and B (no plane) with a session A initiated."""

    a: Device
    b: Device
    plane: Plane
    peer: Peer  # A's peer B
    now: float

    def thread_receives(self, packets: list[bytes], now: float) -> None:
        """B's packets reach A's thread (its UDP step), from B's endpoint."""
        sent = self.b.send(packets, now)
        datagrams = [(d, B_END.ip_key(), B_END.port) for d, _ in sent if d[0] == MSG_TRANSPORT]
        assert len(datagrams) == len(packets)
        assert len(self.plane._udp_step(datagrams, nanoseconds(now))) == len(packets)

    def shell_syncs(self, now: float) -> None:
        records, punts, events = self.plane.collect()
        self.a.sync(records, now)
        self.a.plane_events(events, now)
        self.a.punted(punts, now)


def _device(seed: int, plane: Plane | None, port: int, now: float) -> tuple[Device, bytes]:
    device = Device(rng=seeded_rng(seed), plane=plane)
    private = clamp(seeded_rng(seed + 1000)(32))
    device.apply(DeviceChange(private_key=private, listen_port=port), now)
    return device, public_key(private)


@pytest.fixture
def session() -> Iterator[Session]:
    plane = Plane(-1, [], MTU)
    try:
        now = time.monotonic()
        a, a_public = _device(1, plane, A_END.port, now)
        b, b_public = _device(2, None, B_END.port, now)
        a.apply(DeviceChange(peers=[PeerChange(b_public, endpoint=B_END,
                                               allowed_ips=[prefix.parse("10.0.0.2/32")])]), now)
        b.apply(DeviceChange(peers=[PeerChange(a_public, endpoint=A_END,
                                               allowed_ips=[prefix.parse("10.0.0.1/32")])]), now)
        ((initiation, _),) = a.send([A_TO_B], now)
        _, ((response, _),) = b.receive([(initiation, A_END)], now)
        _, staged = a.receive([(response, B_END)], now)
        to_tun, _ = b.receive([(d, A_END) for d, _ in staged], now)
        assert to_tun == [A_TO_B]
        session = Session(a, b, plane, a.peers[b_public], now)
        session.shell_syncs(now)
        yield session
    finally:
        plane.close()


def test_a_core_keepalive_is_counted_once_and_keeps_its_timer(session: Session) -> None:
    """The core's keepalive goes through plane.seal; replayed from the plane's record it
    would count twice and disarm the keepalive timer keepalive_sent re-armed."""
    peer, now = session.peer, session.now
    session.thread_receives([B_TO_A, B_TO_A], now)  # data twice: a second keepalive due
    session.shell_syncs(now)
    assert peer.timers.send_keepalive == pytest.approx(now + KEEPALIVE_TIMEOUT)
    tx = peer.tx_bytes
    later = now + KEEPALIVE_TIMEOUT
    (keepalive,) = [d for d, _ in session.a.tick(later) if d[0] == MSG_TRANSPORT]
    assert len(keepalive) == 32 and peer.tx_bytes == tx + 32
    assert peer.timers.send_keepalive == pytest.approx(later + KEEPALIVE_TIMEOUT)
    session.shell_syncs(later + 0.5)
    assert peer.tx_bytes == tx + 32  # not 64
    assert peer.timers.send_keepalive == pytest.approx(later + KEEPALIVE_TIMEOUT)
