"""Transport keypairs: one session's keys, send counter and replay window.

``Keypair`` keeps them in Python; ``PlaneKeypair`` is the same session installed in the
C data plane (``uspan.wg.plane``), reached there by its local index, with no key bytes
kept in Python: one counter and one replay window, whoever seals or opens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from uspan.wg import transport_crypto
from uspan.wg.constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from uspan.wg.plane import nanoseconds
from uspan.wg.replay import ReplayWindow

if TYPE_CHECKING:
    from uspan.wg.handshake import TransportKeys
    from uspan.wg.peer import Peer
    from uspan.wg.plane import Plane


class Keypair:
    """A session: created by a completed handshake, valid for REJECT_AFTER_TIME."""

    __slots__ = (
        "_opener",
        "_sealer",
        "created",
        "initiator",
        "local_index",
        "peer",
        "remote_index",
        "replay",
        "send_counter",
    )

    def __init__(
        self,
        keys: TransportKeys,
        *,
        initiator: bool,
        local_index: int,
        remote_index: int,
        peer: Peer,
        now: float,
    ) -> None:
        # Looked up per session, so a test can swap the implementation.
        self._sealer = transport_crypto.Sealer(keys.send)
        self._opener = transport_crypto.Opener(keys.recv)
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer
        self.created = now
        self.send_counter = 0
        self.replay = ReplayWindow()

    def can_send(self, now: float) -> bool:
        return _can_send(self.send_counter, self.created, now)

    def can_receive(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME

    def expire_for_sending(self) -> None:
        """Make the next send need a new handshake (e.g. after a private key change)."""
        self.send_counter = REJECT_AFTER_MESSAGES

    def seal(self, packets: Sequence[bytes], mtu: int) -> list[bytes]:
        """Transport messages carrying ``packets`` (padded within ``mtu``; empty ones are
        keepalives), numbered from the send counter, which they advance."""
        counter = self.send_counter
        datagrams = self._sealer.seal(self.remote_index, counter, packets, mtu)
        self.send_counter = counter + len(datagrams)
        return datagrams

    def open(self, datagrams: Sequence[bytes]) -> list[bytes | None]:
        """The padded plaintext of each whole transport message to this session, or None
        where its tag is wrong (a forgery, or another key's)."""
        return self._opener.open(datagrams)


class PlaneKeypair:
    """A session installed in the plane: what ``Keypair`` does, done there by local index.

    Installing copies the keys into the plane (the caller drops ``keys``); the thread then
    seals and opens with them too. The plane's mtu is the shell's (``Plane.set_mtu``).
    What the core seals and opens here it counts and times itself, as with a ``Keypair``:
    the plane's records (``Device.sync``) are the thread's own traffic.
    """

    __slots__ = ("_plane", "created", "initiator", "local_index", "peer", "remote_index",
                 "replay")

    def __init__(self, plane: Plane, keys: TransportKeys, *, initiator: bool,
                 local_index: int, remote_index: int, peer: Peer, now: float) -> None:
        plane.install(peer.plane_id, local_index, remote_index, keys.send, keys.recv,
                      nanoseconds(now), initiator)
        self._plane = plane
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer
        self.created = now
        self.replay = PlaneReplay(plane, local_index)

    @property
    def send_counter(self) -> int:
        return self._plane.send_counter(self.local_index)

    def can_send(self, now: float) -> bool:
        return _can_send(self.send_counter, self.created, now)

    def can_receive(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME

    def expire_for_sending(self) -> None:
        self._plane.expire_sending(self.local_index)

    def seal(self, packets: Sequence[bytes], mtu: int) -> list[bytes]:
        return self._plane.seal(self.local_index, list(packets))

    def open(self, datagrams: Sequence[bytes]) -> list[bytes | None]:
        return self._plane.open(self.local_index, list(datagrams))


class PlaneReplay:
    """A plane keypair's replay window, as ``ReplayWindow``'s accept and accept_run."""

    __slots__ = ("_index", "_plane")

    def __init__(self, plane: Plane, local_index: int) -> None:
        self._plane = plane
        self._index = local_index

    def accept(self, counter: int) -> bool:
        return self._plane.accept(self._index, counter)

    def accept_run(self, first: int, count: int) -> bool:
        return self._plane.accept_run(self._index, first, count)


AnyKeypair = Keypair | PlaneKeypair


def _can_send(send_counter: int, created: float, now: float) -> bool:
    return send_counter < REJECT_AFTER_MESSAGES and now - created < REJECT_AFTER_TIME
