"""wireguard-go nodes in a lab, and the lab agent that joins them to the mesh.

A wireguard-go node is a plain WireGuard peer: the lab gives it a key (in its state
directory, 0600), the KubeSpan-style address its key implies, listen port 51820 and the
MTU. It runs in a mount namespace where the node's ``run`` directory is mounted over
``/run``, so its UAPI socket lands in the lab directory, never in the machine's
``/var/run/wireguard``.

The agent (``uspan lab agent``, one background process per lab with wireguard-go
nodes, in the switch namespace) does what a KubeSpan node does for itself, so the mixed
mesh forms with no hand work:

- it publishes an affiliate for each wireguard-go node through the discovery client
  (``DiscoveryClient`` + ``encode_affiliate``: its key, address and underlay endpoints,
  no node addresses), with the longest TTL (30 min), refreshed every 15 min and after
  every reconnection (a restarted in-memory service has forgotten it);
- it watches the affiliates and configures each wireguard-go node's peers from them
  (every affiliate with a KubeSpan key: its address as allowed IP, the cluster secret as
  preshared key, persistent keepalive 25 s, an endpoint on a lab network when the peer
  is new), every 2 s and on every change; peers whose affiliate was deleted (they left)
  are removed, but not those a restarted service merely does not list yet.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from uspan.daemon import uapi_client
from uspan.daemon.uapi_client import UapiClientError
from uspan.discovery import client as dclient
from uspan.lab import plan
from uspan.lab.record import LabError, LabRecord, NodeRecord
from uspan.mesh import address as mesh_address
from uspan.mesh.affiliate import (
    Affiliate,
    AffiliateDecodeError,
    KubeSpanInfo,
    decode_affiliate,
    encode_affiliate,
)
from uspan.mesh.config import NodeConfig, parse_config
from uspan.wg.endpoint import Endpoint

log = logging.getLogger("uspan.lab.agent")

TTL = 30 * 60.0
KEEPALIVE = 25
RECONCILE = 2.0
KEY_FILE = "wireguard-go.key"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_node_id() -> str:
    number = int.from_bytes(secrets.token_bytes(32), "big")
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    return "".join(reversed(digits)) or "0"


def private_key(record: LabRecord, node: NodeRecord) -> bytes:
    """The node's key, created on first use (mode 0600)."""
    path = record.state_dir(node) / KEY_FILE
    if not path.exists():
        key = X25519PrivateKey.generate().private_bytes_raw()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(base64.b64encode(key).decode() + "\n")
    return base64.b64decode(path.read_text().strip())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def kubespan_address(config: NodeConfig, public: bytes) -> ipaddress.IPv6Address:
    return mesh_address.node_address(mesh_address.cluster_subnet(config.cluster.id), None,
                                     public)


def cluster_config(record: LabRecord) -> NodeConfig:
    return parse_config((record.dir / "cluster.yaml").read_text())


def endpoints(record: LabRecord, node: NodeRecord) -> list[Endpoint]:
    found = []
    for k in range(record.networks):
        seen = plan.visible(node.index, k, node.nat is not None)
        found.append(Endpoint(seen.v4, plan.WG_PORT))
    for k in range(record.networks):
        seen = plan.visible(node.index, k, node.nat is not None)
        if seen.v6 is not None:
            found.append(Endpoint(seen.v6, plan.WG_PORT))
    return found


def affiliate(record: LabRecord, node: NodeRecord, config: NodeConfig) -> Affiliate:
    assert node.node_id is not None
    public = public_key(private_key(record, node))
    info = KubeSpanInfo(public, kubespan_address(config, public), (),
                        tuple(endpoints(record, node)))
    return Affiliate(node.node_id, node.name, node.name, (), info)


# UAPI (the wireguard-go socket in the lab directory) ---------------------------------------


def uapi(path: Path, request: str, timeout: float = 5.0) -> list[str]:
    """One request on the wireguard-go node's UAPI socket (errno checked)."""
    return uapi_client.request(path, request, timeout)


@dataclass
class WgPeer:
    public_key: bytes
    endpoint: str | None = None
    last_handshake: int = 0
    rx: int = 0
    tx: int = 0


def get_peers(path: Path) -> dict[bytes, WgPeer]:
    peers: dict[bytes, WgPeer] = {}
    current: WgPeer | None = None
    for line in uapi(path, "get=1\n\n"):
        key, _, value = line.partition("=")
        if key == "public_key":
            current = WgPeer(bytes.fromhex(value))
            peers[current.public_key] = current
        elif current is None:
            continue
        elif key == "endpoint":
            current.endpoint = value
        elif key == "last_handshake_time_sec":
            current.last_handshake = int(value)
        elif key == "rx_bytes":
            current.rx = int(value)
        elif key == "tx_bytes":
            current.tx = int(value)
    return peers


