"""Names and the address plan of a lab: pure functions, no I/O.

Underlay network ``k`` (0-based) uses a documentation range: 192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24, then 198.18.(k-3).0/24 (the benchmarking range), and
2001:db8:k::/64. Node ``i`` (1-based) is ``.i`` on every network; the switch namespace
(where the discovery service listens) is ``.254``. A node behind NAT sits on an inner link
198.19.i.0/24 (node .2, router .1) and its router holds the node's ``.i`` addresses (IPv4
only: the NAT node has no IPv6 underlay). These addresses exist only inside the lab's
namespaces.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

MAX_NODES = 250  # hosts .1-.250 on every network; .254 is the switch
MAX_NETWORKS = 8
SWITCH_HOST = 254
DISCOVERY_PORT = 3000
RELAY_PORT = 3001  # the discovery service's relay (UDP and TCP), on network 0
WG_PORT = 51820
NAT_KINDS = {
    "easy": [],  # masquerading: one mapping (port kept when free) for every destination
    "hard": ["--random-fully"],  # a new random port for every destination
}
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")
IFNAMSIZ = 15
_V4 = ("192.0.2", "198.51.100", "203.0.113")


class PlanError(ValueError):
    """Input the plan cannot satisfy; the message is one line for the user."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise PlanError(f"bad lab name {name!r}: use 1-16 of a-z, 0-9 and '-', "
                        "starting with a letter or digit")
    return name


def check_size(nodes: int, networks: int) -> None:
    if nodes < 1:
        raise PlanError(f"--nodes {nodes}: a lab needs at least 1 node")
    if nodes > MAX_NODES:
        raise PlanError(f"--nodes {nodes}: too many nodes, the address plan has room for "
                        f"{MAX_NODES} per network")
    if not 1 <= networks <= MAX_NETWORKS:
        raise PlanError(f"--networks {networks}: choose 1 to {MAX_NETWORKS}")


def v4_prefix(network: int) -> str:
    return _V4[network] if network < len(_V4) else f"198.18.{network - len(_V4)}"


def v4(network: int, host: int) -> str:
    return f"{v4_prefix(network)}.{host}"


def v6(network: int, host: int) -> str:
    return f"2001:db8:{network:x}::{host:x}"


def v4_net(network: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{v4_prefix(network)}.0/24")


def v6_net(network: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"2001:db8:{network:x}::/64")


def parse_nat(items: list[str]) -> dict[str, str]:
    """``--nat NODE[:easy|hard] ...``: node name -> NAT kind (easy by default)."""
    found = {}
    for item in items:
        node, _, kind = item.partition(":")
        kind = kind or "easy"
        if kind not in NAT_KINDS:
            raise PlanError(f"--nat {item}: the NAT kind is easy or hard, not {kind!r}")
        found[node] = kind
    return found


def nat_inner(index: int, host: int) -> str:
    """The NAT link of node ``index``: router ``.1``, node ``.2``."""
    return f"198.19.{index}.{host}"


def network_of(address: str, networks: int) -> int | None:
    """Which underlay network an address (or ``ip:port`` endpoint) belongs to."""
    host = address
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    for k in range(networks):
        if ip in (v4_net(k) if ip.version == 4 else v6_net(k)):
            return k
    return None


def node_name(index: int) -> str:
    return f"n{index}"


def namespace(lab: str, role: str) -> str:
    """``uspan-LAB-ROLE``: ``sw`` (switch), ``nI`` (node I), ``rI`` (node I's NAT router)."""
    return f"uspan-{lab}-{role}"


def namespace_prefix(lab: str) -> str:
    return f"uspan-{lab}-"


def interface(lab: str, index: int) -> str:
    """The node's WireGuard interface: ``ks-LAB-I``, or a hash of LAB when that is too long."""
    name = f"ks-{lab}-{index}"
    if len(name) <= IFNAMSIZ:
        return name
    digest = hashlib.sha256(lab.encode()).hexdigest()[: IFNAMSIZ - 4 - len(str(index))]
    return f"ks{digest}-{index}"


def switch_port(index: int, network: int) -> str:
    """The switch's end of node I's link to network K (unique inside the switch)."""
    return f"n{index}k{network}"


def router_port(index: int, network: int) -> str:
    return f"r{index}k{network}"


@dataclass(frozen=True, slots=True)
class Visible:
    """Where others reach a node on a network (its own address, or its router's)."""

    v4: str
    v6: str | None


def visible(index: int, network: int, nat: bool) -> Visible:
    return Visible(v4(network, index), None if nat else v6(network, index))
