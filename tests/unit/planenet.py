"""Devices with and without a (fake) data plane on an in-memory network and a fake clock.

A node with a plane runs as the shell will: the "thread" (``FakePlane.tun_read`` and
``udp_read``) does the per-packet work, and the node hands ``collect()`` to
``Device.sync``, ``plane_events`` and ``punted``, in that order: at once for punts, events
and wishes to rekey, else SYNC_DELAY after the thread's first news, and before every tick.
A node without one runs today's ``Device.send`` / ``receive``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.unit.fakeplane import FakePlane, Source
from tests.unit.wgnet import Net, seeded_rng
from uspan.wg.config import DeviceChange
from uspan.wg.crypto import clamp, public_key
from uspan.wg.device import Device, Out
from uspan.wg.endpoint import Endpoint
from uspan.wg.peer import Peer

SYNC_DELAY = 1.0  # the shell syncs at most this long after the thread's first news


def _no_jitter() -> int:
    return 0


@dataclass(eq=False)
class Node:
    net: PlaneNet
    name: str
    device: Device
    plane: FakePlane | None
    endpoint: Endpoint
    public: bytes
    tun: list[bytes] = field(default_factory=list)
    sent: list[tuple[float, bytes]] = field(default_factory=list)  # what it emitted, when

    def from_tun(self, packets: list[bytes]) -> None:
        now = self.net.now
        if self.plane is None:
            self._emit(self.device.send(packets, now))
            return
        for datagram, (address, port, _, _) in self.plane.tun_read(packets):
            self._emit([(datagram, Endpoint(socket.inet_ntop(_family(address), address),
                                            port))])
        if self.plane.urgent:
            self.news()

    def from_udp(self, datagram: bytes, source: Endpoint) -> None:
        now = self.net.now
        if self.plane is None:
            to_tun, out = self.device.receive([(datagram, source)], now)
            self.tun += to_tun
            self._emit(out)
            return
        self.tun += self.plane.udp_read([(datagram, _packed(source))])
        if self.plane.urgent:
            self.news()

    def news(self) -> None:
        """The shell's collect and hand-over (nothing without a plane)."""
        if self.plane is None:
            return
        now, device = self.net.now, self.device
        records, punts, events = self.plane.collect()
        self._emit(device.sync(records, now))  # plain tuples
        self._emit(device.plane_events(events, now))
        self._emit(device.punted(punts, now))

    def sync_due(self) -> float | None:
        """When the shell syncs the thread's news that is not urgent."""
        signalled = None if self.plane is None else self.plane.signalled
        return None if signalled is None else signalled + SYNC_DELAY

    def tick(self) -> None:
        self.news()  # a sync before every timer pass
        self._emit(self.device.tick(self.net.now))

    def peer(self, other: Node) -> Peer:
        return self.device.peers[other.public]

    def _emit(self, out: Out) -> None:
        for datagram, destination in out:
            self.sent.append((self.net.now, datagram))
            self.net.wire.append((datagram, destination, self))


class PlaneNet(Net):
    """``wgnet.Net`` of nodes with or without a plane; ``lose`` drops datagrams in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.lose: Callable[[bytes, Node], bool] = lambda datagram, sender: False

    def add(self, name: str, host: str, port: int, seed: int, *,
            plane: bool, jitter: bool = True) -> Node:
        fake = FakePlane(lambda: self.now) if plane else None
        device = Device(rng=seeded_rng(seed), plane=fake)
        if not jitter:
            device.jitter = _no_jitter  # exact deadlines
        private = clamp(seeded_rng(seed + 1000)(32))
        device.apply(DeviceChange(private_key=private, listen_port=port), self.now)
        node = Node(self, name, device, fake, Endpoint(host, port), public_key(private))
        self.nodes[(host, port)] = node
        return node

    def sync(self) -> None:
        """Every node's news now, as the shell's sync before a get."""
        for node in self.nodes.values():
            node.news()

    def deliver(self, target: Node, datagram: bytes, sender: Node) -> None:
        if not self.lose(datagram, sender):
            target.from_udp(datagram, sender.endpoint)

    def tick(self, node: Node) -> None:
        node.tick()

    def due(self, node: Node) -> float | None:
        """Its timers, or the shell's sync of the thread's news, whichever is first."""
        times = [t for t in (node.sync_due(), node.device.next_deadline()) if t is not None]
        return min(times, default=None)


def _family(address: bytes) -> int:
    return socket.AF_INET6 if len(address) == 16 else socket.AF_INET


def _packed(endpoint: Endpoint) -> Source:
    return (endpoint.ip_key(), endpoint.port, b"", 0)
