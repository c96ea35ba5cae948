"""The UDP sockets: one IPv4 and one IPv6-only socket on the same port.

Each received datagram comes with the local address it arrived on and that interface's
index (IP_PKTINFO / IPV6_RECVPKTINFO); replies carry them back as a control message so
they leave from the same address (sticky source). When that address has gone away, the
datagram is resent without it and the endpoint reported, so the caller can forget it.

With offloads, receives use UDP_GRO (one read returns many datagrams of a flow) and
sends use UDP_SEGMENT (one ``sendmsg`` carries a run of equal-size datagrams to one
endpoint); each is off where the kernel refuses it. Where the core has a key and
``uspan.daemon.gate`` was built, receives go through its compiled read path instead:
recvmmsg in C, with a handshake flood judged and answered there as the core plans
(``set_gate``).
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import struct
from operator import itemgetter

import trio

from uspan.daemon import earlydrop, gate, gso, offload
from uspan.daemon.ports import GateDone, GatePlan
from uspan.wg.admission import KernelFilter
from uspan.wg.endpoint import Endpoint
from uspan.wg.verdict import Counts, Plan

log = logging.getLogger(__name__)

BATCH = 64  # receives per batch (each up to 64 datagrams with GRO)
SOCKET_BUFFER = 7 << 20  # like wireguard-go
BIND_ATTEMPTS = 100  # random ports tried when the v6 socket cannot take the v4 one
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
_SO_MEMINFO = 55  # u32 counters; the first two: bytes queued, the receive buffer's size
_MEMINFO_DROPS = 8  # SK_MEMINFO_DROPS
_CACHE_LIMIT = 4096
# sendmsg errors that mean "this source address/interface is no longer usable".
_SOURCE_GONE = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH,
                          errno.ENODEV})


class UdpSocket:
    """One bound, non-blocking UDP socket of one address family."""

    def __init__(self, sock: socket.socket, *, offload_: bool = True) -> None:
        self.sock = sock
        self.family = sock.family
        self.send_errors = 0
        self.receive_dropped = 0  # receives whose control data was cut short (MSG_CTRUNC)
        self._no_meminfo = False  # the kernel would not say how full the queue is
        self._v6 = sock.family == socket.AF_INET6
        self.gro = offload_ and offload.enable_gro(sock)
        self.gso = offload_ and offload.probe_udp_gso(sock)
        self._buffer = bytearray(offload.RECV_BUFFER_SIZE)
        self._sources: dict[tuple[object, bytes], Endpoint] = {}
        self._no_gso: set[tuple[str, int]] = set()  # destinations whose route refused GSO
        self._writable = trio.Lock()
        # By (local address, interface): a flood's many sources share the few we have.
        self._controls: dict[tuple[str | None, int], list[tuple[int, int, bytes]]] = {}
        self._gate: tuple[GatePlan, GateDone] | None = None
        self._gate_buffer = bytearray()

    def set_gate(self, plan: GatePlan, done: GateDone) -> bool:
        """Read through the compiled gate from now on, as ``plan`` says; False (and
        reads stay in Python) where it was not built."""
        if gate.COMPILED:
            self._gate = (plan, done)
            self._gate_buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
        return gate.COMPILED

    async def receive(self, limit: int = BATCH) -> list[tuple[bytes, Endpoint]]:
        """Wait for datagrams, then drain up to ``limit`` of them.

        Raises trio.ClosedResourceError once the socket has been closed.
        """
        while True:
            if self.sock.fileno() < 0:
                raise trio.ClosedResourceError("UDP socket closed")
            await trio.lowlevel.wait_readable(self.sock)
            batch = self.receive_batch(limit)
            if batch:
                return batch

    def receive_batch(self, limit: int = BATCH) -> list[tuple[bytes, Endpoint]]:
        """Read until the socket would block or ``limit`` receives; GRO runs are split."""
        plan = self._gate[0]() if self._gate is not None else None
        if plan is not None:
            return self._read_gated(plan, limit)
        groups, truncated = offload.recv_batch_gro(self.sock, self._buffer, limit=limit)
        self.receive_dropped += truncated
        out: list[tuple[bytes, Endpoint]] = []
        for group in groups:
            endpoint = self._source(group.address, group.pktinfo)
            out.extend([(datagram, endpoint) for datagram in group.datagrams])
        return out

    def _read_gated(self, plan: Plan, limit: int) -> list[tuple[bytes, Endpoint]]:
        """A read through the compiled gate: what it hands up (from at most ``limit``
        receives, as the read in Python, coalesced ones split); what else it did is the
        core's to count, and only built and told when there was any (a lone packet's read
        after an idle runs on cold caches, where each object made shows in its latency)."""
        assert self._gate is not None
        received, counts = gate.read(
            self.sock.fileno(), self._gate_buffer, gate.ROUNDS, limit, plan.mac1_key,
            plan.cookie_key, plan.secret, plan.under_load, plan.hand_up, plan.cookies,
            plan.lane)
        if any(counts):
            done = Counts(*counts)
            self.receive_dropped += done.truncated
            self.send_errors += done.send_failed
            self._gate[1](done)
        out: list[tuple[bytes, Endpoint]] = []
        for data, address, info, gso_size in received:
            endpoint = self._source(address, info)
            if gso_size and len(data) > gso_size:
                out.extend([(datagram, endpoint) for datagram in gso.split_gro(data, gso_size)])
            else:
                out.append((data, endpoint))
        return out

    def _source(self, address: tuple[str, int] | tuple[str, int, int, int],
                info: bytes) -> Endpoint:
        """The endpoint a datagram came from (cached by its address and pktinfo)."""
        key = (address, info)
        endpoint = self._sources.get(key)
        if endpoint is None:
            local, ifindex = offload.arrival(address, info)
            endpoint = Endpoint(address[0], address[1], local, ifindex)
            if len(self._sources) >= _CACHE_LIMIT:
                self._sources.clear()
            self._sources[key] = endpoint
        return endpoint

    def _control(self, endpoint: Endpoint) -> list[tuple[int, int, bytes]]:
        key = (endpoint.local, endpoint.ifindex)
        control = self._controls.get(key)
        if control is None:
            if endpoint.local is None:
                control = []
            elif self._v6:
                packed = socket.inet_pton(socket.AF_INET6, endpoint.local.split("%", 1)[0])
                info = packed + struct.pack("=i", endpoint.ifindex)
                control = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]
            else:
                packed = socket.inet_pton(socket.AF_INET, endpoint.local)
                info = struct.pack("=i4s4s", endpoint.ifindex, packed, bytes(4))
                control = [(socket.IPPROTO_IP, offload.IP_PKTINFO, info)]
            if len(self._controls) >= _CACHE_LIMIT:
                self._controls.clear()
            self._controls[key] = control
        return control

    async def send(self, datagrams: list[bytes], endpoint: Endpoint) -> bool:
        """Send datagrams to one endpoint, from its sticky source if it has one.

        Runs of equal-size datagrams go out in one UDP_SEGMENT ``sendmsg`` when the kernel
        supports it; a run the kernel refuses (EIO: no segmentation on this path, as
        wireguard-go handles it; EINVAL/EMSGSIZE: datagrams larger than the route MTU) is
        resent one datagram at a time. Returns False if the sticky source failed and the
        datagrams went out without it. Waits while the socket buffer is full; other
        errors count in ``send_errors``.
        """
        control = self._control(endpoint)
        sticky_ok = True
        address = endpoint.address
        if self.gso and len(datagrams) > 1 and address not in self._no_gso:
            batches = gso.gso_batches(datagrams)
        else:
            batches = [(datagram, 0) for datagram in datagrams]
        for buffer, size in batches:
            if not size:
                pieces = [buffer]
            else:
                error = await self._sendmsg(buffer, [*control, offload.gso_cmsg(size)], address)
                if error is None:
                    continue
                if offload.gso_send_unsupported(error):
                    self.gso = False
                elif sticky_ok:
                    if len(self._no_gso) >= _CACHE_LIMIT:
                        self._no_gso.clear()
                    self._no_gso.add(address)
                pieces = gso.split_gro(buffer, size)
            for piece in pieces:
                error = await self._sendmsg(piece, control, address)
                if error is not None and control and error.errno in _SOURCE_GONE:
                    control, sticky_ok = [], False
                    error = await self._sendmsg(piece, control, address)
                if error is not None:
                    self.send_errors += 1
        return sticky_ok

    async def _sendmsg(self, buffer: bytes, control: list[tuple[int, int, bytes]],
                       address: tuple[str, int]) -> OSError | None:
        """One ``sendmsg``, waiting while the socket buffer is full; the error, if any."""
        while True:
            try:
                self.sock.sendmsg([buffer], control, 0, address)
                return None
            except (BlockingIOError, InterruptedError):
                async with self._writable:  # trio lets only one task wait on an fd
                    await trio.lowlevel.wait_writable(self.sock)
            except OSError as exc:
                return exc

    def set_fwmark(self, mark: int) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, _mark(mark))

    def backlog(self) -> float:
        """How full the receive queue is, 0..1 (0 where the kernel does not say)."""
        queued, size, _ = self._meminfo()
        return queued / size if size else 0.0

    @property
    def socket_drops(self) -> int:
        """Datagrams the kernel dropped for this socket: its filter's and a full queue's
        (0 where the kernel does not say)."""
        return self._meminfo()[2]

    def _meminfo(self) -> tuple[int, int, int]:
        """The queue's bytes, the receive buffer's size and the socket's drops."""
        if self._no_meminfo:
            return 0, 0, 0
        try:
            info = struct.unpack("=9I", self.sock.getsockopt(
                socket.SOL_SOCKET, _SO_MEMINFO, 36))
        except OSError as exc:  # (kernels before 4.6, some sandboxes)
            self._no_meminfo = True
            log.warning("receive queue fill unknown (SO_MEMINFO: %s): a handshake flood's "
                        "sample will not follow the socket's backlog", exc.strerror)
            return 0, 0, 0
        return info[0], info[1], info[_MEMINFO_DROPS]

    def close(self) -> None:
        if self.sock.fileno() >= 0 and trio.lowlevel.in_trio_run():
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class UdpBind:
    """The IPv4 and IPv6 sockets of a device, both bound to ``port``."""

    def __init__(self, sockets: list[UdpSocket], port: int, fwmark: int, offload_: bool) -> None:
        self.sockets = sockets
        self.port = port
        self.fwmark = fwmark
        self.offload = offload_
        self._by_family = {s.family: s for s in sockets}

    @classmethod
    def open(cls, port: int, fwmark: int = 0, *, offload_: bool = True) -> UdpBind:
        """Bind both families to ``port`` (0 = a random port free in both).

        ``offload_`` enables UDP_GRO/UDP_SEGMENT where the kernel has them. Raises
        OSError (EADDRINUSE) when the port is taken.
        """
        for _ in range(BIND_ATTEMPTS if port == 0 else 1):
            sockets: list[UdpSocket] = []
            try:
                chosen = port
                for family in (socket.AF_INET, socket.AF_INET6):
                    sock = _open_socket(family, chosen, fwmark)
                    if sock is None:
                        continue
                    sockets.append(UdpSocket(sock, offload_=offload_))
                    chosen = sock.getsockname()[1]
            except OSError as exc:
                for udp in sockets:
                    udp.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue
                raise
            if not sockets:
                raise OSError(errno.EAFNOSUPPORT, "neither IPv4 nor IPv6 UDP is available")
            return cls(sockets, chosen, fwmark, offload_)
        raise OSError(errno.EADDRINUSE, f"no random UDP port free in both IPv4 and IPv6 "
                      f"after {BIND_ATTEMPTS} attempts")

    @property
    def receivers(self) -> list[UdpSocket]:
        return self.sockets

    def rebind(self, port: int, fwmark: int) -> UdpBind:
        """A new bind like this one on ``port``; this one stays open (``BindPort``)."""
        return UdpBind.open(port, fwmark, offload_=self.offload)

    def describe(self) -> str:
        return " ".join(f"{k}={'on' if v else 'off'}" for k, v in self.features().items())

    async def send(self, datagrams: list[tuple[bytes, Endpoint]]) -> list[Endpoint]:
        """Send datagrams; return the endpoints whose sticky source no longer works.

        Consecutive datagrams to the same endpoint are sent together (UDP_SEGMENT).
        """
        failed: list[Endpoint] = []
        by_family = self._by_family
        for endpoint, run in itertools.groupby(datagrams, key=itemgetter(1)):
            udp = by_family.get(endpoint.family)
            if udp is not None and not await udp.send([d for d, _ in run], endpoint):
                failed.append(endpoint)
        return failed

    def filenos(self) -> list[int]:
        return [udp.sock.fileno() for udp in self.sockets]

    def set_gate(self, plan: GatePlan, done: GateDone) -> bool:
        return all([udp.set_gate(plan, done) for udp in self.sockets])

    def drop_unproven(self, rules: KernelFilter) -> None:
        """Attach (or, when it would drop nothing, detach) the early-drop filter."""
        for udp in self.sockets:
            if rules.drops_any():
                earlydrop.install(udp.sock, rules)
            else:
                earlydrop.detach(udp.sock)

    def backlog(self) -> float:
        return max((udp.backlog() for udp in self.sockets), default=0.0)

    def set_fwmark(self, mark: int) -> None:
        """Set SO_MARK on both sockets (0 clears it); raises OSError."""
        for udp in self.sockets:
            udp.set_fwmark(mark)
        self.fwmark = mark

    def features(self) -> dict[str, bool]:
        """Which UDP offloads are on, per family (for logs and ``--features``)."""
        names = {socket.AF_INET: "4", socket.AF_INET6: "6"}
        out: dict[str, bool] = {}
        for udp in self.sockets:
            out[f"udp_gso{names[udp.family]}"] = udp.gso
            out[f"udp_gro{names[udp.family]}"] = udp.gro
        return out

    @property
    def send_errors(self) -> int:
        return sum(udp.send_errors for udp in self.sockets)

    @property
    def receive_dropped(self) -> int:
        return sum(udp.receive_dropped for udp in self.sockets)

    @property
    def socket_drops(self) -> int:
        return sum(udp.socket_drops for udp in self.sockets)

    def close(self) -> None:
        for udp in self.sockets:
            udp.close()


def _open_socket(family: int, port: int, fwmark: int) -> socket.socket | None:
    """A bound non-blocking UDP socket, or None if the family is unsupported here."""
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return None
        raise
    try:
        sock.setblocking(False)
        offload.enable_pktinfo(sock)
        _set_buffers(sock)
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, _mark(fwmark))
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(("::", port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # IPv6 disabled on this host
                    sock.close()
                    return None
                raise
        else:
            sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock


def _set_buffers(sock: socket.socket) -> None:
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF),
                         (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _mark(mark: int) -> bytes:
    """SO_MARK's value as the kernel's u32 (a Python int is passed as a signed C int)."""
    return struct.pack("=I", mark)
