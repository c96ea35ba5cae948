"""Endpoint filters as Talos writes them: ``CIDR`` includes, ``!CIDR`` excludes.

An address passes when no exclude contains it and, if there are includes at all, one of
them does. With no filters every address passes (Talos's default: advertise everything).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class EndpointFilters:
    include: tuple[Network, ...] = ()
    exclude: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: Sequence[str]) -> EndpointFilters:
        """Parse ``["0.0.0.0/0", "!10.0.0.0/8"]``; ValueError names the bad entry."""
        include: list[Network] = []
        exclude: list[Network] = []
        for entry in entries:
            negated = entry.startswith("!")
            text = entry[1:] if negated else entry
            try:
                network = ipaddress.ip_network(text.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a CIDR or !CIDR") from exc
            (exclude if negated else include).append(network)
        return cls(tuple(include), tuple(exclude))

    def allows(self, address: Address) -> bool:
        if any(address in network for network in self.exclude):
            return False
        return not self.include or any(address in network for network in self.include)
