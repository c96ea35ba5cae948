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
    from uspan.plane._plane import NEWS_URGENT, PUNT_UDP, Plane
    COMPILED = True
except ImportError:  # built without a compiler or OpenSSL headers
    COMPILED = False
    NEWS_URGENT = 1 << 32
    PUNT_UDP = 2

__all__ = ["COMPILED", "ENV", "NEWS_URGENT", "PUNT_UDP", "offloads", "open_plane", "wanted"]

ENV = "USPAN_PLANE"  # "0": the trio data path even where the plane was built


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a daemon opened now carries its packets in the plane."""
    return COMPILED and environ.get(ENV, "1") != "0"


def offloads(requested: bool, plane: bool) -> bool:
    """Whether the TUN and the sockets get kernel offloads: the one place that decides
    the offload/plane combination. The plane's thread reads plain packets and datagrams
    until its offloads land (branch ``planegso``: ``Plane(..., offloads=flags)``), so a
    daemon with the plane opens both without them for now."""
    return requested and not plane


def open_plane(tun_fd: int, sockets: list[int], mtu: int) -> PlanePort:
    """The compiled plane on these fds (not started: ``Daemon.run`` starts it, after any
    fork)."""
    return Plane(tun_fd, sockets, mtu)
