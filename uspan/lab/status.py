"""The state of a lab's mesh: each node's view of each peer, read from the node itself
(``uspan get`` through its state directory's socket, as ``-o json`` shows it; for a
wireguard-go node, its UAPI), RTTs by ping over the mesh, and how it is all shown."""

from __future__ import annotations

import base64
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from uspan.daemon.uapi_client import UapiClientError
from uspan.lab import plan, procs, wgo
from uspan.lab.record import LabRecord, NodeRecord
from uspan.mesh.resources import DISCOVERY_STATUS, KUBESPAN_IDENTITY, KUBESPAN_PEER_STATUS
from uspan.node.api import SOCKET_NAME, ApiClient, ApiError

WGO_UP = 180 + 25  # a wireguard-go peer is up while its last handshake is this recent
_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


@dataclass
class Pair:
    source: str
    target: str
    state: str  # up, down, unknown, or "-" (the source does not know the target)
    endpoint: str | None = None
    network: int | None = None
    rtt_ms: float | None = None
    path: str | None = None  # while up: "direct", "punched" or "relayed" (see path_kind)


@dataclass
class NodeView:
    name: str
    kind: str
    nat: str | None  # the NAT kind in front of the node, if any
    block_udp: bool
    running: bool
    address: str | None = None  # KubeSpan address
    public_key: str | None = None
    discovery: str | None = None  # the service the node is connected to
    error: str | None = None


@dataclass
class Snapshot:
    lab: str
    networks: int
    discovery_running: bool
    nodes: list[NodeView] = field(default_factory=list)
    pairs: dict[tuple[str, str], Pair] = field(default_factory=dict)
    cuts: list[list[Any]] = field(default_factory=list)
    netem: dict[str, dict[str, str]] = field(default_factory=dict)

    def up_count(self) -> int:
        return sum(1 for p in self.pairs.values() if p.state == "up")

    def pair_count(self) -> int:
        n = len(self.nodes)
        return n * (n - 1)

    def started(self) -> int:
        return sum(1 for v in self.nodes if v.address is not None)

    def to_json(self) -> dict[str, Any]:
        """`uspan lab status -o json`: camelCase keys, as the resource specs and Talos."""
        return {
            "lab": self.lab,
            "networks": self.networks,
            "discovery": {"running": self.discovery_running},
            "nodes": [{"name": v.name, "kind": v.kind, "nat": v.nat, "blockUdp": v.block_udp,
                       "running": v.running, "address": v.address, "publicKey": v.public_key,
                       "discovery": v.discovery, "error": v.error} for v in self.nodes],
            "pairs": [{"from": p.source, "to": p.target, "state": p.state,
                       "endpoint": p.endpoint, "network": p.network, "path": p.path,
                       "rttMs": p.rtt_ms}
                      for p in self.pairs.values()],
            "pairsUp": self.up_count(),
            "pairsTotal": self.pair_count(),
            "cuts": self.cuts,
            "netem": self.netem,
        }

    def ping_json(self) -> list[dict[str, Any]]:
        """`uspan lab ping -o json`, in the same style."""
        return [{"from": p.source, "to": p.target, "ok": p.rtt_ms is not None,
                 "rttMs": p.rtt_ms} for p in self.pairs.values()]


async def _uspan_view(record: LabRecord, node: NodeRecord, view: NodeView,
                      ) -> list[dict[str, Any]]:
    client = ApiClient(str(record.state_dir(node) / SOCKET_NAME))
    with trio.move_on_after(3):
        _, identity = await client.get(KUBESPAN_IDENTITY, None, secrets=False)
        if identity:
            spec = identity[0].spec
            view.address = str(spec["address"]).split("/")[0]
            view.public_key = str(spec["publicKey"])
        _, found = await client.get(DISCOVERY_STATUS, None, secrets=False)
        if found:
            view.discovery = found[0].spec.get("service")
        _, statuses = await client.get(KUBESPAN_PEER_STATUS, None, secrets=False)
        return [dict(r.spec) for r in statuses]
    view.error = "no answer"
    return []


def _wgo_view(record: LabRecord, node: NodeRecord, view: NodeView,
              ) -> dict[bytes, wgo.WgPeer]:
    config = wgo.cluster_config(record)
    public = wgo.public_key(wgo.private_key(record, node))
    view.public_key = base64.b64encode(public).decode()
    view.address = str(wgo.kubespan_address(config, public))
    return wgo.get_peers(record.uapi_path(node))


