"""The trio shell around the sans-IO core: moves batches between a TUN, a UDP bind and
the core, fires its timers and serves the UAPI socket.

A ``Daemon`` is a piece a larger program owns: it is built from ports it is given
(``ports.TunPort``, ``ports.BindPort``; ``Daemon.open`` makes the real ones) and runs in
the caller's nursery::

    daemon = Daemon(tun, bind, uapi=UapiSocket.open(path))  # or uapi=None
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)    # returns once the device is serving
        daemon.start_soon(controller, daemon)  # the owner's tasks, stopped with the device
        ...
        daemon.stop("done")

or ``async with daemon.running(): ...``. Configure it with ``configure(DeviceChange)``,
the call the UAPI makes too (``set`` before it runs); read ``peer_facts()`` and wait with
``wait_peer_events``.

``run`` returns when ``stop`` is called, the interface is deleted or the UAPI socket file
is removed; it closes every port it was given. Signals belong to the program (see
``uspan.daemon.cli``). Time is trio's clock (``trio.current_time``, monotonic), so a
``MockClock`` drives every timer and every fact the core reports.

The data plane: where ``uspan.plane`` was built, ``open`` hands the TUN and the sockets
to its C thread, which carries established sessions without a trio wake per packet; the
shell then waits on the plane's eventfd (``_plane_loop``) and hands the core what the
thread collected: handshakes and staged packets at once, traffic records for the timers
at most ``SYNC_DELAY`` after the first packet and before every timer pass, ``get`` and
``peer_facts``. ``USPAN_PLANE=0`` in the environment keeps the trio data path (the TUN
and UDP loops below). A daemon with a plane runs under ``clock.MonotonicClock``: the
thread's stamps are CLOCK_MONOTONIC.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

import trio

from uspan import privilege
from uspan.daemon import clock, dataplane, gate, gso, uapi_server
from uspan.daemon.demux import MARK, Datagram, Demux
from uspan.daemon.ports import (
    BindPort,
    DatagramReceiver,
    PlanePort,
    TunError,
    TunGone,
    TunPort,
)
from uspan.daemon.slices import Frozen, Slices, collector_paused
from uspan.daemon.tun import Tun
from uspan.daemon.udp import UdpBind
from uspan.wg import prefix, transport_crypto
from uspan.wg.admission import SAMPLE_WINDOW, KernelFilter
from uspan.wg.config import ConfigError, DeviceChange
from uspan.wg.constants import BULK_COOKIES_PER_SECOND
from uspan.wg.device import INFO_STEP, Device, Out
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint
from uspan.wg.facts import PeerFacts
from uspan.wg.plane import endpoint_of
from uspan.wg.uapi import GetParts, get_pieces
from uspan.wg.verdict import Counts, Plan

log = logging.getLogger("uspan.daemon")
WATCH_INTERVAL = 1.0  # seconds between checks of the UAPI socket file and the MTU
SYNC_DELAY = 1.0  # seconds a plane's traffic records wait for the core (docs/dataplane.md)
SYNC_STEP = 64  # records per slice of a sync (20,000 dirty peers must not hold the loop)
# Under load the plane's gate gets a new plan at most this often (the thread asks when a
# budget runs out: a plan's tokens are those since the last) and at least every
# SAMPLE_WINDOW (so the end of the load reaches it).
GATE_REPLAN = 0.01
_ECHO_REQUEST = {4: (1, 8), 6: (58, 128)}  # by IP version: ICMP's protocol, echo's type
_TUN_FAILED = {"read": "read packet from", "write": "write packets to"}  # wireguard-go's
_OWN = bytes([MARK])  # the first byte of uspan's own datagrams (the demux's)
_LEVELS = {"verbose": logging.DEBUG, "debug": logging.DEBUG, "error": logging.ERROR}


def _on_socket(sources: list[Endpoint]) -> list[Endpoint]:
    """Pseudo-endpoints never arrive on the socket: they stand for peers an owner reaches
    another way (uspan.relay); the core limits those."""
    return [source for source in sources if not source.discard_only]


def _echo_request(packet: bytes) -> bool:
    """Whether this (well-formed) IP packet is an ICMP or ICMPv6 echo request: the kernel
    has queued its reply on the TUN by the time the write that delivered it returns."""
    version = packet[0] >> 4
    if version == 4:
        protocol, header = packet[9], (packet[0] & 0xF) * 4
    else:
        protocol, header = packet[6], 40  # no extension headers before ICMPv6 here
    icmp, echo = _ECHO_REQUEST[version]
    return protocol == icmp and len(packet) > header and packet[header] == echo


def setup_logging(interface: str, level_name: str | None) -> bool:
    """Log to stderr like wireguard-go (``DEBUG: (wg0) 2024/01/01 12:00:00 ...``).

    ``level_name`` is LOG_LEVEL: verbose|debug, error (the default) or silent.
    Returns False when logging is silent.
    """
    logger = logging.getLogger("uspan")
    logger.propagate = False
    logger.handlers.clear()
    if level_name == "silent":
        logger.setLevel(logging.CRITICAL + 1)
        return False
    handler = logging.StreamHandler(sys.stderr)
    prefix = interface.replace("%", "%%")
    handler.setFormatter(logging.Formatter(
        f"%(levelname)s: ({prefix}) %(asctime)s %(message)s", datefmt="%Y/%m/%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(_LEVELS.get(level_name or "error", logging.ERROR))
    return True


_now = trio.current_time


class Daemon:
    """One interface: the protocol core between a TUN port and a bind port, and its UAPI."""

    def __init__(self, tun: TunPort, bind: BindPort, *,
                 uapi: uapi_server.UapiSocket | None = None,
                 device: Device | None = None, plane: PlanePort | None = None) -> None:
        """``plane``: the C data plane on ``tun``'s and ``bind``'s fds (``open`` makes
        it); the device is then made for it."""
        self.tun = tun
        self.bind = bind
        self.uapi = uapi
        self.plane = plane
        self.device = Device(plane=plane) if device is None else device
        self.plane_wakes = 0  # of _plane_loop: the test that a packet costs no trio wake
        self._sync_at = math.inf  # when the plane's records are due (collect at once: 0)
        self._collecting = trio.Lock()  # one collect's news at a time, in order
        self.demux = Demux()  # the owner's handlers of uspan datagrams (probes, relay)
        # The owner's rewrite of the core's datagrams before they are sent (the relay's
        # pseudo-endpoints become relay frames); what it returns goes to the bind.
        self.outbound: Callable[[list[Datagram]], list[Datagram]] | None = None
        self.owner_stats: list[Callable[[], dict[str, int]]] = []  # more for ``stats``
        self.exit_reason = ""
        self.exit_code = 0
        self._scope = trio.CancelScope()  # stop() before run() makes run() return at once
        self._nursery: trio.Nursery | None = None
        self._timer_deadline = math.inf
        self._timer_wake = trio.Event()
        self._unsent: list[tuple[bytes, Endpoint]] = []  # from set() before run()
        self._peer_events_seen = 0
        self._peer_event = trio.Event()
        # Held while packets read from the TUN are sealed and sent, by the TUN task or a
        # receiving task's read after a ping: they leave in the order they were read
        # even when a full socket makes one wait (a peer's flow is never reordered).
        self._tun_sends = trio.Lock()
        self._early_drop_version = 0  # the admission flags the bind's filter reflects
        self._early_drop_failed = False  # said once in the log
        self.config_lock = trio.Lock()  # one configuration (or get snapshot) at a time
        self._frozen = Frozen()
        self.device.mtu = tun.mtu
        self.device.listen_port = bind.port
        self.device.admission.backlog = lambda: self.bind.backlog()  # the bind may change
        self._gate_plan: Plan | None = None  # the plane's gate's, and when it was made
        self._gate_planned = -math.inf
        # A collect's punts wait for the core (its slices): the gate's counts say their
        # handed-up initiations were judged, so no plan until they are (_gate_step).
        self._gate_held = False
        self._gate_replan = False  # a replan asked for meanwhile: the collect's does it
        if plane is None:
            self._set_gate(bind)
        else:  # the thread judges handshake messages and answers a flood's cookies
            self.device.admission.allow_bulk(BULK_COOKIES_PER_SECOND)

    def _set_gate(self, bind: BindPort) -> None:
        """Have ``bind`` read in C where it can: the core then answers a flood's cookies
        there too (``Admission.allow_bulk``)."""
        device = self.device
        if bind.set_gate(lambda: device.gate_plan(_now()),
                         lambda counts: device.gate_done(counts, _now())):
            device.admission.allow_bulk(BULK_COOKIES_PER_SECOND)

    @classmethod
    def open(cls, interface: str, *, uapi_path: str | None, offload: bool = True) -> Daemon:
        """The real thing: create the TUN, the UAPI socket and the UDP bind (random port),
        and the C data plane on them unless ``USPAN_PLANE=0`` or not built.

        ``uapi_path``: e.g. ``uapi_server.socket_path(interface)``; None = no UAPI
        socket. ``offload`` turns on the kernel offloads (TUN TSO/USO, UDP GSO/GRO) it
        accepts, in the plane's thread as in the trio path (``dataplane.flags``). Synchronous,
        so a launcher can report failure before detaching (the plane's thread starts in
        ``run``). Raises TunError, uapi_server.UapiError or OSError; nothing is left
        open then.
        """
        tun = Tun.open(interface, offload_=offload)
        uapi = None
        try:
            if uapi_path is not None:
                uapi = uapi_server.UapiSocket.open(uapi_path)
            bind = UdpBind.open(0, offload_=offload)
        except OSError:
            if uapi is not None:
                uapi.close()
            tun.close()
            raise
        plane = None
        if dataplane.wanted():
            udp_gso = all(udp.gso for udp in bind.sockets)
            try:
                plane = dataplane.open_plane(tun.fd, bind.filenos(), tun.mtu,
                                             dataplane.flags(tun.features, udp_gso))
            except ValueError as exc:  # e.g. an MTU over the thread's buffers
                log.warning("Data plane thread off: %s", exc)
        return cls(tun, bind, uapi=uapi, plane=plane)

    # Lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> int:
        """Serve until stopped; returns the exit code (0 = clean shutdown).

        For ``await nursery.start(daemon.run)``: started once every task is running.
        Closes the ports and the UAPI socket on the way out, whatever happens.
        """
        log.debug("Device started")
        log.debug("Offloads: %s", self.describe_offloads())
        for what, compiled, source, fallback in (
                ("Transport AEAD", transport_crypto.COMPILED, "uspan/wg/_aead.c", "pyca"),
                ("TSO/USO split and GRO merge", gso.COMPILED, "uspan/daemon/_segment.c",
                 "numpy and Python"),
                ("UAPI allowed_ip lines", prefix.COMPILED, "uspan/wg/_prefix.c", "Python"),
                ("Handshake flood read path", gate.COMPILED, "uspan/daemon/_gate.c",
                 "Python"),
                ("Data plane thread", dataplane.COMPILED, "uspan/plane/_plane.c", "trio")):
            if compiled:
                log.debug("%s: compiled (%s)", what, source)
            else:
                log.warning("%s: %s, slower (%s was not built: install gcc, python3-dev "
                            "and libssl-dev, then reinstall)", what, fallback, source)
        log.debug("Data plane: %s", "C thread" if self.plane is not None else "trio")
        self.device.wall_offset = time.time() - _now()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.plane is not None:
                        if not clock.is_monotonic():
                            raise RuntimeError("a Daemon with a data plane runs under "
                                               "trio.run(..., clock=MonotonicClock())")
                        self.plane.start()
                        self._gate_step(_now(), replan=True)
                        nursery.start_soon(self._plane_loop)
                    else:
                        nursery.start_soon(self._tun_loop)
                        for receiver in self.bind.receivers:
                            nursery.start_soon(self._udp_loop, receiver)
                    nursery.start_soon(self._timer_loop)
                    if self.uapi is not None:
                        nursery.start_soon(self.uapi.serve, self)
                        log.debug("UAPI listener started")
                    nursery.start_soon(self._watch_loop)
                    nursery.start_soon(self._early_drop_loop)
                    if self._unsent:
                        nursery.start_soon(self._send, self._unsent)
                        self._unsent = []
                    task_status.started()
        finally:
            self._nursery = None
            self.close()
        log.debug("Shutting down (%s)", self.exit_reason)
        return self.exit_code

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Daemon]:
        """``async with daemon.running():`` serve for the body, then stop and close.

        The same as ``nursery.start(daemon.run)`` in a nursery of its own; the body
        ends early (cancelled) if the device stops by itself.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                self.stop("owner finished")

    def start_soon(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run an owner's task beside the device's own; it is cancelled when the device
        stops, and its exception stops the device."""
        if self._nursery is None:
            raise RuntimeError("the daemon is not running")
        self._nursery.start_soon(function, *args)

    def describe_offloads(self) -> str:
        """e.g. ``tun=csum,tso4,tso6 udp_gso4=on udp_gro4=on ... plane=off``."""
        plane = "off" if self.plane is None else "on"
        return f"{self.tun.describe()} {self.bind.describe()} plane={plane}"

    def stop(self, reason: str, code: int = 0) -> None:
        """Stop serving (the first reason given wins); ``run`` then returns ``code``."""
        if not self.exit_reason:
            self.exit_reason, self.exit_code = reason, code
            self._scope.cancel()

    def close(self) -> None:
        """Release everything; the socket file is removed only if it is still ours. The
        plane's thread is joined before the fds it reads are closed."""
        if self.plane is not None:
            self.plane.close()
        if self.uapi is not None:
            self.uapi.close()
        self.bind.close()
        self.tun.close()

    # Data path ---------------------------------------------------------------------------

    async def _tun_loop(self) -> None:
        tun, device = self.tun, self.device
        while True:
            try:
                packets = await tun.read()
            except TunError as exc:
                self._tun_failed(exc, "read")
                return
            sends = self._tun_sends
            if sends.locked():  # a receiving task's read after a ping waits to send
                await sends.acquire()
            else:
                sends.acquire_nowait()  # no checkpoint per batch
            try:
                await self._send(device.send(packets, _now()))
            finally:
                sends.release()

    async def _udp_loop(self, receiver: DatagramReceiver) -> None:
        while True:
            try:
                batch = await receiver.receive()
            except trio.ClosedResourceError:
                return  # rebound to another port
            if self.demux:
                batch = self.demux.split(batch)
                if not batch:
                    continue
            if not await self.receive_datagrams(batch):
                return

    async def receive_datagrams(self, batch: list[Datagram]) -> bool:
        """Hand the core datagrams as if they came from the UDP socket (the owner's, say
        WireGuard messages a relay delivered over TCP); False once the device stopped."""
        device = self.device
        to_tun, out = device.receive(batch, _now())
        if device.admission.flag_version != self._early_drop_version:
            self._refresh_early_drop()
        if to_tun:
            try:
                await self.tun.write(to_tun)
            except TunError as exc:
                self._tun_failed(exc, "write")
                return False
            # A ping's echo reply is queued on the TUN inside this write: seal and send it
            # from this task now, not after a wake of the TUN task (a pass of the event
            # loop and an epoll_wait, ~0.1 ms on an idle VM). Only after a ping: a read
            # that finds nothing costs ~2 us, a fifth of paced UDP's CPU per datagram,
            # and TCP's ACKs (and the data they let out) go faster in the TUN task's
            # larger batches. At most a read per packet delivered, so none finds nothing
            # after a lone reply; what is left wakes the TUN task. Not while packets read
            # before wait to be sent: these would overtake them.
            if (self.plane is None and _echo_request(to_tun[-1])
                    and not self._tun_sends.locked()):
                self._tun_sends.acquire_nowait()
                try:
                    answers = self.tun.read_batch(len(to_tun))
                    if answers:
                        out += device.send(answers, _now())
                    await self._send(out)
                except TunError as exc:
                    self._tun_failed(exc, "read")
                    return False
                finally:
                    self._tun_sends.release()
                return True
        await self._send(out)
        return True

    def _tun_failed(self, exc: TunError, operation: str) -> None:
        """Stop: cleanly if the interface was deleted, else with code 1."""
        if isinstance(exc, TunGone):
            self.stop("interface deleted")
        else:
            log.error("Failed to %s TUN device: %s", _TUN_FAILED[operation], exc)
            self.stop(f"TUN {operation} failed", 1)

    async def _send(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Send the core's datagrams, then let the timer task see earlier deadlines."""
        if datagrams and self.outbound is not None:
            datagrams = self.outbound(datagrams)
        if datagrams:
            try:
                failed = await self.bind.send(datagrams)
            except trio.ClosedResourceError:
                failed = []  # the sockets were replaced while we waited to send
            for endpoint in failed:
                self.device.forget_source(endpoint)
        self._poke_timer()
        if self.device.peer_events != self._peer_events_seen:
            self._peer_events_seen = self.device.peer_events
            self._peer_event.set()
            self._peer_event = trio.Event()

    # The data plane's news (docs/dataplane.md) -------------------------------------------

    async def _plane_loop(self) -> None:
        """Wake on the plane's eventfd. A punt or an event is handled at once; records
        (the thread's traffic) only arm the timers' sync, at most SYNC_DELAY later, and
        signal no more until it collected them: a busy tunnel costs a wake or two a
        second, not one per packet (``_plane.NEWS_URGENT``)."""
        assert self.plane is not None
        fd = self.plane.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            self.plane_wakes += 1
            try:
                count = int.from_bytes(os.read(fd, 8), "little")
            except BlockingIOError:
                continue  # a collect took the news meanwhile
            if count >= dataplane.NEWS_URGENT:
                await self._collect()
            elif self._sync_at == math.inf:
                self._sync_at = _now() + SYNC_DELAY
                self._poke_timer()

    async def _collect(self) -> None:
        """Hand the core the plane's news and send what it returns; the sync in slices."""
        async with self._collecting:
            out: Out = []
            own: list[Datagram] = []
            slices = Slices()
            for _ in self._plane_steps(out, own):
                await slices.pause()
            await self._send(out)
        if own:
            await self.receive_datagrams(own)

    def _plane_steps(self, out: Out, own: list[Datagram]) -> Iterator[None]:
        """One collect's news to the core: records (a step per SYNC_STEP), events, punts,
        in that order (docs/dataplane.md). uspan's own datagrams among the punts go to
        the demux first; what its handlers hand back (a relay's delivery) goes to
        ``own``, for ``receive_datagrams`` as from the socket."""
        assert self.plane is not None
        records, punts, events = self.plane.collect()
        self._sync_at = math.inf
        device = self.device
        self._gate_held = True
        try:
            for start in range(0, len(records), SYNC_STEP):
                out += device.sync(records[start:start + SYNC_STEP], _now())
                yield
            now = _now()
            out += device.plane_events(events, now)
            if self.demux:
                core, claimed = [], []
                for punt in punts:
                    kind, _, data, source = punt
                    if kind == dataplane.PUNT_UDP and data[:1] == _OWN and source is not None:
                        claimed.append((data, endpoint_of(*source[:4])))
                    else:
                        core.append(punt)
                punts = core
                own += self.demux.split(claimed)
            out += device.punted(punts, now)
        finally:
            self._gate_held = False
        self._gate_step(now)

    def _gate_step(self, now: float, *, replan: bool = False) -> None:
        """The plane's gate (``_gate.c``'s judgement, in the thread): what it judged since
        the last step goes to the core (its load and budgets), then the core's plan to
        the thread; under load at most every GATE_REPLAN (later: a collect is due then),
        unless ``replan`` (the keys changed). Not between a collect and the core's
        judgement of its punts (a set's replan between its slices): the counts the thread
        gave that collect include handed-up initiations the core has not judged yet, and a
        plan from the tokens of before would offer them again; that collect replans."""
        assert self.plane is not None
        if self._gate_held:
            self._gate_replan = self._gate_replan or replan
            self._collect_by(_now())  # and another collect, should that one be cancelled
            return
        replan, self._gate_replan = replan or self._gate_replan, False
        device = self.device
        device.gate_done(Counts(0, *self.plane.gate_take()), now)
        last = self._gate_plan
        if not replan and last is not None and last.under_load:
            due = self._gate_planned + GATE_REPLAN
            if now < due:
                self._collect_by(due)
                return
        plan = self._gate_plan = device.gate_plan(now)
        self._gate_planned = now
        if plan is None:
            self.plane.set_gate()
            return
        self.plane.set_gate(plan.mac1_key, plan.cookie_key, plan.secret, plan.under_load,
                            plan.hand_up, plan.cookies, plan.lane)
        if plan.under_load:
            self._collect_by(now + SAMPLE_WINDOW)

    def _collect_by(self, when: float) -> None:
        """Have the timers collect the plane's news by ``when``."""
        if when < self._sync_at:
            self._sync_at = when
            self._poke_timer()

    def _sync_now(self) -> None:
        """Collect at once, outside a task (``peer_facts``); its datagrams go soon.
        Skipped while a task's collect is under way: that one brings the news."""
        if self.plane is None or self._nursery is None or self._collecting.locked():
            return
        out: Out = []
        own: list[Datagram] = []
        for _ in self._plane_steps(out, own):
            pass
        self._nursery.start_soon(self._send, out)
        if own:
            self._nursery.start_soon(self.receive_datagrams, own)

    async def send_datagrams(self, datagrams: list[Datagram]) -> None:
        """Send the owner's own datagrams (``uspan.daemon.demux``) from the WireGuard
        socket, so they use, and reveal, the NAT mapping peers reach. Errors are counted
        by the bind (``udp_send_errors``), as for the core's datagrams."""
        with contextlib.suppress(trio.ClosedResourceError):  # replaced meanwhile: the
            await self.bind.send(datagrams)  # owner tries again, as after a loss

    # Timers ------------------------------------------------------------------------------

    def _poke_timer(self) -> None:
        if self._next_deadline() < self._timer_deadline:
            self._timer_wake.set()

    def _next_deadline(self) -> float:
        """The core's next deadline, or the plane's records' sync if that is earlier."""
        deadline = self.device.next_deadline()
        return min(math.inf if deadline is None else deadline, self._sync_at)

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._timer_deadline = self._next_deadline()
            self._timer_wake = trio.Event()
            if deadline > _now():
                with trio.move_on_at(deadline):
                    await self._timer_wake.wait()
                continue
            if self.plane is not None:
                await self._collect()  # the timers learn of the thread's traffic first
            await self._send(self.device.tick(_now()))  # sending needs no checkpoint
            after = self.device.next_deadline()
            if after is not None and after <= _now():
                # More is due (tick is bounded, and with thousands of peers more came due
                # while it ran): let packets go first.
                await trio.sleep(0)

    # Watchers ----------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if self.uapi is not None and self.uapi.removed():
                self.stop("UAPI socket removed")
                return
            if self.plane is not None:  # no read of ours would see the interface go
                try:
                    self.tun.check()
                except TunError as exc:
                    self._tun_failed(exc, "read")
                    return
            if self.tun.refresh_mtu():
                log.debug("MTU updated: %d", self.tun.mtu)
                self.device.mtu = self.tun.mtu
                if self.plane is not None:
                    try:
                        self.plane.set_mtu(self.tun.mtu)
                    except ValueError as exc:  # larger than its buffers: it keeps the old
                        log.warning("Data plane thread keeps MTU: %s", exc)
            self.device.wall_offset = time.time() - _now()

    async def _early_drop_loop(self) -> None:
        """Expire flags, and lift the sample soon after a flood ends: no datagram may come
        to trigger ``_refresh_early_drop`` then."""
        while True:
            await trio.sleep(SAMPLE_WINDOW if self.device.admission.keep < 1.0 else 1.0)
            self._refresh_early_drop()

    def _refresh_early_drop(self) -> None:
        """Have the kernel filter as the core's admission says (expired flags go); the
        relay's pseudo-sources never reach the socket."""
        admission = self.device.admission
        rules = admission.kernel_filter(_now())
        if admission.flag_version == self._early_drop_version:
            return
        self._early_drop_version = admission.flag_version
        rules = KernelFilter(_on_socket(rules.flagged), _on_socket(rules.lane), rules.keep)
        try:
            self.bind.drop_unproven(rules)
        except OSError as exc:  # e.g. no BPF in this kernel: the core still refuses them
            if not self._early_drop_failed:
                log.error("Cannot filter flooding sources in the kernel: %s", exc)
            self._early_drop_failed = True

    # Facts for the owner ----------------------------------------------------------------

    def peer_facts(self) -> dict[bytes, PeerFacts]:
        """Per peer: handshakes, attempts, bytes, endpoint (``uspan.wg.facts``), with
        the plane's traffic synced first."""
        self._sync_now()
        return self.device.peer_facts()

    async def wait_peer_events(self, seen: int) -> int:
        """Wait until a handshake completes, attempts are given up or a peer roams after
        the count ``seen`` (``device.peer_events``); return the new count. A loop of
        ``peer_facts()`` then ``seen = await wait_peer_events(seen)`` misses nothing."""
        while self.device.peer_events == seen:
            await self._peer_event.wait()
        return self.device.peer_events

    # Configuration: the UAPI's and the owner's (uapi_server.ConfigTarget) ----------------

    async def get_pieces(self) -> Iterator[bytes]:
        """The ``get=1`` reply in pieces, of a snapshot taken between configurations.

        The snapshot is taken in slices, as text (``Device.get_steps``: what only a set
        or a roam changes was rendered by them, only the counters are rendered here),
        with the cycle collector paused: a big peer's allowed IPs come as a snapshot of
        their segments, objects that would otherwise count towards collections in the
        middle. The pieces are made before the collector is
        back and the snapshot is freed by reference counting, so a client that stops
        reading cannot keep it paused; freed in slices too (a big peer's allowed IPs
        release their segments as they go). The text kept of big peers' segments is
        bytes, which the collector never tracks (kept as a million strings, the first
        young collection after the get walked them all: 20-30 ms)."""
        if self.plane is not None:
            await self._collect()  # the counters and handshake times are the packets'
        async with self.config_lock:
            pieces: list[bytes] = []
            with collector_paused():
                parts: GetParts = []
                slices = Slices()
                for _ in self.device.get_steps(parts):
                    await slices.pause()
                for piece in get_pieces(parts):
                    pieces.append(piece)
                    await slices.pause()
                while parts:  # a big peer's allowed IPs release their hold as they go
                    del parts[-INFO_STEP:]
                    await slices.pause()
            return iter(pieces)

    def stats(self) -> dict[str, int]:
        """The device's counters by name; a drop the plane's thread counted is in its
        ``drop_*`` too (the plane keys its drops by the same names)."""
        plane = {} if self.plane is None else self.plane.counters()
        counters = {f"drop_{drop.value}": self.device.counters[drop] + plane.get(drop.value, 0)
                    for drop in Drop}
        counters["tun_read_dropped"] = self.tun.read_dropped
        counters["tun_write_dropped"] = self.tun.write_dropped
        counters["udp_send_errors"] = self.bind.send_errors
        counters["udp_receive_dropped"] = self.bind.receive_dropped
        counters["udp_own_claimed"] = self.demux.claimed
        counters["udp_own_unclaimed"] = self.demux.unclaimed
        counters["tunnel_messages"] = self.device.admission.tunnel_messages
        counters["udp_socket_drops"] = self.bind.socket_drops
        counters["udp_backlog_permille"] = round(1000 * self.bind.backlog())
        counters.update({f"gate_{name}": n for name, n in self.device.gate_totals.items()})
        counters.update(self.device.admission.stats())
        if self.plane is not None:
            counters.update({f"plane_{name}": n for name, n in plane.items()})
            counters["plane_loop_wakes"] = self.plane_wakes
        for owner in self.owner_stats:
            counters.update(owner())
        return counters

    def set(self, change: DeviceChange) -> None:
        """Apply atomically at once (before ``run``, or a change known to be small); on
        any failure change nothing. While running, prefer ``configure``."""
        for _ in self._set_steps(change):
            pass
        if self.plane is not None:
            self.plane.sync_routes()
        self._frozen.changed(_weight(change))

    async def configure(self, change: DeviceChange) -> None:
        """Apply atomically, in slices that let the tunnel run (``uspan.daemon.slices``).

        The one way to configure a running device: the UAPI calls it, and so does an
        owner. Configurations and ``get_pieces`` snapshots take turns (``config_lock``),
        so none sees another half applied. Validation comes before any change: a
        ConfigError changes nothing. Cancelled midway (the daemon is stopping), the
        device keeps part of the change, but it is not serving any more.
        """
        async with self.config_lock:
            slices, steps = Slices(), self._set_steps(change)
            with collector_paused():
                try:
                    for _ in steps:
                        self._poke_timer()  # timers it armed run between its slices
                        await slices.pause()
                finally:
                    steps.close()  # cancelled: the old sockets stay
                # Before the collector is back: its next young collection would walk
                # every object the change made (0.1 s and more for 20,000 new peers, ~25
                # ms for the table of a million new prefixes).
                self._frozen.changed(_weight(change))
            await self._plane_routes()

    async def _plane_routes(self) -> None:
        """Wait, with the loop running, until the plane's routes thread has applied the
        route changes queued so far: a reply then means the set's routes carry traffic.
        The thread applies them while the set's Python work goes on (on the other core),
        so there is rarely more than one slice's worth left to wait for. The thread
        signals an eventfd each time its queue drains: read it, then look again (a
        signal of an earlier drain costs one more look)."""
        if self.plane is None:
            return
        while self.plane.routes_pending():
            fd = self.plane.routes_fileno()
            await trio.lowlevel.wait_readable(fd)
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)
        self.plane.sync_routes()  # at once now; MemoryError if a change found none

    def _set_steps(self, change: DeviceChange) -> Generator[None, None, None]:
        """Bind a new port first, then apply the change to the device in steps."""
        old_mark = self.bind.fwmark
        mark = old_mark if change.fwmark is None else change.fwmark
        new_bind = None
        port = change.listen_port
        if port is not None and (port == 0 or port != self.bind.port):
            try:
                new_bind = self.bind.rebind(port, mark)
            except OSError as exc:
                hint = "ports below 1024 need CAP_NET_BIND_SERVICE" if exc.errno in (
                    errno.EACCES, errno.EPERM) else ""
                raise ConfigError("listen_port", privilege.with_hint(
                    f"cannot bind port {port}: {exc.strerror}", hint), errno.EADDRINUSE) from None
            log.debug("UAPI: Updating listen port")
        elif mark != old_mark:
            try:
                self.bind.set_fwmark(mark)
            except OSError as exc:
                raise ConfigError("fwmark", privilege.with_hint(
                    f"cannot set fwmark {mark}: {exc.strerror}",
                    privilege.net_admin_hint(exc.errno, "a firewall mark")),
                    errno.EADDRINUSE) from None  # wireguard-go's errno for both
            log.debug("UAPI: Updating fwmark")
        out: list[tuple[bytes, Endpoint]] = []
        try:
            yield from self.device.apply_steps(change, _now(), out)
        except BaseException:  # ConfigError, a bug or a cancellation: keep the old sockets
            if new_bind is not None:
                new_bind.close()
            elif mark != old_mark:
                self.bind.set_fwmark(old_mark)
            raise
        if new_bind is not None:
            old_bind, self.bind = self.bind, new_bind
            if self.plane is not None:
                self.plane.set_sockets(new_bind.filenos())  # before the old fds close
            old_bind.close()
            self._early_drop_version = -1  # the new sockets have no filter yet
            if self.plane is None:
                self._set_gate(new_bind)
                if self._nursery is not None:
                    for receiver in new_bind.receivers:
                        self._nursery.start_soon(self._udp_loop, receiver)
        self.device.listen_port = self.bind.port
        if self.plane is not None:
            self._gate_step(_now(), replan=True)  # a new key: the thread's mac1 with it
        if self._nursery is not None:
            self._nursery.start_soon(self._send, out)
        else:
            self._unsent.extend(out)


PREFIXES_PER_PEER = 100  # allowed IPs that cost a collection about what one peer costs


def _weight(change: DeviceChange) -> int:
    """The change in peers for ``Frozen.changed``: its peers, and its allowed IPs counted
    as the collector walks them (an entry of a table it walks, not an object of its own)."""
    prefixes = sum(len(peer.allowed_ips) for peer in change.peers)
    return len(change.peers) + prefixes // PREFIXES_PER_PEER
