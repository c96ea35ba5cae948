"""The trio shell around the sans-IO core: TUN, UDP, timers and the UAPI socket.

``Daemon.open`` does the privileged setup synchronously (so a launcher can report
failure before detaching); ``Daemon.run`` moves batches between the TUN, the sockets and
the core until the interface or the UAPI socket disappears or a signal arrives.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import sys
import time

import trio

from uspan import signals as stop_signals
from uspan.daemon import uapi_server
from uspan.daemon.tun import Tun, TunError, TunGone
from uspan.daemon.udp import UdpBind, UdpSocket
from uspan.wg.config import ConfigError, DeviceChange
from uspan.wg.device import DROP_REASONS, Device
from uspan.wg.endpoint import Endpoint
from uspan.wg.uapi import format_get

log = logging.getLogger("uspan.daemon")
WATCH_INTERVAL = 1.0  # seconds between checks of the UAPI socket file and the MTU
_MIN_TIMER_SLEEP = 0.001  # never spin if a deadline stays in the past after tick
_LEVELS = {"verbose": logging.DEBUG, "debug": logging.DEBUG, "error": logging.ERROR}


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


def _now() -> float:
    return time.monotonic()


class Daemon:
    """One interface: its TUN, UDP sockets, UAPI listener and protocol core."""

    def __init__(self, interface: str, tun: Tun, udp: UdpBind, listener: socket.socket,
                 device: Device, socket_path: str) -> None:
        self.interface = interface
        self.tun = tun
        self.udp = udp
        self.listener = listener
        self.device = device
        self.socket_path = socket_path
        self.exit_reason = ""
        self.exit_code = 0
        stat = os.stat(socket_path)
        self._socket_id = (stat.st_dev, stat.st_ino)
        self._nursery: trio.Nursery | None = None
        self._timer_deadline = math.inf
        self._timer_wake = trio.Event()
        device.mtu = tun.mtu
        device.listen_port = udp.port
        device.wall_offset = time.time() - _now()

    @classmethod
    def open(cls, interface: str, socket_directory: str = uapi_server.SOCKET_DIRECTORY,
             *, offload: bool = True) -> Daemon:
        """Create the TUN, the UAPI socket and the UDP sockets (random port).

        ``offload`` turns on the kernel offloads (TUN TSO/USO, UDP GSO/GRO) it accepts.
        Raises TunError, uapi_server.UapiError or OSError; nothing is left open then.
        """
        tun = Tun.open(interface, offload_=offload)
        try:
            listener = uapi_server.open_listener(interface, socket_directory)
        except OSError:
            tun.close()
            raise
        path = uapi_server.socket_path(interface, socket_directory)
        try:
            udp = UdpBind.open(0, offload_=offload)
        except OSError:
            listener.close()
            _unlink(path)
            tun.close()
            raise
        return cls(interface, tun, udp, listener, Device(), path)

    # Lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until told to stop; returns the exit code (0 = clean shutdown)."""
        log.debug("Device started")
        log.debug("Offloads: %s", self.describe_offloads())
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._tun_loop)
                for udp in self.udp.sockets:
                    nursery.start_soon(self._udp_loop, udp)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(uapi_server.serve, self.listener, self)
                log.debug("UAPI listener started")
                nursery.start_soon(self._watch_loop)
                nursery.start_soon(self._signal_loop)
        finally:
            self._nursery = None
            self.close()
        log.debug("Shutting down (%s)", self.exit_reason)
        return self.exit_code

    def describe_offloads(self) -> str:
        """e.g. ``tun=csum,tso4,tso6 udp_gso4=on udp_gro4=on ...``."""
        features = self.tun.features
        tun = "off" if features is None else ",".join(sorted(features)) or "none"
        udp = " ".join(f"{k}={'on' if v else 'off'}" for k, v in self.udp.features().items())
        return f"tun={tun} {udp}"

    def stop(self, reason: str, code: int = 0) -> None:
        if self._nursery is not None and not self.exit_reason:
            self.exit_reason, self.exit_code = reason, code
            self._nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Release everything; the socket file is removed only if it is still ours."""
        self.listener.close()
        try:
            stat = os.stat(self.socket_path)
        except OSError:
            stat = None
        if stat is not None and (stat.st_dev, stat.st_ino) == self._socket_id:
            _unlink(self.socket_path)
        self.udp.close()
        self.tun.close()

    # Data path ---------------------------------------------------------------------------

    async def _tun_loop(self) -> None:
        tun, device = self.tun, self.device
        while True:
            await trio.lowlevel.wait_readable(tun.fd)
            try:
                packets = tun.read_batch()
            except TunGone:
                self.stop("interface deleted")
                return
            except TunError as exc:
                log.error("Failed to read packet from TUN device: %s", exc)
                self.stop("TUN read failed", 1)
                return
            if packets:
                await self._send(device.send(packets, _now()))

    async def _udp_loop(self, udp: UdpSocket) -> None:
        device = self.device
        while True:
            try:
                batch = await udp.receive()
            except trio.ClosedResourceError:
                return  # rebound to another port
            to_tun, out = device.receive(batch, _now())
            if to_tun:
                try:
                    self.tun.write_batch(to_tun)
                except TunGone:
                    self.stop("interface deleted")
                    return
                except TunError as exc:
                    log.error("Failed to write packets to TUN device: %s", exc)
                    self.stop("TUN write failed", 1)
                    return
            await self._send(out)

    async def _send(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Send the core's datagrams, then let the timer task see earlier deadlines."""
        if datagrams:
            try:
                failed = await self.udp.send(datagrams)
            except trio.ClosedResourceError:
                failed = []  # the sockets were replaced while we waited to send
            for endpoint in failed:
                self.device.forget_source(endpoint)
        self._poke_timer()

    # Timers ------------------------------------------------------------------------------

    def _poke_timer(self) -> None:
        deadline = self.device.next_deadline()
        if deadline is not None and deadline < self._timer_deadline:
            self._timer_wake.set()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.device.next_deadline()
            self._timer_deadline = math.inf if deadline is None else deadline
            self._timer_wake = trio.Event()
            now = _now()
            if deadline is None or deadline > now:
                with trio.move_on_after(math.inf if deadline is None else deadline - now):
                    await self._timer_wake.wait()
                continue
            await self._send(self.device.tick(now))
            after = self.device.next_deadline()
            if after is not None and after <= now:
                await trio.sleep(_MIN_TIMER_SLEEP)

    # Watchers ----------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL)
            try:
                stat = os.stat(self.socket_path)
            except FileNotFoundError:
                stat = None
            if stat is None or (stat.st_dev, stat.st_ino) != self._socket_id:
                self.stop("UAPI socket removed")
                return
            if self.tun.refresh_mtu():
                log.debug("MTU updated: %d", self.tun.mtu)
                self.device.mtu = self.tun.mtu
            self.device.wall_offset = time.time() - _now()

    async def _signal_loop(self) -> None:
        signum = await stop_signals.first()
        self.stop(f"received {signum.name}")

    # UAPI (uapi_server.ConfigTarget) -----------------------------------------------------

    def get(self) -> str:
        return format_get(self.device.info())

    def stats(self) -> dict[str, int]:
        counters = {f"drop_{reason}": self.device.counters[reason] for reason in DROP_REASONS}
        counters["tun_read_dropped"] = self.tun.read_dropped
        counters["tun_write_dropped"] = self.tun.write_dropped
        counters["udp_send_errors"] = self.udp.send_errors
        return counters

    def set(self, change: DeviceChange) -> None:
        """Apply atomically: bind a new port first; on any failure change nothing."""
        old_mark = self.udp.fwmark
        mark = old_mark if change.fwmark is None else change.fwmark
        new_udp = None
        port = change.listen_port
        if port is not None and (port == 0 or port != self.udp.port):
            try:
                new_udp = UdpBind.open(port, mark, offload_=self.udp.offload)
            except OSError as exc:
                raise ConfigError("listen_port", f"cannot bind port {port}: {exc.strerror}",
                                  errno.EADDRINUSE) from None
            log.debug("UAPI: Updating listen port")
        elif mark != old_mark:
            try:
                self.udp.set_fwmark(mark)
            except OSError as exc:
                raise ConfigError("fwmark", f"cannot set fwmark {mark}: {exc.strerror}",
                                  errno.EADDRINUSE) from None
            log.debug("UAPI: Updating fwmark")
        try:
            out = self.device.apply(change, _now())
        except Exception:  # ConfigError, or a bug: either way keep the old sockets
            if new_udp is not None:
                new_udp.close()
            elif mark != old_mark:
                self.udp.set_fwmark(old_mark)
            raise
        if new_udp is not None:
            old_udp, self.udp = self.udp, new_udp
            old_udp.close()
            if self._nursery is not None:
                for udp in new_udp.sockets:
                    self._nursery.start_soon(self._udp_loop, udp)
        self.device.listen_port = self.udp.port
        if self._nursery is not None:
            self._nursery.start_soon(self._send, out)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