async def snapshot(record: LabRecord, *, rtt: bool = False) -> Snapshot:
    """Every node's view of every other node, gathered concurrently."""
    snap = Snapshot(record.name, record.networks, procs.alive(record.discovery),
                    cuts=record.cuts, netem=record.netem)
    raw: dict[str, list[dict[str, Any]]] = {}
    wg_raw: dict[str, dict[bytes, wgo.WgPeer]] = {}

    async def gather(node: NodeRecord, view: NodeView) -> None:
        if not view.running:
            return
        try:
            if node.wgo:
                wg_raw[node.name] = await trio.to_thread.run_sync(_wgo_view, record, node, view)
            else:
                raw[node.name] = await _uspan_view(record, node, view)
        except (ApiError, UapiClientError, OSError) as exc:
            view.error = str(exc)

    async with trio.open_nursery() as nursery:
        for node in record.nodes:
            view = NodeView(node.name, node.kind, node.nat, node.block_udp,
                            procs.alive(node.proc))
            snap.nodes.append(view)
            nursery.start_soon(gather, node, view)
    by_key = {v.public_key: v.name for v in snap.nodes if v.public_key}
    now = time.time()
    for view in snap.nodes:
        for other in snap.nodes:
            if other is not view:
                snap.pairs[(view.name, other.name)] = Pair(view.name, other.name, "-")
        for spec in raw.get(view.name, []):
            target = str(spec.get("label"))
            if (view.name, target) in snap.pairs:
                endpoint = spec.get("endpoint")
                snap.pairs[(view.name, target)] = Pair(
                    view.name, target, str(spec.get("state")), endpoint,
                    plan.network_of(endpoint, record.networks) if endpoint else None)
        for key, peer in wg_raw.get(view.name, {}).items():
            target_name = by_key.get(base64.b64encode(key).decode())
            if target_name is None:
                continue
            recent = peer.last_handshake and now - peer.last_handshake < WGO_UP
            state = "up" if recent else ("down" if peer.last_handshake else "unknown")
            snap.pairs[(view.name, target_name)] = Pair(
                view.name, target_name, state, peer.endpoint,
                plan.network_of(peer.endpoint, record.networks) if peer.endpoint else None)
    nat = {view.name: view.nat is not None for view in snap.nodes}
    for pair in snap.pairs.values():
        pair.path = path_kind(pair, nat[pair.source] and nat[pair.target])
    if rtt:
        await ping_all(record, snap, count=1)
    return snap


def path_kind(pair: Pair, both_behind_nat: bool) -> str | None:
    """How an up pair's packets go: ``relayed`` through a relay (an endpoint
    ``relay:HOST:PORT``), ``punched`` between two nodes that are both behind NAT (neither
    reaches the other unless both send first), else ``direct``."""
    if pair.state != "up":
        return None
    if pair.endpoint is not None and pair.endpoint.startswith("relay:"):
        return "relayed"
    return "punched" if both_behind_nat else "direct"


async def ping(namespace: str, address: str, count: int = 1, timeout: float = 1.0,
               ) -> float | None:
    """The average RTT in ms of pings from ``namespace`` to ``address``, or None."""
    done = await trio.run_process(
        ["ip", "netns", "exec", namespace, "ping", "-q", "-n", "-c", str(count), "-i", "0.2",
         "-W", str(math.ceil(timeout)), address], capture_stdout=True, capture_stderr=True,
        check=False)
    match = _RTT.search(done.stdout.decode(errors="replace"))
    return float(match.group(1)) if done.returncode == 0 and match else None


async def ping_all(record: LabRecord, snap: Snapshot, count: int = 1) -> None:
    """Fill every pair's RTT over the mesh (KubeSpan addresses), 8 pings at a time."""
    limit = trio.CapacityLimiter(8)
    addresses = {v.name: v.address for v in snap.nodes if v.running and v.address}

    async def one(pair: Pair) -> None:
        target = addresses.get(pair.target)
        if target is None or pair.source not in addresses:
            return
        async with limit:
            pair.rtt_ms = await ping(record.node(pair.source).namespace, target, count)

    async with trio.open_nursery() as nursery:
        for pair in snap.pairs.values():
            nursery.start_soon(one, pair)
