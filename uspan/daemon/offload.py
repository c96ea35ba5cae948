"""Kernel offloads, the system-call half: TUN offload ioctls and UDP GSO/GRO sockets.

``TUNSETOFFLOAD`` lets the TUN hand us super-segments (and take them back); on the UDP
socket ``UDP_SEGMENT`` sends many equal-sized datagrams with one ``sendmsg`` and
``UDP_GRO`` receives many as one buffer plus a ``gso_size`` control message. What is
done to the bytes lives in ``gso`` (pure, tested without a kernel).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from typing import NamedTuple

from uspan.daemon.gso import OffloadError, split_gro

# --- TUN ioctls and offload flags (include/uapi/linux/if_tun.h) ------------------------

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

# Offload sets tried by ``enable_tun_offload``, richest first (USO needs Linux 6.2).
_TUN_OFFLOADS: tuple[tuple[int, frozenset[str]], ...] = (
    (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
     frozenset({"csum", "tso4", "tso6", "uso4", "uso6"})),
    (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, frozenset({"csum", "tso4", "tso6"})),
    (TUN_F_CSUM, frozenset({"csum"})),
)

# --- UDP socket offloads (include/uapi/linux/udp.h) ------------------------------------

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_PKTINFO = 8  # not exported by Python's socket module
RECV_BUFFER_SIZE = 65535  # a coalesced datagram is at most this long
GRO_ANCBUFSIZE = (
    socket.CMSG_SPACE(4)  # UDP_GRO: int gso_size
    + socket.CMSG_SPACE(12)  # IP_PKTINFO: struct in_pktinfo
    + socket.CMSG_SPACE(20)  # IPV6_PKTINFO: struct in6_pktinfo
)

# --- the TUN device ---------------------------------------------------------------------


def enable_tun_offload(fd: int) -> set[str]:
    """Enable the richest offload set the kernel accepts on a TUN fd; return its names.

    Names are "csum", "tso4", "tso6", "uso4", "uso6"; an empty set means none. The TUN
    must have been opened with IFF_VNET_HDR for reads and writes to carry the header.
    """
    for flags, names in _TUN_OFFLOADS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            continue
        return set(names)
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return set()

# --- the UDP socket ---------------------------------------------------------------------


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to coalesce received datagrams (UDP_GRO); False if unsupported."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    return True


def probe_udp_gso(sock: socket.socket) -> bool:
    """Whether the kernel knows UDP_SEGMENT (send offload) on this socket."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    return True


def gso_send_unsupported(exc: OSError) -> bool:
    """Whether a UDP_SEGMENT send failed because the path cannot segment (EIO): stop
    using GSO on that socket and resend plainly, as wireguard-go does."""
    return exc.errno == errno.EIO


def gso_cmsg(size: int) -> tuple[int, int, bytes]:
    """The ancillary item that makes ``sendmsg`` cut its buffer into ``size``-byte datagrams."""
    if not 0 < size <= 0xFFFF:
        raise OffloadError(f"UDP_SEGMENT size {size}: must be 1-65535")
    return (SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))


def enable_pktinfo(sock: socket.socket) -> None:
    """Have every received datagram carry its local address and interface index."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


class GroBatch(NamedTuple):
    """What one ``recv_batch_gro`` drained."""

    groups: list[GroDatagrams]
    truncated: int  # receives dropped: their control data did not fit (MSG_CTRUNC)


class GroDatagrams(NamedTuple):
    """The datagrams of one receive from one source, and where they arrived."""

    datagrams: list[bytes]
    address: tuple[str, int] | tuple[str, int, int, int]  # the sender, as recvmsg gives it
    pktinfo: bytes  # the raw IP/IPV6_PKTINFO data, b"" if none: ``arrival`` reads it
    gso_size: int  # 0 if the kernel did not coalesce


def recv_batch_gro(sock: socket.socket, buf: bytearray | memoryview,
                   ancbufsize: int = GRO_ANCBUFSIZE, limit: int = 128) -> GroBatch:
    """Drain up to ``limit`` receives from a non-blocking UDP socket into ``buf``.

    Each receive may hold many datagrams coalesced by UDP_GRO; they come back split and
    copied, so ``buf`` can be reused. ``buf`` must hold 65535 bytes and ``ancbufsize``
    at least GRO_ANCBUFSIZE (else OffloadError). A receive with MSG_CTRUNC (other control
    messages enabled on the socket) is dropped and counted in ``truncated``: a lost
    gso_size would glue its datagrams together.
    """
    if len(buf) < RECV_BUFFER_SIZE:
        raise OffloadError(f"receive buffer of {len(buf)} bytes: need {RECV_BUFFER_SIZE}")
    if ancbufsize < GRO_ANCBUFSIZE:
        raise OffloadError(f"ancbufsize {ancbufsize}: need at least {GRO_ANCBUFSIZE}")
    view = memoryview(buf)
    buffers = [buf]
    out: list[GroDatagrams] = []
    truncated = 0
    for _ in range(limit):
        try:
            size, ancillary, flags, address = sock.recvmsg_into(buffers, ancbufsize)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # e.g. a queued ICMP error; the next datagram may be fine
            continue
        if flags & socket.MSG_CTRUNC:
            truncated += 1
            continue
        gso_size, info = 0, b""
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO:
                gso_size = struct.unpack_from("=i" if len(data) >= 4 else "=H", data)[0]
            elif ((level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12)
                  or (level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
                      and len(data) >= 20)):
                info = data
        out.append(GroDatagrams(split_gro(view[:size], gso_size), address, info, gso_size))
    return GroBatch(out, truncated)


def arrival(address: tuple[str, int] | tuple[str, int, int, int],
            info: bytes) -> tuple[str | None, int]:
    """The local address a datagram from ``address`` was sent to and the interface it
    arrived on (0 if unknown), from the data of its IP_PKTINFO (12 bytes) or
    IPV6_PKTINFO (20) message."""
    if len(address) == 2 and len(info) >= 12:
        return socket.inet_ntop(socket.AF_INET, info[4:8]), struct.unpack_from("=i", info)[0]
    if len(address) == 4 and len(info) >= 20:
        return socket.inet_ntop(socket.AF_INET6, info[:16]), struct.unpack_from("=i", info, 16)[0]
    return None, 0
