"""An in-memory network of sans-IO devices with a fake clock, for deterministic tests."""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass, field

from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.crypto import clamp, public_key
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint


def seeded_rng(seed: int):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def ipv4_packet(src: str, dst: str, payload: bytes = b"x" * 20) -> bytes:
    """A minimal IPv4/UDP-less packet: a 20-byte header and a payload."""
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"y" * 20) -> bytes:
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), 17, 64,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


@dataclass
class Node:
    name: str
    device: Device
    endpoint: Endpoint
    private: bytes
    public: bytes
    tun: list[bytes] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # every datagram this node emitted


class Net:
    """Devices joined by a lossless, instant network; ``now`` is the fake clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.nodes: dict[tuple[str, int], Node] = {}
        self.wire: list[tuple[bytes, Endpoint, Node]] = []  # (datagram, destination, sender)
        self.blocked: set[str] = set()  # node names whose inbound traffic is lost

    def add(self, name: str, host: str, port: int, seed: int,
            draws: list[int] | None = None) -> Node:
        """A node; the size of each draw from its rng is appended to ``draws``."""
        seeded = seeded_rng(seed)

        def rng(size: int) -> bytes:
            if draws is not None:
                draws.append(size)
            return seeded(size)

        device = Device(rng=rng)
        private = clamp(random.Random(seed + 1000).randbytes(32))
        device.apply(DeviceChange(private_key=private, listen_port=port), self.now)
        node = Node(name, device, Endpoint(host, port), private, public_key(private))
        self.nodes[(host, port)] = node
        return node

    def connect(
        self, a: Node, b: Node, a_ips: list[str], b_ips: list[str], psk: bytes | None = None,
        a_endpoint: bool = True, b_endpoint: bool = True, keepalive: int | None = None,
    ) -> None:
        """Make each a peer of the other; ``x_ips`` are the allowed IPs *of* x;
        ``keepalive``: a's persistent keepalive to b."""
        a.device.apply(DeviceChange(peers=[PeerChange(
            b.public, preshared_key=psk, endpoint=b.endpoint if a_endpoint else None,
            persistent_keepalive=keepalive,
            allowed_ips=[prefix.parse(n) for n in b_ips])]), self.now)
        b.device.apply(DeviceChange(peers=[PeerChange(
            a.public, preshared_key=psk, endpoint=a.endpoint if b_endpoint else None,
            allowed_ips=[prefix.parse(n) for n in a_ips])]), self.now)

    def emit(self, sender: Node, out: list[tuple[bytes, Endpoint]]) -> None:
        for datagram, destination in out:
            sender.sent.append(datagram)
            self.wire.append((datagram, destination, sender))

    def send(self, node: Node, packets: list[bytes]) -> None:
        self.emit(node, node.device.send(packets, self.now))

    def run(self, max_rounds: int = 50) -> None:
        """Deliver everything on the wire (and the replies it causes)."""
        for _ in range(max_rounds):
            if not self.wire:
                return
            wire, self.wire = self.wire, []
            for datagram, destination, sender in wire:
                target = self.nodes.get((destination.host, destination.port))
                if target is None or target.name in self.blocked:
                    continue
                self.deliver(target, datagram, sender)
        raise AssertionError("network did not settle")

    def deliver(self, target: Node, datagram: bytes, sender: Node) -> None:
        to_tun, out = target.device.receive([(datagram, sender.endpoint)], self.now)
        target.tun.extend(to_tun)
        self.emit(target, out)

    def tick(self, node: Node) -> None:
        self.emit(node, node.device.tick(self.now))

    def due(self, node: Node) -> float | None:
        """When ``node`` next wants ``tick``."""
        return node.device.next_deadline()

    def advance(self, seconds: float) -> None:
        """Move the clock, firing timers exactly at their deadlines."""
        end = self.now + seconds
        while True:
            deadlines = [d for d in map(self.due, self.nodes.values()) if d is not None]
            if not deadlines or min(deadlines) > end:
                break
            nxt = min(deadlines)
            self.now = max(self.now, nxt)
            for node in self.nodes.values():
                self.tick(node)
            self.run()
        self.now = end

    def peer(self, node: Node, other: Node):
        return node.device.peers[other.public]
