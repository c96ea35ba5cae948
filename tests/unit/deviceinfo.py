"""What ``get=1`` reports of a device, as values a test can compare before and after.

Built from the device's public attributes, not from the reply's text: a refused change
must leave the device itself as it was, and the reply is rendered partly from lines the
device keeps (``Peer.get_head``), which a comparison of texts would take on trust. The
fuzz targets compare the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

from uspan.wg import prefix
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint


@dataclass(slots=True)
class PeerInfo:
    public_key: bytes
    preshared_key: bytes
    endpoint: Endpoint | None
    last_handshake_wall: float | None  # Unix seconds, None = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int
    allowed_ips: list[str]  # as get=1 lists them: "10.0.0.0/24", in the order given


@dataclass(slots=True)
class DeviceInfo:
    private_key: bytes | None
    public_key: bytes | None
    listen_port: int
    fwmark: int
    peers: list[PeerInfo]


def device_info(device: Device) -> DeviceInfo:
    """The device and its peers as ``get=1`` reports them."""
    wall_offset, allowed = device.wall_offset, device.allowed_ips
    return DeviceInfo(
        private_key=device.private_key,
        public_key=device.public_key,
        listen_port=device.listen_port,
        fwmark=device.fwmark,
        peers=[PeerInfo(
            public_key=peer.public_key,
            preshared_key=peer.preshared_key,
            endpoint=peer.endpoint,
            last_handshake_wall=(None if peer.last_handshake is None
                                 else peer.last_handshake + wall_offset),
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
            persistent_keepalive=peer.persistent_keepalive,
            allowed_ips=prefix.texts(allowed.prefixes(peer)),
        ) for peer in device.peers.values()],
    )
