"""What the core calls on the C data plane, and what the plane hands back (docs/dataplane.md).

``Plane`` is the part of ``uspan.plane._plane.Plane`` that the sans-IO core uses: it
mirrors peers, routes, endpoints and keypair roles into it, and reaches a keypair's send
counter, AEAD and replay window through it by local index (``keypair.PlaneKeypair``).
The shell owns the rest (start, close, fds, ``collect``) and hands ``collect``'s news to
``Device.sync``, ``Device.plane_events`` and ``Device.punted``, in that order.

The news are plain tuples in the C module; the NamedTuples here name their fields. The
core unpacks them by position, so either kind works.
"""

from __future__ import annotations

import socket
from enum import IntEnum
from typing import NamedTuple, Protocol

from uspan.wg.endpoint import Endpoint

NO_KEYPAIR = -1  # a role without a keypair, in ``Plane.assign``
WANTS_SEND = 1  # PeerRecord.wants: the send side wants a handshake (age or counter)
WANTS_RECEIVE = 2  # and the receive side (an initiator's key near REJECT_AFTER_TIME)


class PuntKind(IntEnum):
    TUN = 1  # an IP packet for a peer without a usable current keypair
    UDP = 2  # a datagram the thread does not handle (handshakes, the demux's)
    EGRESS = 3  # a sealed datagram for a relayed peer


class EventKind(IntEnum):
    CONFIRMED = 1  # the thread rotated ``next`` to current on its first packet


class PeerRecord(NamedTuple):
    """One peer's traffic in the thread since the last collect. Times in monotonic ns,
    0 for none; the six timer fields are those of ``timersync.replay``."""

    peer: int
    last_sent: int
    last_received: int
    data_sent_since_received: int
    data_received_since_sent: int
    data_received_again: bool
    data_received_before_sent: bool
    rx_bytes: int
    tx_bytes: int
    roamed: tuple[bytes, int, bytes, int] | None  # (address, port, local, ifindex)
    wants: int  # WANTS_SEND | WANTS_RECEIVE


class Punt(NamedTuple):
    kind: int  # PuntKind
    peer: int | None  # the routed peer (TUN, EGRESS); None for UDP
    data: bytes
    source: tuple[bytes, int, bytes, int, int] | None  # UDP: address, port, local,
    # ifindex, socket fd


class Event(NamedTuple):
    kind: int  # EventKind
    peer: int
    local_index: int


class Plane(Protocol):
    """The plane's methods the core calls. Peer ids come from ``add_peer``; local
    indices are the core's; a stale id raises KeyError (the core never passes one)."""

    def add_peer(self) -> int: ...
    def remove_peer(self, peer: int) -> None: ...
    def set_endpoint(self, peer: int, address: bytes, port: int, *, local: bytes = b"",
                     ifindex: int = 0, relayed: bool = False) -> None: ...
    def clear_source(self, peer: int, /) -> None: ...
    def add_routes(self, peer: int, prefixes: list[int]) -> None: ...
    def remove_routes(self, peer: int, prefixes: list[int]) -> None: ...
    def sync_routes(self) -> None: ...
    def install(self, peer: int, local_index: int, remote_index: int, send_key: bytes,
                recv_key: bytes, created: int, initiator: bool) -> None: ...
    def assign(self, peer: int, previous: int, current: int, next: int) -> None: ...
    def drop(self, local_index: int) -> None: ...
    def expire_sending(self, local_index: int) -> None: ...
    def seal(self, local_index: int, packets: list[bytes]) -> list[bytes]: ...
    def open(self, local_index: int, datagrams: list[bytes]) -> list[bytes | None]: ...
    def accept(self, local_index: int, counter: int) -> bool: ...
    def accept_run(self, local_index: int, first: int, count: int) -> bool: ...
    def send_counter(self, local_index: int) -> int: ...


def nanoseconds(now: float) -> int:
    """The plane's clock (monotonic ns) for the core's ``now``."""
    return round(now * 1e9)


def seconds(stamp: int) -> float:
    """The core's time for a plane stamp (the caller checks for 0, "none")."""
    return stamp / 1e9


def mirror_endpoint(plane: Plane, peer: int, endpoint: Endpoint | None) -> None:
    """Tell the plane where ``peer``'s datagrams go: a relay's pseudo-endpoint is handed
    up instead of sent (EGRESS)."""
    if endpoint is None:
        plane.set_endpoint(peer, b"", 0)
        return
    local = endpoint.local
    plane.set_endpoint(
        peer, endpoint.ip_key(), endpoint.port,
        local=b"" if local is None else _packed(local),
        ifindex=endpoint.ifindex or _scope(endpoint.host), relayed=endpoint.discard_only)


def endpoint_of(address: bytes, port: int, local: bytes, ifindex: int) -> Endpoint:
    """The Endpoint of a source the plane reports, as the shell's reads make them; a
    link-local one keeps its interface as ``%scope`` (sends need it)."""
    host = _text(address)
    if ifindex and len(address) == 16 and address[0] == 0xFE and address[1] & 0xC0 == 0x80:
        host = f"{host}%{ifindex}"  # fe80::/10 (no ipaddress: punts come in floods)
    return Endpoint(host, port, _text(local) if local else None, ifindex)


def _scope(host: str) -> int:
    """The interface index of a link-local ``host%scope`` (a name or a number), else 0."""
    scope = host.partition("%")[2]
    if not scope:
        return 0
    return int(scope) if scope.isdigit() else socket.if_nametoindex(scope)


def _packed(host: str) -> bytes:
    host = host.split("%", 1)[0]
    return socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)


def _text(address: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(address) == 16 else socket.AF_INET, address)
