"""What the node reads of its machine's links over netlink: MACs for the KubeSpan address,
and the addresses it publishes as node addresses and endpoints."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from uspan.mesh.address import Link

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class MachineLinks:
    links: tuple[Link, ...]
    addresses: tuple[Address, ...]  # every address on every link but ``exclude``'s


def _physical(name: str) -> bool:
    """A link backed by a device (not veth, bridge, tun...), as Talos's "physical"."""
    return os.path.exists(f"/sys/class/net/{name}/device")


def read_links(exclude: str | None = None) -> MachineLinks:
    """The links and addresses of the current network namespace, in name order."""
    with IPRoute() as ipr:
        names: dict[int, str] = {}
        links: list[Link] = []
        for message in ipr.get_links():
            name = message.get("ifname")
            if not name:
                continue
            names[message["index"]] = name
            raw = message.get("address")
            mac = bytes.fromhex(raw.replace(":", "")) if raw and raw.count(":") == 5 else None
            if mac == bytes(6):
                mac = None
            links.append(Link(name, mac, _physical(name)))
        addresses: list[Address] = []
        for message in ipr.get_addr():
            if names.get(message["index"]) in (None, exclude):
                continue
            value = message.get("address")
            if value:
                addresses.append(ipaddress.ip_address(value))
    links.sort(key=lambda link: link.name)
    return MachineLinks(tuple(links), tuple(addresses))
