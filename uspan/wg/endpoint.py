"""A peer's UDP endpoint, and the local address its packets arrived on (sticky source)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass


class EndpointError(ValueError):
    """An endpoint string is not ``IPv4:port`` or ``[IPv6]:port``."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to send a peer's datagrams.

    ``host`` is an IP literal (IPv6 without brackets; a link-local address may carry
    ``%scope``). ``local`` is our own address that the peer's last packet arrived on and
    ``ifindex`` its interface: replies leave from there (sticky source). The trio shell
    creates these for received datagrams and caches them, so the core can compare
    endpoints cheaply and keep the object it was given.
    """

    host: str
    port: int
    local: str | None = None
    ifindex: int = 0

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def discard_only(self) -> bool:
        """A pseudo-endpoint in 100::/64, RFC 6666's discard-only prefix (``uspan.relay``):
        never the source of a datagram on a socket. Only that prefix starts so."""
        return self.host.startswith("100:")

    def without_source(self) -> Endpoint:
        """This endpoint with the sticky source forgotten (fall back to routing)."""
        if self.local is None and self.ifindex == 0:
            return self
        return Endpoint(self.host, self.port)

    def source_key(self) -> bytes:
        """IP bytes || port (big-endian): what cookies and rate limits are keyed on."""
        return self.ip_key() + self.port.to_bytes(2, "big")

    def ip_key(self) -> bytes:
        """The packed remote IP alone (rate limiting is per source IP). inet_pton, not
        ``ipaddress``: a cookie reply under a flood needs it, at a tenth of the cost."""
        host = self.host.split("%", 1)[0]
        return socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``1.2.3.4:51820`` or ``[fd00::1]:51820`` (the UAPI form)."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise EndpointError(f"endpoint {text!r}: expected [IPv6]:port")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or ":" in host:
                raise EndpointError(f"endpoint {text!r}: expected IPv4:port or [IPv6]:port")
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError as exc:
            raise EndpointError(f"endpoint {text!r}: {host!r} is not an IP address") from exc
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise EndpointError(f"endpoint {text!r}: port must be 1-65535")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            host = str(ip.ipv4_mapped)
        elif "%" not in host:
            host = str(ip)
        return cls(host, int(port_text))

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"