def configure_device(record: LabRecord, node: NodeRecord) -> None:
    """Key and port of a freshly started wireguard-go node (peers: the agent's job)."""
    key = private_key(record, node)
    uapi(record.uapi_path(node),
         f"set=1\nprivate_key={key.hex()}\nlisten_port={plan.WG_PORT}\n\n")


# The agent ---------------------------------------------------------------------------------


def _reachable(record: LabRecord, node: NodeRecord, endpoint: Endpoint) -> bool:
    if plan.network_of(endpoint.host, record.networks) is None:
        return False
    return not (node.nat is not None and ":" in endpoint.host)


def reconcile(record: LabRecord, node: NodeRecord, config: NodeConfig,
              affiliates: dict[str, dclient.Affiliate]) -> None:
    """Make ``node``'s peers those of the affiliates (one UAPI get, one set)."""
    ours = public_key(private_key(record, node))
    wanted: dict[bytes, tuple[KubeSpanInfo, list[Endpoint]]] = {}
    for raw in affiliates.values():
        if raw.data is None:
            continue
        try:
            member = decode_affiliate(raw.data, raw.id)
        except AffiliateDecodeError:
            continue
        if member.kubespan is None or member.kubespan.public_key == ours:
            continue
        observed = [Endpoint(host, port) for host, port in raw.endpoints]
        wanted[member.kubespan.public_key] = (member.kubespan,
                                              [*member.kubespan.endpoints, *observed])
    path = record.uapi_path(node)
    current = get_peers(path)
    psk = config.cluster.secret_bytes.hex()
    lines = ["set=1"]
    for key in current:
        if key not in wanted:
            lines += [f"public_key={key.hex()}", "remove=true"]
    for key, (info, candidates) in wanted.items():
        if key in current:
            continue
        lines += [f"public_key={key.hex()}", f"preshared_key={psk}",
                  f"persistent_keepalive_interval={KEEPALIVE}", "replace_allowed_ips=true",
                  f"allowed_ip={info.address}/128"]
        usable = [e for e in candidates if _reachable(record, node, e)]
        usable.sort(key=lambda e: ":" in e.host)  # IPv4 first
        if usable:
            lines.append(f"endpoint={usable[0]}")
    if len(lines) > 1:
        uapi(path, "\n".join(lines) + "\n\n")
        log.info("%s: peers set (%d wanted, %d were there)", node.name, len(wanted),
                 len(current))


async def run_agent(record: LabRecord) -> None:
    config = cluster_config(record)
    nodes = [n for n in record.nodes if n.wgo]
    affiliates: dict[str, dclient.Affiliate] = {}
    changed = trio.Event()
    republish = trio.Event()
    service = f"127.0.0.1:{plan.DISCOVERY_PORT}"
    async with dclient.DiscoveryClient([service], config.cluster.id,
                                       config.cluster.secret_bytes) as client:

        async def publish() -> None:
            nonlocal republish
            while True:
                republish = trio.Event()
                try:
                    for node in nodes:
                        member = affiliate(record, node, config)
                        assert member.kubespan is not None
                        await client.update(member.node_id, encode_affiliate(member),
                                            [e.address for e in member.kubespan.endpoints],
                                            TTL)
                    log.info("published %d wireguard-go affiliates", len(nodes))
                    wait = TTL / 2
                except dclient.DiscoveryError as exc:
                    log.warning("publishing failed: %s", exc)
                    wait = 1.0
                with trio.move_on_after(wait):
                    await republish.wait()

        async def watch() -> None:
            nonlocal changed
            async with client.watch() as events:
                async for event in events:
                    if isinstance(event, dclient.Snapshot):
                        # Merged, not replaced: a restarted in-memory service starts
                        # empty, and peers that are merely not republished yet stay.
                        affiliates.update({a.id: a for a in event.affiliates})
                        republish.set()
                    elif isinstance(event, dclient.Updated):
                        affiliates[event.affiliate.id] = event.affiliate
                    else:
                        affiliates.pop(event.affiliate_id, None)  # a node that left
                    changed.set()

        async def configure() -> None:
            nonlocal changed
            while True:
                with trio.move_on_after(RECONCILE):
                    await changed.wait()
                changed = trio.Event()
                for node in nodes:
                    try:
                        reconcile(record, node, config, affiliates)
                    except (UapiClientError, OSError) as exc:
                        log.debug("%s: not configured now: %s", node.name, exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            nursery.start_soon(watch)
            nursery.start_soon(configure)


def require_wireguard_go() -> str:
    import shutil

    found = shutil.which("wireguard-go")
    if found is None:
        raise LabError("--with-wireguard-go needs wireguard-go (apt-get install wireguard-go)")
    return found
