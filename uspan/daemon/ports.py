"""What the daemon needs from a TUN and from a UDP bind, as Protocols.

The daemon is built from ports it is given, so a program can hand it real devices
(``tun.Tun``, ``udp.UdpBind``) and tests can hand it in-memory ones (``memory``) and run
it under ``trio.testing.MockClock`` without root.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from uspan.wg.admission import KernelFilter
from uspan.wg.endpoint import Endpoint
from uspan.wg.plane import Plane
from uspan.wg.verdict import Counts, Plan

# The core's side of a read in C: what it may do now (None: read in Python), and what it did.
GatePlan = Callable[[], Plan | None]
GateDone = Callable[[Counts], None]

Datagram = tuple[bytes, Endpoint]


class TunError(OSError):
    """The TUN device could not be opened or failed."""


class TunGone(TunError):
    """The interface was deleted: its fd reports EBADFD/EIO/... on read or write."""


class TunPort(Protocol):
    """The tunnel side: IP packets in batches.

    ``read`` and ``write`` raise ``TunGone`` once the interface is deleted (the daemon
    stops cleanly) and ``TunError`` when it fails (the daemon stops, code 1).
    """

    @property
    def mtu(self) -> int: ...

    @property
    def read_dropped(self) -> int:
        """Super-segments that could not be split."""
        ...

    @property
    def write_dropped(self) -> int:
        """Packets the kernel refused."""
        ...

    async def read(self) -> list[bytes]:
        """Wait for packets, then return a batch of them (never empty)."""
        ...

    def read_batch(self, limit: int) -> list[bytes]:
        """The packets queued now (of at most ``limit`` reads), without waiting; often none."""
        ...

    async def write(self, packets: list[bytes]) -> None:
        """Deliver decrypted packets; refusals are counted, not raised."""
        ...

    def refresh_mtu(self) -> bool:
        """Re-read the MTU; True if it changed."""
        ...

    def describe(self) -> str:
        """Its offloads, for the start-up log line."""
        ...

    def check(self) -> None:
        """Raise TunGone if the interface was deleted (when the data plane reads it)."""
        ...

    def close(self) -> None: ...


class DatagramReceiver(Protocol):
    """One receive queue of a bind (the real one has one per address family)."""

    async def receive(self) -> list[Datagram]:
        """Wait for datagrams, then return a batch; trio.ClosedResourceError once closed."""
        ...


class BindPort(Protocol):
    """The network side: datagrams to and from endpoints on one port."""

    @property
    def port(self) -> int: ...

    @property
    def fwmark(self) -> int: ...

    @property
    def send_errors(self) -> int: ...

    @property
    def receive_dropped(self) -> int:
        """Receives dropped because they could not be read whole."""
        ...

    @property
    def socket_drops(self) -> int:
        """Datagrams the kernel dropped before we read them (filter, full queue)."""
        ...

    @property
    def receivers(self) -> Sequence[DatagramReceiver]: ...

    async def send(self, datagrams: list[Datagram]) -> list[Endpoint]:
        """Send; return the endpoints whose sticky source address no longer works."""
        ...

    def rebind(self, port: int, fwmark: int) -> BindPort:
        """A new bind on ``port`` (0 = random) like this one; raise OSError. This one
        stays open until the caller closes it, so a failed change keeps it."""
        ...

    def set_fwmark(self, mark: int) -> None:
        """Raise OSError if the mark cannot be set."""
        ...

    def drop_unproven(self, rules: KernelFilter) -> None:
        """Have handshake messages without mac2 dropped before they are queued, as
        ``rules`` say (``uspan.daemon.earlydrop``)."""
        ...

    def backlog(self) -> float:
        """How full the fullest receive queue is, 0..1 (``Admission.backlog``)."""
        ...

    def set_gate(self, plan: GatePlan, done: GateDone) -> bool:
        """Read through the compiled gate (``uspan.daemon.gate``) as ``plan`` says, and
        tell ``done`` what each read judged; False where it cannot."""
        ...

    def filenos(self) -> list[int]:
        """The sockets' fds, for the data plane's thread to read and send on."""
        ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


# collect(): records, punts, events, the fields of uspan.wg.plane's PeerRecord, Punt, Event
PlaneNews = tuple[list[Any], list[Any], list[Any]]


class PlanePort(Plane, Protocol):
    """The C data plane (``uspan.plane._plane.Plane``): the core's calls and the
    shell's, which starts it, hands it fds and collects its news."""

    def start(self) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...
    def set_mtu(self, mtu: int, /) -> None: ...
    def set_sockets(self, sockets: list[int], /) -> None: ...
    def collect(self) -> PlaneNews: ...
    def counters(self) -> dict[str, int]: ...
    def routes_pending(self) -> int: ...
    def routes_fileno(self) -> int: ...
    def set_gate(self, *plan: bytes | bool | int | None) -> None: ...
    def gate_take(self) -> tuple[int, int, int, int, int, int]: ...
