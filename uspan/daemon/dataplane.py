"""The shell's side of the C data plane (``uspan.plane``, docs/dataplane.md): whether a
daemon uses it, and with which offloads.

The plane carries established sessions in a thread that never takes the GIL, so a packet
costs no trio wake; the shell keeps the core's decisions (``Daemon._plane_loop``).
``USPAN_PLANE=0`` keeps today's trio data path (reads, seals and opens in the event
loop), as does a build without the extension.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from uspan.daemon.ports import PlanePort

try:
    from uspan.plane._plane import (
        NEWS_URGENT,
        OFFLOAD_TUN_USO,
        OFFLOAD_TUN_VNET,
        OFFLOAD_UDP_GSO,
        PUNT_UDP,
        Plane,
    )
    COMPILED = True
except ImportError:  # built without a compiler or OpenSSL headers
    COMPILED = False
    NEWS_URGENT = 1 << 32
    OFFLOAD_TUN_VNET, OFFLOAD_TUN_USO, OFFLOAD_UDP_GSO = 1, 2, 4
    PUNT_UDP = 2

__all__ = ["COMPILED", "ENV", "NEWS_URGENT", "PUNT_UDP", "flags", "open_plane", "wanted"]

ENV = "USPAN_PLANE"  # "0": the trio data path even where the plane was built


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a daemon opened now carries its packets in the plane."""
    return COMPILED and environ.get(ENV, "1") != "0"


def flags(tun_features: frozenset[str] | None, udp_gso: bool) -> int:
    """The plane's ``offloads`` bits for a TUN and sockets set up as these say (from
    ``Tun.features`` and ``UdpSocket.gso``): the thread cuts TSO reads and merges what it
    writes only where the kernel took the offload, as the trio path does."""
    if tun_features is None:  # opened without IFF_VNET_HDR
        return 0
    bits = OFFLOAD_TUN_VNET
    if {"uso4", "uso6"} <= tun_features:
        bits |= OFFLOAD_TUN_USO
    if udp_gso:
        bits |= OFFLOAD_UDP_GSO
    return bits


def open_plane(tun_fd: int, sockets: list[int], mtu: int, offloads: int) -> PlanePort:
    """The compiled plane on these fds (not started: ``Daemon.run`` starts it, after any
    fork). Raises ValueError for a TUN it cannot carry (an MTU over ``MAX_MTU``)."""
    return Plane(tun_fd, sockets, mtu, offloads=offloads)
