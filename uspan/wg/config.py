"""Configuration changes for a device: one schema for the UAPI, the CLI and the mesh.

A ``DeviceChange`` mirrors a UAPI ``set=1`` request. ``Device.apply`` validates the whole
change first and applies it atomically, so a bad request leaves the device as it was.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from uspan.wg.endpoint import Endpoint

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Prefix = int  # an IP prefix as uspan.wg.prefix packs it (prefix.of(network) makes one)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the value."""

    def __init__(self, field_name: str, problem: str, errno: int = 22) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.errno = errno  # reported to UAPI clients as -errno (22 = EINVAL)


@dataclass(slots=True)
class PeerChange:
    """Changes to one peer; ``None`` means 'leave as it is'."""

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = None  # 32 zero bytes clear it
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None  # seconds, 0 = off
    replace_allowed_ips: bool = False
    allowed_ips: list[Prefix] = field(default_factory=list)
    # UAPI "allowed_ip=-...", applied after allowed_ips (a prefix in both ends up removed).
    remove_allowed_ips: list[Prefix] = field(default_factory=list)
    protocol_version: int | None = None
    # Start a handshake now, even within REKEY_TIMEOUT of the last: how the mesh checks an
    # endpoint it just picked. Not a UAPI key (``wg`` cannot ask for it).
    handshake: bool = False
    # A ``Device.peer_events`` count from the caller's latest facts: if the peer roamed
    # after it, an authenticated packet proved a path the caller did not know of, so the
    # endpoint and the handshake (checks of a path the caller picked) are skipped rather
    # than undo it. None: always apply. Not a UAPI key.
    unless_roamed_after: int | None = None


@dataclass(slots=True)
class DeviceChange:
    """Changes to the device and its peers, in request order."""

    private_key: bytes | None = None  # 32 zero bytes remove it
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerChange] = field(default_factory=list)
