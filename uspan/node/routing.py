"""The node's routing, as Talos's KubeSpan sets it up, over netlink (pyroute2).

A peer's allowed IPs include its node addresses, which are also its endpoints. So the
mesh routes live in a table of their own (``table``), consulted through one rule per
family for packets that do *not* carry the node's firewall mark; the node's WireGuard
sockets set that mark, so the tunnel's own datagrams to those same addresses take the
main table and never loop back into the tunnel. Everything added here is removed by
``close()``: the rules, the routes, and the address (the link goes with the TUN).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_TABLE = 180  # Talos's KubeSpan routing table
DEFAULT_FWMARK = 0x20  # Talos's KubeSpan firewall mark
RULE_PRIORITY = 32500  # before the main table (32766)
_FIB_RULE_INVERT = 0x2  # "not fwmark": the rule matches packets *without* the mark
_ENOENT, _EEXIST, _ESRCH = 2, 17, 3


class RoutingError(RuntimeError):
    """A netlink request for the node's routing failed; the message names the object."""


class MeshRouting:
    """The address, rules and routes of one mesh interface, kept in step with the peers.

    ``netns`` names a namespace to work in (tests); the node itself runs inside its own.
    """

    def __init__(self, interface: str, *, table: int = DEFAULT_TABLE,
                 fwmark: int = DEFAULT_FWMARK, netns: str | None = None) -> None:
        self.interface = interface
        self.table = table
        self.fwmark = fwmark
        self._ipr = IPRoute() if netns is None else IPRoute(netns=netns)
        self._index = 0
        self._address: Interface | None = None
        self._rules: list[int] = []
        self._routes: set[Network] = set()

    def bring_up(self, address: Interface, mtu: int) -> None:
        """Set the MTU, add ``address`` (the KubeSpan /128 on its /64), link up, rules."""
        found = self._ipr.link_lookup(ifname=self.interface)
        if not found:
            raise RoutingError(f"interface {self.interface} does not exist")
        self._index = found[0]
        self._request(f"set MTU {mtu} on {self.interface}", "link", "set",
                      index=self._index, mtu=mtu, state="up")
        self.set_address(address)
        for family in (socket.AF_INET, socket.AF_INET6):
            self._request(f"add rule to table {self.table}", "rule", "add", family=family,
                          table=self.table, priority=RULE_PRIORITY, fwmark=self.fwmark,
                          fwmask=self.fwmark, flags=_FIB_RULE_INVERT, exist_ok=True)
            self._rules.append(family)

    def set_address(self, address: Interface) -> None:
        """Replace the interface's mesh address (it is recomputed on every start)."""
        if address == self._address:
            return
        if self._address is not None:
            self._drop_address()
        self._request(f"add address {address} to {self.interface}", "addr", "add",
                      index=self._index, address=str(address.ip),
                      prefixlen=address.network.prefixlen, exist_ok=True)
        self._address = address

    def set_mtu(self, mtu: int) -> None:
        self._request(f"set MTU {mtu} on {self.interface}", "link", "set",
                      index=self._index, mtu=mtu)

    def sync_routes(self, wanted: Iterable[Network]) -> tuple[int, int]:
        """Make the mesh table hold exactly ``wanted``; returns (added, removed)."""
        target = set(wanted)
        added = removed = 0
        for network in sorted(self._routes - target, key=_order):
            self._route("del", network)
            self._routes.discard(network)
            removed += 1
        for network in sorted(target - self._routes, key=_order):
            self._route("add", network)
            self._routes.add(network)
            added += 1
        return added, removed

    @property
    def routes(self) -> frozenset[Network]:
        return frozenset(self._routes)

    def close(self) -> None:
        """Remove the rules, routes and address this object added; never raises."""
        for network in list(self._routes):
            self._route("del", network, quiet=True)
        self._routes.clear()
        for family in self._rules:
            self._request("del rule", "rule", "del", family=family, table=self.table,
                          priority=RULE_PRIORITY, fwmark=self.fwmark, fwmask=self.fwmark,
                          flags=_FIB_RULE_INVERT, quiet=True)
        self._rules.clear()
        if self._address is not None:
            self._drop_address()
        self._ipr.close()

    def _drop_address(self) -> None:
        assert self._address is not None
        self._request("del address", "addr", "del", index=self._index,
                      address=str(self._address.ip),
                      prefixlen=self._address.network.prefixlen, quiet=True)
        self._address = None

    def _route(self, verb: str, network: Network, *, quiet: bool = False) -> None:
        family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
        self._request(f"{verb} route {network} in table {self.table}", "route", verb,
                      family=family, dst=str(network.network_address),
                      dst_len=network.prefixlen, oif=self._index, table=self.table,
                      quiet=quiet, exist_ok=verb == "add")

    def _request(self, what: str, kind: str, verb: str, *, quiet: bool = False,
                 exist_ok: bool = False, **attrs: object) -> None:
        try:
            getattr(self._ipr, kind)(verb, **attrs)
        except NetlinkError as exc:
            if quiet or (exist_ok and exc.code == _EEXIST) or (
                    verb == "del" and exc.code in (_ENOENT, _ESRCH)):
                return
            raise RoutingError(f"{what}: {exc.args[-1] if exc.args else exc}") from None
        except OSError as exc:
            if not quiet:
                raise RoutingError(f"{what}: {exc.strerror or exc}") from None


def _order(network: Network) -> tuple[int, str]:
    return network.version, str(network)
