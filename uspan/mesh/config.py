"""The node configuration: one schema for the file, ``gen config`` and ``apply-config``.

Shaped like the kubespan, discovery and cluster parts of a Talos machine config. Parsing
is strict: every problem raises ``ConfigError`` naming the field path (``kubespan.mtu``),
so a typo never silently turns into a default.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, TypeVar

import yaml

from uspan.mesh.filters import EndpointFilters
from uspan.wg.endpoint import Endpoint

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_INTERFACE = "kubespan"
DEFAULT_PORT = 51820
DEFAULT_MTU = 1420
MIN_MTU = 1280
MAX_MTU = 65535
SECRET_SIZE = 32
T = TypeVar("T")
_INTERFACE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_-]{1,63})*$")


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the field path."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field_path = field_path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class HostPort:
    """A discovery service address: a host name or IP literal, and a TCP port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """``name:port``, ``1.2.3.4:port`` or ``[v6]:port``; ValueError says what is wrong."""
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"{text!r} is not [IPv6]:port")
            try:
                ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from exc
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(f"{text!r} is not host:port")
            if not _HOSTNAME.match(host):
                raise ValueError(f"{text!r}: {host!r} is not a host name or IPv4 address")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be 1-65535")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class KubeSpanConfig:
    enabled: bool = False
    interface: str = DEFAULT_INTERFACE
    port: int = DEFAULT_PORT
    mtu: int = DEFAULT_MTU
    endpoint_filters: tuple[str, ...] = ()
    advertise_endpoints: tuple[Endpoint, ...] = ()
    # None = automatic: report observed endpoints while the cluster has <= 50 peers.
    harvest_extra_endpoints: bool | None = None
    allow_down_peer_bypass: bool = True
    # Where peers meet when no direct path works (docs/relay-protocol.md); None = no relay.
    relay: Endpoint | None = None

    @property
    def filters(self) -> EndpointFilters:
        return EndpointFilters.parse(self.endpoint_filters)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    enabled: bool = False
    service_endpoints: tuple[HostPort, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    id: str
    secret: str

    @property
    def secret_bytes(self) -> bytes:
        """The 32-byte secret: discovery's sealing key and every peer's preshared key."""
        return decode_base64(self.secret)

    def __repr__(self) -> str:
        return f"ClusterConfig(id={self.id!r}, secret='(redacted)')"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    cluster: ClusterConfig
    kubespan: KubeSpanConfig = KubeSpanConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not; ValueError when it is neither."""
    cleaned = text.strip()
    cleaned += "=" * (-len(cleaned) % 4)
    alphabet = cleaned.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(alphabet, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not valid base64 ({exc})") from exc


# Parsing -----------------------------------------------------------------------------------


class _Section:
    """A mapping being read: typed getters, and a check that nothing unknown was left."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path or "<document>", f"expected a mapping, got {_kind(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(path or "<document>", f"key {key!r} is not a string")
        self.data: Mapping[str, object] = data
        self.path = path
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> object:
        self.seen.add(key)
        return self.data.get(key)

    def section(self, key: str) -> _Section:
        value = self.get(key)
        return _Section({} if value is None else value, self.at(key))

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.at(key), f"expected true or false, got {_kind(value)}")
        return value

    def optional_boolean(self, key: str) -> bool | None:
        return None if self.get(key) is None else self.boolean(key, False)

    def integer(self, key: str, default: int) -> int:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.at(key), f"expected an integer, got {_kind(value)}")
        return value

    def string(self, key: str) -> str | None:
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(self.at(key), f"expected a string, got {_kind(value)}")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(self.at(key), f"expected a list, got {_kind(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                problem = f"expected a string, got {_kind(item)}"
                raise ConfigError(f"{self.at(key)}[{index}]", problem)
        return value

    def parsed(self, key: str, parse: Callable[[str], T]) -> list[T]:
        """A list of strings, each parsed; a ValueError becomes an error naming the item."""
        items = []
        for index, text in enumerate(self.strings(key)):
            try:
                items.append(parse(text))
            except ValueError as exc:
                raise ConfigError(f"{self.at(key)}[{index}]", str(exc)) from exc
        return items

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.at(unknown[0]), "unknown key")


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def parse_config(text: str) -> NodeConfig:
    """Parse and validate a YAML node config."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<document>"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(where, f"not valid YAML: {problem}") from exc
    return config_from_dict(data)


def config_from_dict(data: object) -> NodeConfig:
    """Validate an already-loaded document (the same rules as ``parse_config``)."""
    root = _Section(data, "")
    kubespan = _kubespan(root.section("kubespan"))
    discovery = _discovery(root.section("discovery"))
    cluster = _cluster(root.section("cluster"))
    root.finish()
    if kubespan.enabled and not (discovery.enabled and discovery.service_endpoints):
        raise ConfigError(
            "discovery.registries.service.endpoints",
            "KubeSpan is enabled but no discovery registry is (enabled and) configured",
        )
    return NodeConfig(cluster=cluster, kubespan=kubespan, discovery=discovery)


def _kubespan(section: _Section) -> KubeSpanConfig:
    interface = section.string("interface") or DEFAULT_INTERFACE
    if not _INTERFACE_NAME.match(interface):
        raise ConfigError(section.at("interface"), f"{interface!r} is not a link name (1-15 chars)")
    port = section.integer("port", DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(section.at("port"), f"{port} is not a UDP port (1-65535)")
    mtu = section.integer("mtu", DEFAULT_MTU)
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ConfigError(section.at("mtu"), f"{mtu} is out of range ({MIN_MTU}-{MAX_MTU})")
    filters = section.section("filters")
    entries = filters.parsed("endpoints", _filter_entry)
    filters.finish()
    advertised = section.parsed("advertiseEndpoints", Endpoint.parse)
    relay_text = section.string("relay")
    try:
        relay = Endpoint.parse(relay_text) if relay_text else None
    except ValueError as exc:
        raise ConfigError(section.at("relay"), str(exc)) from None
    config = KubeSpanConfig(
        enabled=section.boolean("enabled", False),
        interface=interface,
        port=port,
        mtu=mtu,
        endpoint_filters=tuple(entries),
        advertise_endpoints=tuple(advertised),
        harvest_extra_endpoints=section.optional_boolean("harvestExtraEndpoints"),
        allow_down_peer_bypass=section.boolean("allowDownPeerBypass", True),
        relay=relay,
    )
    section.finish()
    return config


def _filter_entry(entry: str) -> str:
    EndpointFilters.parse([entry])
    return entry


def _discovery(section: _Section) -> DiscoveryConfig:
    enabled = section.boolean("enabled", False)
    registries = section.section("registries")
    service = registries.section("service")
    endpoints = service.parsed("endpoints", HostPort.parse)
    service.finish()
    registries.finish()
    section.finish()
    if enabled and not endpoints:
        raise ConfigError(service.at("endpoints"), "discovery is enabled but lists no service")
    return DiscoveryConfig(enabled=enabled, service_endpoints=tuple(endpoints))


def _cluster(section: _Section) -> ClusterConfig:
    values: dict[str, str] = {}
    for key in ("id", "secret"):
        value = section.string(key)
        if not value:
            raise ConfigError(section.at(key), "missing (32 random bytes, base64)")
        try:
            raw = decode_base64(value)
        except ValueError as exc:
            raise ConfigError(section.at(key), str(exc)) from exc
        if key == "secret" and len(raw) != SECRET_SIZE:
            problem = f"must decode to {SECRET_SIZE} bytes, got {len(raw)}"
            raise ConfigError(section.at(key), problem)
        if not raw:
            raise ConfigError(section.at(key), "decodes to nothing")
        values[key] = value.strip()
    section.finish()
    return ClusterConfig(id=values["id"], secret=values["secret"])


# Rendering ---------------------------------------------------------------------------------

Rng = Callable[[int], bytes]

_TEMPLATE = """\
# uspan node configuration (generated by `uspan gen config`).
# The same cluster id and secret must be given to every node of the cluster.

kubespan:
  # Build a WireGuard mesh with every other node of the cluster.
  enabled: {kubespan_enabled}
  # Name of the WireGuard link.
  interface: {interface}
  # UDP port of the WireGuard link (peers learn it through discovery).
  port: {port}
  # MTU of the WireGuard link (at least {min_mtu}).
  mtu: {mtu}
  filters:
    # Which node addresses are announced as endpoints: CIDR includes, !CIDR excludes.
    # Empty: announce every address.
    endpoints: []
  # Extra endpoints to announce (IP:port), e.g. a port forwarded by a NAT router.
  advertiseEndpoints: []
  # Report the endpoints we see peers use back to discovery, so other nodes try them.
  # Unset: on while the cluster has at most 50 peers. true/false: always/never.
  # harvestExtraEndpoints: true
  # Route a down peer's node addresses around the mesh rather than into it.
  allowDownPeerBypass: true
  # A relay (IP:port, `uspan relay` or `uspan discovery-service --relay`) through which
  # peers that no direct path reaches exchange their (encrypted) WireGuard datagrams.
  # The same on every node of the cluster.
  # relay: 192.0.2.254:3001

discovery:
  # Publish this node and learn the others through a discovery service.
  enabled: {discovery_enabled}
  registries:
    service:
      # Discovery service addresses (host:port), tried in turn.
      endpoints: {endpoints}

cluster:
  # Cluster ID: hashed into the KubeSpan subnet. 32 random bytes, base64.
  id: {cluster_id}
  # Cluster secret: seals discovery data and is every peer's preshared key. Keep it secret.
  secret: {cluster_secret}
"""


def render_config(
    *,
    with_kubespan: bool = False,
    cluster_id: str | None = None,
    cluster_secret: str | None = None,
    discovery_endpoints: Sequence[str] = (),
    rng: Rng = os.urandom,
) -> str:
    """A commented YAML config for ``uspan gen config``; validated before it is returned."""
    if with_kubespan and not discovery_endpoints:
        raise ConfigError(
            "discovery.registries.service.endpoints",
            "KubeSpan needs a discovery service: give --discovery-endpoint HOST:PORT",
        )
    text = _TEMPLATE.format(
        kubespan_enabled=_yaml_scalar(with_kubespan),
        interface=DEFAULT_INTERFACE,
        port=DEFAULT_PORT,
        mtu=DEFAULT_MTU,
        min_mtu=MIN_MTU,
        discovery_enabled=_yaml_scalar(bool(discovery_endpoints)),
        endpoints=_yaml_scalar(list(discovery_endpoints)),
        cluster_id=_yaml_scalar(cluster_id or _random_base64(rng)),
        cluster_secret=_yaml_scalar(cluster_secret or _random_base64(rng)),
    )
    parse_config(text)
    return text


def _random_base64(rng: Rng) -> str:
    return base64.b64encode(rng(SECRET_SIZE)).decode()


def _yaml_scalar(value: object) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
        .strip()
        .removesuffix("\n...")
        .strip()
    )


# Changes -----------------------------------------------------------------------------------


class Action(enum.Enum):
    """What a running node must do for a config change (``apply-config``, SIGHUP), besides
    handing the new config to the ``PeerController`` (peers, preshared keys, routes, and
    reported endpoints follow from that)."""

    RESTART_DISCOVERY = "reconnect the discovery client (services or cluster changed)"
    REPUBLISH = "publish the affiliate again"
    CREATE_INTERFACE = "create the KubeSpan link"
    REMOVE_INTERFACE = "remove the KubeSpan link and its routing"
    RECREATE_INTERFACE = "move the KubeSpan link to its new name"
    SET_ADDRESS = "put the new KubeSpan address on the link"
    SET_MTU = "set the link MTU"
    REBIND_PORT = "bind the WireGuard socket to the new port"


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    changed: tuple[str, ...]  # field paths as the YAML spells them, in schema order
    actions: frozenset[Action]


_YAML_PATHS = {
    "kubespan.endpoint_filters": "kubespan.filters.endpoints",
    "kubespan.advertise_endpoints": "kubespan.advertiseEndpoints",
    "kubespan.harvest_extra_endpoints": "kubespan.harvestExtraEndpoints",
    "kubespan.allow_down_peer_bypass": "kubespan.allowDownPeerBypass",
    "discovery.service_endpoints": "discovery.registries.service.endpoints",
}

# Changes of a running KubeSpan link, and what each needs.
_KUBESPAN_ACTIONS = {
    "kubespan.interface": {Action.RECREATE_INTERFACE},
    "kubespan.relay": {Action.RECREATE_INTERFACE},
    "kubespan.mtu": {Action.SET_MTU},
    "kubespan.port": {Action.REBIND_PORT, Action.REPUBLISH},
    "kubespan.filters.endpoints": {Action.REPUBLISH},
    "kubespan.advertiseEndpoints": {Action.REPUBLISH},
    "cluster.id": {Action.SET_ADDRESS},
}


def diff_configs(old: NodeConfig, new: NodeConfig) -> ConfigDiff:
    """What changed between two configs, and what the node must do about it.

    Nothing here restarts the process: tunnels that stay are never dropped.
    """
    changed = [
        _YAML_PATHS.get(path, path)
        for section in ("cluster", "kubespan", "discovery")
        for path in (
            f"{section}.{name}"
            for name in _changed_fields(getattr(old, section), getattr(new, section))
        )
    ]
    actions: set[Action] = set()
    if any(path.startswith(("cluster.", "discovery.")) for path in changed):
        actions |= {Action.RESTART_DISCOVERY, Action.REPUBLISH}
    was, now = old.kubespan.enabled, new.kubespan.enabled
    if was != now:
        actions |= {Action.CREATE_INTERFACE if now else Action.REMOVE_INTERFACE, Action.REPUBLISH}
    elif now:
        for path in changed:
            actions |= _KUBESPAN_ACTIONS.get(path, set())
        if new.kubespan.relay is not None and any(p.startswith("cluster.") for p in changed):
            actions.add(Action.RECREATE_INTERFACE)  # the relay link proves the old cluster
    return ConfigDiff(tuple(changed), frozenset(actions))


def _changed_fields(old: DataclassInstance, new: DataclassInstance) -> Iterable[str]:
    for item in fields(old):
        if getattr(old, item.name) != getattr(new, item.name):
            yield item.name
