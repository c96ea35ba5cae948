"""The TUN device: open or attach by name, then move packet batches through its fd.

After ``open`` the device is used only through its file descriptor, so it keeps working
when the interface is moved to another network namespace. Reads and writes are
non-blocking; the caller waits for readability (trio) and then drains a batch.

With offloads (the default) the TUN is opened with IFF_VNET_HDR and TUNSETOFFLOAD: one
read may return a TCP (or UDP, with USO) super-segment of up to 64 KiB, which is split
into MTU-sized packets, and written packets are coalesced per flow into super-segments.
Whatever the kernel refuses is simply off.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import pytun
import trio

from uspan import privilege
from uspan.daemon import gso, offload
from uspan.daemon.ports import TunError, TunGone
from uspan.wg.constants import DEFAULT_MTU

IFNAMSIZ = 16
BATCH = 128  # packets per read_batch, like wireguard-go's batch size
_SIOCGIFMTU = 0x8921
_SIOCGIFINDEX = 0x8933
_BUFFER_SIZE = gso.VNET_HDR_LEN + 65536  # a read never truncates
# Errors a TUN fd reports once its interface has been deleted. Writes to an interface
# that is merely down fail with EIO: those packets are dropped, the daemon stays.
_GONE = frozenset({errno.EBADFD, errno.EIO, errno.ENODEV, errno.ENXIO, errno.EBADF,
                   errno.EPIPE})
_WRITE_GONE = frozenset({errno.EBADFD, errno.ENODEV, errno.ENXIO, errno.EBADF})


def validate_name(name: str) -> str:
    """Return ``name`` if the kernel accepts it as an interface name, else raise ValueError."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r}: must be 1-{IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise ValueError(f"interface name {name!r}: must not be '.', '..' or contain '/', "
                         "':' or whitespace")
    return name


