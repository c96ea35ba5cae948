"""The TUN device: open or attach by name, then move packet batches through its fd.

After ``open`` the device is used only through its file descriptor, so it keeps working
when the interface is moved to another network namespace. Reads and writes are
non-blocking; the caller waits for readability (trio) and then drains a batch.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import pytun

from uspan.wg.constants import DEFAULT_MTU

IFNAMSIZ = 16
BATCH = 128  # packets per read_batch, like wireguard-go's batch size
_SIOCGIFMTU = 0x8921
_SIOCGIFINDEX = 0x8933
_BUFFER_SIZE = 65536  # larger than any MTU: a read never truncates
# Errors a TUN fd reports once its interface has been deleted.
_GONE = frozenset({errno.EBADFD, errno.EIO, errno.ENODEV, errno.ENXIO, errno.EBADF,
                   errno.EPIPE})


class TunError(OSError):
    """The TUN device could not be opened or failed."""


class TunGone(TunError):
    """The interface was deleted: its fd reports EBADFD/EIO/... on read or write."""


def validate_name(name: str) -> str:
    """Return ``name`` if the kernel accepts it as an interface name, else raise ValueError."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r}: must be 1-{IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise ValueError(f"interface name {name!r}: must not be '.', '..' or contain '/', "
                         "':' or whitespace")
    return name


class Tun:
    """An open TUN interface (IFF_TUN | IFF_NO_PI), non-blocking."""

    def __init__(self, device: pytun.TunTapDevice, name: str, ifindex: int, mtu: int) -> None:
        self._device = device
        self.name = name
        self.ifindex = ifindex
        self.mtu = mtu
        self.fd: int = device.fileno()
        self.write_dropped = 0  # packets the kernel refused (malformed, queue full)
        self._buffer = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buffer)

    @classmethod
    def open(cls, name: str, mtu: int = DEFAULT_MTU) -> Tun:
        """Create ``name``, or attach to a persistent TUN of that name if one exists.

        A new interface gets ``mtu``; an existing one keeps its own.
        """
        validate_name(name)
        try:
            socket.if_nametoindex(name)
            existed = True
        except OSError:
            existed = False
        try:
            device = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as exc:
            raise TunError(f"cannot open TUN {name!r}: {exc}") from exc
        try:
            os.set_blocking(device.fileno(), False)
            if not existed:
                device.mtu = mtu
            ifindex = socket.if_nametoindex(name)
            actual_mtu = _query(name, _SIOCGIFMTU)
        except (OSError, pytun.Error) as exc:
            device.close()
            raise TunError(f"cannot set up TUN {name!r}: {exc}") from exc
        return cls(device, name, ifindex, actual_mtu)

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

    def read_batch(self, limit: int = BATCH) -> list[bytes]:
        """Read packets until the fd would block or ``limit`` is reached."""
        packets: list[bytes] = []
        fd, buffer, view = self.fd, [self._buffer], self._view
        while len(packets) < limit:
            try:
                size = os.readv(fd, buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise _failure("read", exc) from exc
            if size <= 0:
                break
            packets.append(bytes(view[:size]))
        return packets

    def write_batch(self, packets: list[bytes]) -> None:
        """Write packets; ones the kernel refuses are counted in ``write_dropped``."""
        fd = self.fd
        for packet in packets:
            try:
                os.write(fd, packet)
            except (BlockingIOError, InterruptedError):
                self.write_dropped += 1
            except OSError as exc:
                if exc.errno in _GONE:
                    raise _failure("write", exc) from exc
                self.write_dropped += 1

    def close(self) -> None:
        self._device.close()


def _failure(operation: str, exc: OSError) -> TunError:
    kind = TunGone if exc.errno in _GONE else TunError
    return kind(exc.errno or 0, f"TUN {operation} failed: {exc.strerror}")


def _query(name: str, request: int) -> int:
    """An int-valued SIOCGIF* ioctl for interface ``name``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request_data = struct.pack("16si", name.encode(), 0)
        result = fcntl.ioctl(sock, request, request_data)
    return int(struct.unpack("16si", result)[1])
