"""A mesh of ``uspan run`` nodes for system tests: namespaces on one bridge, a discovery
service in a namespace of its own, one config per node (unique interface names, so the
UAPI sockets in /var/run/wireguard never collide), driven by the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.jsonstream import read_json_stream
from uspan.testbed import Lab, Namespace, poll

USPAN = str(Path(sys.executable).parent / "uspan")
UAPI_DIR = Path("/var/run/wireguard")
SERVICE = "192.0.2.254"
SERVICE_PORT = 3000


def node_addresses(index: int) -> list[str]:
    return [f"192.0.2.{index}/24", f"fd00:2::{index}/64"]


def second_network_addresses(index: int) -> list[str]:
    return [f"198.51.100.{index}/24", f"fd00:3::{index}/64"]


@dataclass
class MeshNode:
    mesh: Mesh
    name: str
    ns: Namespace
    index: int
    interface: str
    state_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def address4(self) -> str:
        return f"192.0.2.{self.index}"

    def start(self, *, wait: bool = True) -> None:
        with self.log_path.open("ab") as log:
            self.process = self.ns.spawn(
                USPAN, "run", "--config", str(self.config_path), "--state-dir",
                str(self.state_dir), "--hostname", self.name, "--log-level", "debug",
                *self.extra, stdout=log.fileno(), stderr=subprocess.STDOUT)
        if wait:
            poll(self._ready, what=f"{self.name} to serve its API", timeout=20)

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.process.returncode}:\n{self.log()}")
        return self.cli("get", "kubespanidentities", check=False).returncode == 0

    def stop(self, signal_name: str = "TERM") -> int:
        assert self.process is not None
        self.process.send_signal(getattr(__import__("signal"), f"SIG{signal_name}"))
        code = self.process.wait(20)
        self.process = None
        return code

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self.ns.run(USPAN, *args, "--state-dir", str(self.state_dir), check=False,
                           timeout=30)
        if check and done.returncode != 0:
            raise AssertionError(f"uspan {' '.join(args)} on {self.name}: {done.stderr}")
        return done

    def get(self, resource: str) -> list[dict[str, Any]]:
        return read_json_stream(self.cli("get", resource, "-o", "json").stdout)

    def identity(self) -> dict[str, Any]:
        (item,) = self.get("kubespanidentities")
        spec = item["spec"]
        assert isinstance(spec, dict)
        return spec

    def kubespan_ip(self) -> str:
        return str(self.identity()["address"]).split("/")[0]

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {item["spec"]["label"]: item["spec"] for item in self.get("kubespanpeerstatuses")}

    def cut(self, other: MeshNode, network: str = "192.0.2") -> None:
        """Drop UDP between this node and ``other`` on one underlay network, both ways."""
        v6 = {"192.0.2": "fd00:2::", "198.51.100": "fd00:3::"}[network]
        for ns, peer in ((self.ns, other.index), (other.ns, self.index)):
            for tool, address in (("iptables", f"{network}.{peer}"), ("ip6tables", f"{v6}{peer}")):
                for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
                    ns.run(tool, "-A", chain, "-p", "udp", flag, address, "-j", "DROP")

    def heal(self, other: MeshNode) -> None:
        for ns in (self.ns, other.ns):
            for tool in ("iptables", "ip6tables"):
                ns.run(tool, "-F")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


class Mesh:
    """Namespaces on one bridge; node i has 192.0.2.i and fd00:2::i; the service .254."""

    def __init__(self, lab: Lab, tmp: Path, count: int, *, spare: int = 0,
                 networks: int = 1) -> None:
        self.lab = lab
        self.tmp = tmp
        names = [f"n{i}" for i in range(1, count + spare + 1)]
        self.service_ns = lab.namespace("disc")
        self.namespaces = [lab.namespace(name) for name in names]
        lab.bridge([self.service_ns, *self.namespaces],
                   [[f"{SERVICE}/24"], *[node_addresses(i) for i in range(1, len(names) + 1)]])
        if networks == 2:  # a second underlay: 198.51.100.i, fd00:3::i (no service there)
            hub = lab.namespace("br2")
            hub.ip("link", "add", "br0", "type", "bridge")
            hub.link_up("br0")
            for i, ns in enumerate(self.namespaces, start=1):
                link = lab.veth(hub, ns, (), second_network_addresses(i))
                hub.ip("link", "set", link.a_dev, "master", "br0")
        self.service: subprocess.Popen[bytes] | None = None
        self.service_log = tmp / "discovery.log"
        self.start_service()
        base = yaml.safe_load(subprocess.run(
            [USPAN, "gen", "config", "--with-kubespan", "--discovery-endpoint",
             f"{SERVICE}:{SERVICE_PORT}"], check=True, capture_output=True, text=True).stdout)
        self.base_config: dict[str, Any] = base
        self.nodes = [self._node(i + 1, ns) for i, ns in enumerate(self.namespaces)]

    def start_service(self, *extra: str) -> None:
        with self.service_log.open("ab") as log:
            self.service = self.service_ns.spawn(
                USPAN, "discovery-service", "--listen", f"{SERVICE}:{SERVICE_PORT}", *extra,
                stdout=log.fileno(), stderr=subprocess.STDOUT)
        self.service_ns.wait_listening(SERVICE_PORT, timeout=20)

    def stop_service(self) -> None:
        assert self.service is not None
        self.service.kill()
        self.service.wait(10)
        self.service = None

    def _node(self, index: int, ns: Namespace) -> MeshNode:
        name = f"n{index}"
        interface = self.lab.interface_name()
        state = self.tmp / name
        state.mkdir(mode=0o700)
        node = MeshNode(self, name, ns, index, interface, state, self.tmp / f"{name}.yaml",
                        self.tmp / f"{name}.log")
        self.write_config(node)
        return node

    def write_config(self, node: MeshNode, **kubespan: Any) -> None:
        config = json.loads(json.dumps(self.base_config))
        config["kubespan"]["interface"] = node.interface
        config["kubespan"].update(kubespan)
        node.config_path.write_text(yaml.safe_dump(config))
        node.config_path.chmod(0o600)

    def logs(self) -> str:
        parts = [f"--- {n.name} ---\n{n.log()}" for n in self.nodes if n.log_path.exists()]
        if self.service_log.exists():
            parts.append(f"--- discovery ---\n{self.service_log.read_text()[-3000:]}")
        return "\n".join(parts)

    def wait_full_mesh(self, nodes: list[MeshNode] | None = None, timeout: float = 30) -> None:
        members = nodes or self.nodes

        def full() -> bool:
            for node in members:
                states = node.statuses()
                others = {m.name for m in members if m is not node}
                if not others <= {k for k, v in states.items() if v["state"] == "up"}:
                    return False
            return True

        poll(full, what="every pair up", timeout=timeout, interval=0.2)


# Publishes one affiliate through the client library, from inside a namespace.
# argv: service cluster_id secret_b64 node_id hostname public_b64 address endpoint... ("-" = raw
# garbage data instead of an affiliate)
PUBLISH = r"""
import base64, ipaddress, sys, trio
from uspan.discovery.client import DiscoveryClient
from uspan.mesh.affiliate import Affiliate, KubeSpanInfo, encode_affiliate
from uspan.mesh.config import decode_base64
from uspan.wg.endpoint import Endpoint
service, cluster, secret, node_id, hostname, public, address, *endpoints = sys.argv[1:]
async def main():
    async with DiscoveryClient([service], cluster, decode_base64(secret)) as client:
        if public == "-":
            await client.update_blobs(node_id, b"garbage that does not open", [b"x" * 20], 600)
            return
        eps = tuple(Endpoint.parse(e) for e in endpoints)
        info = KubeSpanInfo(base64.b64decode(public), ipaddress.IPv6Address(address), (), eps)
        affiliate = Affiliate(node_id, hostname, hostname,
                              tuple(ipaddress.ip_address(e.host) for e in eps), info)
        await client.update(node_id, encode_affiliate(affiliate), [e.address for e in eps], 600)
trio.run(main)
"""


def publish(ns: Namespace, cluster: dict[str, str], node_id: str, hostname: str,
            public_key: str, address: str, *endpoints: str) -> None:
    ns.run(sys.executable, "-c", PUBLISH, f"{SERVICE}:{SERVICE_PORT}", cluster["id"],
           cluster["secret"], node_id, hostname, public_key, address, *endpoints, timeout=30)