class Tun:
    """An open TUN interface (IFF_TUN | IFF_NO_PI, IFF_VNET_HDR with offloads), non-blocking."""

    def __init__(self, device: pytun.TunTapDevice, name: str, ifindex: int, mtu: int,
                 features: frozenset[str] | None) -> None:
        self._device = device
        self.name = name
        self.ifindex = ifindex
        self.mtu = mtu
        self.fd: int = device.fileno()
        # None: no virtio_net_hdr at all; else the offloads the kernel accepted.
        self.features = features
        self._coalesce_udp = features is not None and {"uso4", "uso6"} <= features
        self.write_dropped = 0  # packets the kernel refused (malformed, queue full)
        self.read_dropped = 0  # super-segments that could not be split
        self._buffer = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buffer)

    @classmethod
    def open(cls, name: str, mtu: int = DEFAULT_MTU, *, offload_: bool = True) -> Tun:
        """Create ``name``, or attach to a persistent TUN of that name if one exists.

        A new interface gets ``mtu``; an existing one keeps its own. With ``offload_``
        the richest offload set the kernel accepts is enabled (see module docstring).
        """
        validate_name(name)
        try:
            socket.if_nametoindex(name)
            existed = True
        except OSError:
            existed = False
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        device = None
        if offload_:
            try:
                device = pytun.TunTapDevice(name=name, flags=flags | pytun.IFF_VNET_HDR)
            except pytun.Error:
                device = None  # this kernel or TUN refuses vnet headers: go without
        try:
            if device is None:
                device = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as exc:
            raise _open_error(name, exc) from exc
        try:
            os.set_blocking(device.fileno(), False)
            features = None
            if offload_ and device is not None and _has_vnet_hdr(device.fileno()):
                features = frozenset(offload.enable_tun_offload(device.fileno()))
            if not existed:
                device.mtu = mtu
            ifindex = socket.if_nametoindex(name)
            actual_mtu = _query(name, _SIOCGIFMTU)
        except (OSError, pytun.Error) as exc:
            device.close()
            raise TunError(f"cannot set up TUN {name!r}: {exc}") from exc
        return cls(device, name, ifindex, actual_mtu, features)

    def refresh_mtu(self) -> bool:
        """Re-read the MTU while the interface is still visible here; True if it changed.

        Once the interface has moved to another namespace the name no longer resolves to
        our ifindex, and the last known MTU is kept.
        """
        try:
            if _query(self.name, _SIOCGIFINDEX) != self.ifindex:
                return False
            mtu = _query(self.name, _SIOCGIFMTU)
        except OSError:
            return False
        changed = mtu != self.mtu
        self.mtu = mtu
        return changed

    async def read(self) -> list[bytes]:
        """Wait until the fd is readable, then read a batch (``TunPort``)."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            packets = self.read_batch()
            if packets:
                return packets

    async def write(self, packets: list[bytes]) -> None:
        """``write_batch`` (``TunPort``): never waits, a full queue drops."""
        self.write_batch(packets)

    def describe(self) -> str:
        features = self.features
        return "tun=" + ("off" if features is None else ",".join(sorted(features)) or "none")

    def read_batch(self, limit: int = BATCH) -> list[bytes]:
        """Read until the fd would block or ``limit`` reads; super-segments are split."""
        packets: list[bytes] = []
        fd, buffer, view = self.fd, [self._buffer], self._view
        vnet = self.features is not None
        hdr_len = gso.VNET_HDR_LEN
        for _ in range(limit):
            try:
                size = os.readv(fd, buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise _failure("read", exc) from exc
            if size <= 0:
                break
            if not vnet:
                packets.append(bytes(view[:size]))
            elif view[0] == 0 and view[1] == 0:  # no checksum to finish, not a super-segment
                packets.append(bytes(view[hdr_len:size]))
            else:
                try:
                    packets.extend(gso.segment(view[:hdr_len], view[hdr_len:size], self.mtu))
                except gso.OffloadError:
                    self.read_dropped += 1
        return packets

    def write_batch(self, packets: list[bytes]) -> None:
        """Write packets (coalesced per flow with offloads); refusals count in write_dropped."""
        if self.features is None:
            for packet in packets:
                self._write((packet,))
            return
        for header, packet in gso.coalesce(packets, udp=self._coalesce_udp):
            self._write((header, packet))

    def _write(self, buffers: tuple[bytes, ...]) -> None:
        try:
            os.writev(self.fd, buffers)
        except (BlockingIOError, InterruptedError):
            self.write_dropped += 1
        except OSError as exc:
            if exc.errno in _WRITE_GONE:
                raise _failure("write", exc) from exc
            self.write_dropped += 1

    def check(self) -> None:
        """Raise TunGone once the interface is deleted (``TunPort``: the data plane's
        thread reads the fd, so no read of ours would notice)."""
        try:
            fcntl.ioctl(self.fd, _TUNGETIFF, struct.pack("16sH", b"", 0))
        except OSError as exc:
            raise _failure("read", exc) from exc

    def close(self) -> None:
        self._device.close()


def _open_error(name: str, exc: pytun.Error) -> TunError:
    """A one-line TunError keeping the errno and, for a missing privilege, what grants it."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    text = exc.args[1] if len(exc.args) > 1 else str(exc)
    error = TunError(privilege.with_hint(f"cannot open TUN {name!r}: {text}",
                                         privilege.tun_hint(code)))
    error.errno = code
    return error


def _failure(operation: str, exc: OSError) -> TunError:
    kind = TunGone if exc.errno in _GONE else TunError
    return kind(exc.errno or 0, f"TUN {operation} failed: {exc.strerror}")


def _query(name: str, request: int) -> int:
    """An int-valued SIOCGIF* ioctl for interface ``name``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request_data = struct.pack("16si", name.encode(), 0)
        result = fcntl.ioctl(sock, request, request_data)
    return int(struct.unpack("16si", result)[1])


_TUNGETIFF = 0x800454D2


def _has_vnet_hdr(fd: int) -> bool:
    """Whether the fd really carries virtio_net_hdr (attaching may not grant it)."""
    result = fcntl.ioctl(fd, _TUNGETIFF, struct.pack("16sH", b"", 0))
    return bool(struct.unpack("16sH", result[:18])[1] & offload.IFF_VNET_HDR)
