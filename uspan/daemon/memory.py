"""In-memory ports: a TUN and UDP binds joined by a simulated network.

They let tests (and simulations of many nodes) run real ``Daemon``s without root, under
``trio.testing.MockClock``, with exact timing: delivery is instant and in order, and
every datagram is recorded with the time it was sent.
"""

from __future__ import annotations

import contextlib
import errno
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from uspan.daemon.ports import BindPort, Datagram, GateDone, GatePlan, TunGone, TunPort
from uspan.daemon.tun import BATCH
from uspan.wg.admission import KernelFilter
from uspan.wg.constants import DEFAULT_MTU
from uspan.wg.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class Sent:
    """One datagram as the network saw it."""

    time: float
    source: tuple[str, int]
    destination: tuple[str, int]
    data: bytes
    delivered: bool


class MemoryNetwork:
    """Binds addressed by (host, port); ``cut`` links to lose what crosses them."""

    def __init__(self) -> None:
        self.binds: dict[tuple[str, int], MemoryBind] = {}
        self.sent: list[Sent] = []
        self.cut: set[tuple[tuple[str, int], tuple[str, int]]] = set()  # (from, to)
        self._next_port = 40000

    def bind(self, host: str, port: int = 0, fwmark: int = 0) -> MemoryBind:
        """A bind on ``host:port`` (0 = a free port); OSError EADDRINUSE if taken."""
        if port == 0:
            while (host, self._next_port) in self.binds:
                self._next_port += 1
            port = self._next_port
        if (host, port) in self.binds:
            raise OSError(errno.EADDRINUSE, f"{host}:{port} is in use")
        bind = MemoryBind(self, host, port, fwmark)
        self.binds[(host, port)] = bind
        return bind

    def deliver(self, source: tuple[str, int], datagrams: list[Datagram]) -> None:
        now = trio.current_time()
        for data, endpoint in datagrams:
            target = self.binds.get(endpoint.address)
            delivered = target is not None and (source, endpoint.address) not in self.cut
            self.sent.append(Sent(now, source, endpoint.address, data, delivered))
            if target is not None and delivered:
                target.arrive(data, source)


class MemoryBind:
    """A ``BindPort`` on a ``MemoryNetwork``: one receive queue, never a send error."""

    def __init__(self, network: MemoryNetwork, host: str, port: int, fwmark: int) -> None:
        self.network = network
        self.host = host
        self.port = port
        self.fwmark = fwmark
        self.send_errors = 0
        self.receive_dropped = 0
        self.socket_drops = 0  # nothing drops before the reader
        self._in, self._out = trio.open_memory_channel[Datagram](math.inf)
        self._sources: dict[tuple[str, int], Endpoint] = {}

    @property
    def receivers(self) -> list[MemoryBind]:
        return [self]

    def arrive(self, data: bytes, source: tuple[str, int]) -> None:
        endpoint = self._sources.get(source)
        if endpoint is None:
            endpoint = self._sources[source] = Endpoint(*source)
        with contextlib.suppress(trio.BrokenResourceError):  # closed meanwhile
            self._in.send_nowait((data, endpoint))

    async def receive(self) -> list[Datagram]:
        """Trio.ClosedResourceError once closed, as a closed socket does."""
        batch = [await self._out.receive()]
        while True:
            try:
                batch.append(self._out.receive_nowait())
            except trio.WouldBlock:
                return batch

    async def send(self, datagrams: list[Datagram]) -> list[Endpoint]:
        self.network.deliver((self.host, self.port), datagrams)
        await trio.lowlevel.checkpoint()
        return []

    def rebind(self, port: int, fwmark: int) -> MemoryBind:
        return self.network.bind(self.host, port, fwmark)

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark

    def drop_unproven(self, rules: KernelFilter) -> None:
        """Nothing to do: an in-memory queue has no kernel behind it to spare."""

    def backlog(self) -> float:
        return 0.0  # delivery never waits for the reader

    def set_gate(self, plan: GatePlan, done: GateDone) -> bool:
        return False  # no socket to read in C: the core judges every datagram

    def filenos(self) -> list[int]:
        return []  # nothing a data plane could read

    def describe(self) -> str:
        return f"memory={self.host}:{self.port}"

    def close(self) -> None:
        if self.network.binds.get((self.host, self.port)) is self:
            del self.network.binds[(self.host, self.port)]
        self._out.close()  # a task waiting in receive() gets ClosedResourceError


class MemoryTun:
    """A ``TunPort`` whose packets come from ``inject`` and go to ``written``.

    Injected packets wait in a queue, as in the kernel's: a ``read`` woken for them may
    find that ``read_batch`` took them first."""

    def __init__(self, mtu: int = DEFAULT_MTU) -> None:
        self.mtu = mtu
        self.read_dropped = 0
        self.write_dropped = 0
        self.written: list[bytes] = []
        self._new_mtu = mtu
        self._queue: list[bytes] = []
        self._readable = trio.lowlevel.ParkingLot()
        self._gone = False
        self._written_in, self._written_out = trio.open_memory_channel[bytes](math.inf)

    def inject(self, *packets: bytes) -> None:
        """Packets the host routed into the tunnel."""
        self._queue += packets
        self._readable.unpark_all()

    async def next_written(self) -> bytes:
        """Wait for the next packet the device delivered to the host."""
        return await self._written_out.receive()

    def delete(self) -> None:
        """The interface is deleted: a read raises TunGone once the queue is empty."""
        self._gone = True
        self._readable.unpark_all()

    def set_mtu(self, mtu: int) -> None:
        self._new_mtu = mtu

    async def read(self) -> list[bytes]:
        """As the kernel TUN's: always a schedule point, at most ``BATCH`` packets."""
        while True:
            if self._queue:
                await trio.lowlevel.checkpoint()
            elif self._gone:
                raise TunGone(errno.EBADFD, "TUN read failed: interface deleted")
            else:
                await self._readable.park()
            if packets := self.read_batch(BATCH):
                return packets

    def read_batch(self, limit: int) -> list[bytes]:
        packets, self._queue = self._queue[:limit], self._queue[limit:]
        return packets

    async def write(self, packets: list[bytes]) -> None:
        self.written.extend(packets)
        for packet in packets:
            self._written_in.send_nowait(packet)

    def refresh_mtu(self) -> bool:
        changed, self.mtu = self._new_mtu != self.mtu, self._new_mtu
        return changed

    def describe(self) -> str:
        return "tun=memory"

    def check(self) -> None:
        if self._gone:
            raise TunGone(errno.EBADFD, "TUN gone: interface deleted")

    def close(self) -> None:
        self.delete()


if TYPE_CHECKING:  # mypy keeps the fakes true to the Protocols the daemon is typed with

    def _conforms(tun: MemoryTun, bind: MemoryBind) -> tuple[TunPort, BindPort]:
        return tun, bind
