"""An in-memory data plane behind ``uspan.wg.plane.Plane``, for sans-IO tests of the core.

``FakePlane`` keeps the contract of docs/dataplane.md with real crypto (the core's own
Sealer, Opener and ReplayWindow, keyed by local index), asserts on every call that the
core passes valid peer ids and indices (and drops no keypair still in a role), and
records each peer's roles. ``tun_read`` and ``udp_read`` are the thread's per-packet work
for a test to run; ``collect`` hands back what the thread would, as plain tuples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from uspan.wg import transport_crypto
from uspan.wg.allowedips import AllowedIPs
from uspan.wg.constants import (
    DEFAULT_MTU,
    KEY_SIZE,
    MSG_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    TRANSPORT_MIN_SIZE,
)
from uspan.wg.drops import Drop
from uspan.wg.plane import (
    NO_KEYPAIR,
    WANTS_RECEIVE,
    WANTS_SEND,
    EventKind,
    PuntKind,
    nanoseconds,
)
from uspan.wg.replay import ReplayWindow

Source = tuple[bytes, int, bytes, int]  # address, port, local, ifindex
_SECOND = 1_000_000_000


@dataclass
class _Keypair:
    peer: int
    remote_index: int
    sealer: transport_crypto.Sealer
    opener: transport_crypto.Opener
    created: int
    initiator: bool
    counter: int = 0
    replay: ReplayWindow = field(default_factory=ReplayWindow)


@dataclass(eq=False)
class _Peer:
    id: int
    endpoint: tuple[bytes, int, bytes, int, bool] | None = None
    roles: list[int] = field(default_factory=lambda: [NO_KEYPAIR] * 3)
    # The record since the last collect (proto/timersync.py's Recorder, in ns).
    dirty: bool = False
    last_sent: int = 0
    last_received: int = 0
    data_sent_since_received: int = 0
    data_received_since_sent: int = 0
    data_received_again: bool = False
    data_received_before_sent: bool = False
    rx_bytes: int = 0
    tx_bytes: int = 0
    roamed: Source | None = None
    wants: int = 0

    def sent(self, now: int, data: bool, size: int) -> None:
        self.dirty = True
        self.last_sent = now
        self.data_received_since_sent = 0
        if data and not self.data_sent_since_received:
            self.data_sent_since_received = now
        self.tx_bytes += size

    def received(self, now: int, data: bool, size: int) -> None:
        self.dirty = True
        self.last_received = now
        self.data_sent_since_received = 0
        if data:
            if not self.data_received_since_sent:
                self.data_received_since_sent = now
            else:
                self.data_received_again = True
            if not self.last_sent:
                self.data_received_before_sent = True
        self.rx_bytes += size

    def take(self) -> tuple[object, ...]:
        record = (self.id, self.last_sent, self.last_received, self.data_sent_since_received,
                  self.data_received_since_sent, self.data_received_again,
                  self.data_received_before_sent, self.rx_bytes, self.tx_bytes, self.roamed,
                  self.wants)
        fresh = _Peer(self.id, self.endpoint, self.roles)
        for name in ("dirty", "last_sent", "last_received", "data_sent_since_received",
                     "data_received_since_sent", "data_received_again",
                     "data_received_before_sent", "rx_bytes", "tx_bytes", "roamed", "wants"):
            setattr(self, name, getattr(fresh, name))
        return record


class FakePlane:
    """The plane's contract in Python; ``clock()`` is the core's fake clock (seconds)."""

    def __init__(self, clock: Callable[[], float], mtu: int = DEFAULT_MTU) -> None:
        self.clock = clock
        self.mtu = mtu
        self.peers: dict[int, _Peer] = {}
        self.keypairs: dict[int, _Keypair] = {}
        self.routes: AllowedIPs[_Peer] = AllowedIPs()
        self.route_calls: list[int] = []  # prefixes per add/remove_routes call
        self.endpoint_calls = 0
        self.counters: dict[str, int] = {}
        self._ids = itertools.count(0x10001, 0x10001)  # never reused: a stale id fails
        self._punts: list[tuple[object, ...]] = []
        self._events: list[tuple[object, ...]] = []
        self.signalled: float | None = None  # when news came after the last collect

    @property
    def urgent(self) -> bool:
        """News a shell hands over at once: punts, events, a peer's wish to rekey."""
        return bool(self._punts or self._events
                    or any(peer.wants for peer in self.peers.values()))

    def _signal(self) -> None:
        if self.signalled is None:
            self.signalled = self.clock()

    def _now(self) -> int:
        return nanoseconds(self.clock())

    def _peer(self, peer: int) -> _Peer:
        assert peer in self.peers, f"stale or unknown peer id {peer:#x}"
        return self.peers[peer]

    def _keypair(self, local_index: int) -> _Keypair:
        assert local_index in self.keypairs, f"index {local_index:#x} is not installed"
        return self.keypairs[local_index]

    def _count(self, name: str, count: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + count

    # The contract's calls -------------------------------------------------------------------

    def add_peer(self) -> int:
        peer = next(self._ids)
        self.peers[peer] = _Peer(peer)
        return peer

    def remove_peer(self, peer: int) -> None:
        state = self._peer(peer)
        for index in [i for i, k in self.keypairs.items() if k.peer == peer]:
            del self.keypairs[index]
        self.routes.remove_value(state)
        del self.peers[peer]

    def set_endpoint(self, peer: int, address: bytes, port: int, *, local: bytes = b"",
                     ifindex: int = 0, relayed: bool = False) -> None:
        state = self._peer(peer)
        self.endpoint_calls += 1
        assert len(address) in (0, 4, 16) and len(local) in (0, len(address))
        assert 0 <= port < 65536 and ifindex >= 0
        state.endpoint = (address, port, local, ifindex, relayed) if address else None

    def clear_source(self, peer: int) -> None:
        state = self._peer(peer)
        if state.endpoint is not None:
            address, port, _, ifindex, relayed = state.endpoint
            state.endpoint = (address, port, b"", _scope(address, ifindex), relayed)
        if state.roamed is not None:
            address, port, _, ifindex = state.roamed
            state.roamed = (address, port, b"", _scope(address, ifindex))

    def add_routes(self, peer: int, prefixes: list[int]) -> None:
        assert type(prefixes) is list and all(type(p) is int for p in prefixes)
        self.route_calls.append(len(prefixes))
        self.routes.insert(prefixes, self._peer(peer))

    def remove_routes(self, peer: int, prefixes: list[int]) -> None:
        assert type(prefixes) is list and all(type(p) is int for p in prefixes)
        self.route_calls.append(len(prefixes))
        self.routes.remove(prefixes, self._peer(peer))

    def clear_routes(self, peer: int) -> None:
        self.routes.remove_value(self._peer(peer))

    def sync_routes(self) -> None:
        """Routes apply at once here (the C plane may queue them for its routes thread)."""

    def install(self, peer: int, local_index: int, remote_index: int, send_key: bytes,
                recv_key: bytes, created: int, initiator: bool) -> None:
        self._peer(peer)
        assert local_index not in self.keypairs, f"index {local_index:#x} installed twice"
        assert 0 <= local_index < 1 << 32 and 0 <= remote_index < 1 << 32
        assert len(send_key) == len(recv_key) == KEY_SIZE and type(created) is int
        self.keypairs[local_index] = _Keypair(
            peer, remote_index, transport_crypto.Sealer(send_key),
            transport_crypto.Opener(recv_key), created, initiator)

    def assign(self, peer: int, previous: int, current: int, next: int) -> None:
        state = self._peer(peer)
        roles = [previous, current, next]
        named = [index for index in roles if index != NO_KEYPAIR]
        assert len(set(named)) == len(named), f"a keypair in two roles: {roles}"
        for index in named:
            assert self._keypair(index).peer == peer, f"{index:#x} is another peer's"
        state.roles = roles

    def drop(self, local_index: int) -> None:
        keypair = self.keypairs.pop(local_index, None)
        if keypair is not None:
            assert local_index not in self.peers[keypair.peer].roles, "dropped in a role"

    def expire_sending(self, local_index: int) -> None:
        self._keypair(local_index).counter = REJECT_AFTER_MESSAGES

    def seal(self, local_index: int, packets: list[bytes]) -> list[bytes]:
        keypair = self._keypair(local_index)
        room = max(0, REJECT_AFTER_MESSAGES - keypair.counter)
        datagrams = keypair.sealer.seal(keypair.remote_index, keypair.counter,
                                        packets[:room], self.mtu)
        keypair.counter += len(datagrams)
        return datagrams

    def open(self, local_index: int, datagrams: list[bytes]) -> list[bytes | None]:
        return self._keypair(local_index).opener.open(datagrams)

    def accept(self, local_index: int, counter: int) -> bool:
        return self._keypair(local_index).replay.accept(counter)

    def accept_run(self, local_index: int, first: int, count: int) -> bool:
        return self._keypair(local_index).replay.accept_run(first, count)

    def send_counter(self, local_index: int) -> int:
        return self._keypair(local_index).counter

    def route(self, address: bytes) -> int | None:
        owner = self.routes.lookup(address)
        return None if owner is None else owner.id

    def collect(self) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]],
                               list[tuple[object, ...]]]:
        records = [peer.take() for peer in self.peers.values() if peer.dirty]
        punts, events = self._punts, self._events
        self._punts, self._events = [], []
        self.signalled = None
        return records, punts, events

    # Inspection ------------------------------------------------------------------------------

    def roles(self, peer: int) -> tuple[int, ...]:
        return tuple(self._peer(peer).roles)

    def installed(self) -> set[int]:
        return set(self.keypairs)

    def prefixes(self, peer: int) -> set[int]:
        return set(self.routes.prefixes(self._peer(peer)))

    # The thread's per-packet work ------------------------------------------------------------

    def tun_read(self, packets: list[bytes]) -> list[tuple[bytes, Source]]:
        """Route, seal and send IP packets; punt those without a usable current keypair."""
        now = self._now()
        self._signal()
        sent: list[tuple[bytes, Source]] = []
        for packet in packets:
            owner = self.routes.lookup(_destination(packet))
            if owner is None:
                self._count(Drop.NO_ROUTE)
                continue
            current = owner.roles[1]
            keypair = self.keypairs.get(current)
            if (keypair is None or keypair.counter >= REJECT_AFTER_MESSAGES
                    or now - keypair.created >= REJECT_AFTER_TIME * _SECOND):
                self._punts.append((PuntKind.TUN, owner.id, packet, None))
                continue
            if owner.endpoint is None:
                self._count(Drop.NO_ENDPOINT)
                continue
            (datagram,) = self.seal(current, [packet])
            owner.sent(now, True, len(datagram))
            if keypair.counter > REKEY_AFTER_MESSAGES or (
                    keypair.initiator and now - keypair.created > REKEY_AFTER_TIME * _SECOND):
                owner.wants |= WANTS_SEND
            address, port, local, ifindex, relayed = owner.endpoint
            if relayed:
                self._punts.append((PuntKind.EGRESS, owner.id, datagram, None))
            else:
                sent.append((datagram, (address, port, local, ifindex)))
        return sent

    def udp_read(self, datagrams: list[tuple[bytes, Source]]) -> list[bytes]:
        """Open, check and deliver transport messages; punt handshakes. What goes to the
        TUN is returned."""
        now = self._now()
        self._signal()
        to_tun: list[bytes] = []
        for data, source in datagrams:
            if data[0] != MSG_TRANSPORT:
                self._punts.append((PuntKind.UDP, None, data, (*source, 3)))
                continue
            if len(data) < TRANSPORT_MIN_SIZE:
                self._count(Drop.BAD_LENGTH)
                continue
            index = int.from_bytes(data[4:8], "little")
            keypair = self.keypairs.get(index)
            if keypair is None or index not in self.peers[keypair.peer].roles:
                self._count(Drop.UNKNOWN_INDEX)
                continue
            if now - keypair.created >= REJECT_AFTER_TIME * _SECOND:
                self._count(Drop.EXPIRED_KEY)
                continue
            (plaintext,) = keypair.opener.open([data])
            if plaintext is None:
                self._count(Drop.DECRYPT_FAILED)
                continue
            if not keypair.replay.accept(int.from_bytes(data[8:16], "little")):
                self._count(Drop.REPLAY)
                continue
            peer = self.peers[keypair.peer]
            endpoint = peer.endpoint
            if endpoint is None or endpoint[:4] != source:
                peer.endpoint = (*source, False)
                peer.roamed = source
            if peer.roles[2] == index:
                self.keypairs.pop(peer.roles[0], None)
                peer.roles = [peer.roles[1], index, NO_KEYPAIR]
                self._events.append((EventKind.CONFIRMED, peer.id, index))
            peer.received(now, bool(plaintext), len(data))
            if keypair.initiator and now - keypair.created > REKEY_ON_RECEIVE_AGE * _SECOND:
                peer.wants |= WANTS_RECEIVE
            if plaintext:
                packet = _unpadded(plaintext)
                if packet is None:
                    self._count(Drop.BAD_INNER_PACKET)
                elif self.routes.lookup(_source(packet)) is not peer:
                    self._count(Drop.NOT_ALLOWED_SOURCE)
                else:
                    to_tun.append(packet)
        return to_tun


def _destination(packet: bytes) -> bytes:
    return packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]


def _source(packet: bytes) -> bytes:
    return packet[12:16] if packet[0] >> 4 == 4 else packet[8:24]


def _unpadded(plaintext: bytes) -> bytes | None:
    version = plaintext[0] >> 4
    if version == 4 and len(plaintext) >= 20:
        total = int.from_bytes(plaintext[2:4], "big")
    elif version == 6 and len(plaintext) >= 40:
        total = 40 + int.from_bytes(plaintext[4:6], "big")
    else:
        return None
    return plaintext[:total] if total <= len(plaintext) else None


def _scope(address: bytes, ifindex: int) -> int:
    """What a source-less endpoint keeps of ``ifindex``: a link-local address's scope."""
    link_local = len(address) == 16 and address[0] == 0xFE and address[1] & 0xC0 == 0x80
    return ifindex if link_local else 0
