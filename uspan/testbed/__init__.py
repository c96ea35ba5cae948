"""A testbed on one machine: network namespaces, veth links and WireGuard daemons.

A ``Lab`` owns everything it creates — uniquely named namespaces, the processes it
started (including daemonized WireGuard children, found as the owner of their UAPI
socket), UAPI sockets and extra files — and removes all of it in ``close()``, which the
context manager calls even when the body fails. Works with any implementation that
follows the ``wireguard-go`` launch contract (``PROG [-f] IFACE``), driven by ``wg``.

Private keys only ever travel through files of mode 0600 in the lab's private
directory; they never appear on a command line, in a log or in an exception.
Addresses used here belong only to namespaces the lab created.

Serves the demo, the system tests, the benchmarks and the coming lab. Modules:
``process`` (commands, polling, owned processes), ``namespace`` (namespaces, veths),
``wireguard`` (daemons driven by ``wg``, ``WgKeys``, ``PeerConfig``, ``wg show`` dumps),
``lab`` (the ``Lab`` that owns it all).
"""

from uspan.testbed.lab import Lab
from uspan.testbed.namespace import Namespace, Veth
from uspan.testbed.process import NetnsError, poll, run
from uspan.testbed.wireguard import (
    UAPI_DIR,
    InterfaceStatus,
    PeerConfig,
    PeerStatus,
    WgKeys,
    WireGuard,
    genkey,
    genpsk,
    parse_dump,
)

__all__ = [
    "UAPI_DIR",
    "InterfaceStatus",
    "Lab",
    "Namespace",
    "NetnsError",
    "PeerConfig",
    "PeerStatus",
    "Veth",
    "WgKeys",
    "WireGuard",
    "genkey",
    "genpsk",
    "parse_dump",
    "poll",
    "run",
]
