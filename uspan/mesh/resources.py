"""The resource store that ``uspan get`` reads, and its table/yaml/json output.

Resources are ``metadata`` (namespace, type, id, version, owner, phase, created, updated,
as Talos's) and a ``spec`` with Talos's field names, built from the mesh's own objects by
the ``*_spec`` functions. A resource's version grows by one on every change; putting an
equal spec changes nothing, so a version is a count of real changes. Puts and deletes
become events for watchers, which the shell drains (the store never blocks and never does
I/O).

Times: the store is given ``now`` on the monotonic clock and a fixed ``wall_offset``
(wall minus monotonic, read once by the shell) and shows wall-clock RFC 3339 times.
Secret fields (the private key) are redacted in every output unless asked for.
"""

from __future__ import annotations

import base64
import datetime
import enum
import ipaddress
import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from uspan.mesh.affiliate import Affiliate
from uspan.mesh.cycling import ObservedEndpoint
from uspan.mesh.identity import Identity
from uspan.mesh.peerspec import PeerSpec
from uspan.mesh.status import PeerStatus
from uspan.relay.addressing import describe
from uspan.wg.endpoint import Endpoint

REDACTED = "(redacted)"
KUBESPAN_IDENTITY_ID = "local"  # the one identity resource, as Talos names it
DISCOVERY_STATUS_ID = "discovery"
WATCH_QUEUE_LIMIT = 1024  # a watcher further behind than this must re-list


class ResourceError(LookupError):
    """An unknown resource type or ID; the message says what exists."""


@dataclass(frozen=True, slots=True)
class ResourceType:
    name: str  # shown as metadata.type
    plural: str  # the name ``uspan get`` takes
    aliases: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (table header, spec field)
    display: str  # the table's TYPE: the singular, e.g. ``KubeSpanPeerStatus``
    owner: str  # metadata.owner: the controller that writes it, as Talos names it
    secret_fields: frozenset[str] = frozenset()

    @property
    def namespace(self) -> str:
        """``kubespan`` or ``cluster``: the middle part of the type name, as in Talos."""
        return self.name.split(".")[1]


KUBESPAN_IDENTITY = ResourceType(
    "KubeSpanIdentities.kubespan.uspan.dev",
    "kubespanidentities",
    ("kubespanidentity", "ksi"),
    (("ADDRESS", "address"), ("PUBLIC KEY", "publicKey")),
    "KubeSpanIdentity",
    "kubespan.IdentityController",
    frozenset({"privateKey"}),
)
KUBESPAN_PEER_SPEC = ResourceType(
    "KubeSpanPeerSpecs.kubespan.uspan.dev",
    "kubespanpeerspecs",
    ("kubespanpeerspec",),
    (("LABEL", "label"), ("ENDPOINTS", "endpoints")),
    "KubeSpanPeerSpec",
    "kubespan.PeerSpecController",
)
KUBESPAN_PEER_STATUS = ResourceType(
    "KubeSpanPeerStatuses.kubespan.uspan.dev",
    "kubespanpeerstatuses",
    ("kubespanpeerstatus",),
    (
        ("LABEL", "label"),
        ("ENDPOINT", "endpoint"),
        ("STATE", "state"),
        ("RX", "receiveBytes"),
        ("TX", "transmitBytes"),
    ),
    "KubeSpanPeerStatus",
    "kubespan.ManagerController",
)
KUBESPAN_ENDPOINT = ResourceType(
    "KubeSpanEndpoints.kubespan.uspan.dev",
    "kubespanendpoints",
    ("kubespanendpoint",),
    (("ENDPOINT", "endpoint"), ("AFFILIATE ID", "affiliateID")),
    "KubeSpanEndpoint",
    "kubespan.EndpointController",
)
MEMBER = ResourceType(
    "Members.cluster.uspan.dev",
    "members",
    ("member",),
    (("HOSTNAME", "hostname"), ("ADDRESSES", "addresses")),
    "Member",
    "cluster.MemberController",
)
AFFILIATE = ResourceType(
    "Affiliates.cluster.uspan.dev",
    "affiliates",
    ("affiliate",),
    (("HOSTNAME", "hostname"), ("ADDRESSES", "addresses")),
    "Affiliate",
    "cluster.AffiliateMergeController",
)
DISCOVERY_STATUS = ResourceType(
    "DiscoveryStatuses.cluster.uspan.dev",
    "discoverystatus",
    ("discoverystatuses",),
    (
        ("SERVICE", "service"),
        ("CONNECTED SINCE", "connectedSince"),
        ("LAST ERROR", "lastError"),
        ("IGNORED", "ignoredBlobs"),
        ("REFLEXIVE", "reflexiveEndpoints"),
    ),
    "DiscoveryStatus",
    "cluster.DiscoveryServiceController",
)
RESOURCE_TYPES = (
    KUBESPAN_IDENTITY,
    KUBESPAN_PEER_SPEC,
    KUBESPAN_PEER_STATUS,
    KUBESPAN_ENDPOINT,
    MEMBER,
    AFFILIATE,
    DISCOVERY_STATUS,
)


def resolve_type(name: str) -> ResourceType:
    """The type ``uspan get NAME`` means: plural, singular/alias or full name, any case."""
    wanted = name.lower()
    for rtype in RESOURCE_TYPES:
        if wanted in (rtype.plural, rtype.name.lower(), rtype.display.lower(), *rtype.aliases):
            return rtype
    known = ", ".join(rtype.plural for rtype in RESOURCE_TYPES)
    raise ResourceError(f"unknown resource {name!r}; one of: {known}")


# Specs -------------------------------------------------------------------------------------


def wall_time(monotonic: float | None, wall_offset: float) -> str | None:
    """RFC 3339 UTC for a monotonic time, the fraction without trailing zeros (as Go's
    RFC3339Nano); None stays None (never happened)."""
    if monotonic is None:
        return None
    moment = datetime.datetime.fromtimestamp(monotonic + wall_offset, tz=datetime.UTC)
    fraction = f".{moment.microsecond:06d}".rstrip("0").rstrip(".")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def identity_spec(
    identity: Identity, address: ipaddress.IPv6Address, subnet: ipaddress.IPv6Network
) -> dict[str, Any]:
    return {
        "address": f"{address}/128",
        "subnet": str(subnet),
        "privateKey": _b64(identity.private_key),
        "publicKey": _b64(identity.public_key),
    }


def peer_spec_spec(spec: PeerSpec) -> dict[str, Any]:
    return {
        "address": str(spec.address),
        "allowedIPs": [str(network) for network in spec.allowed_ips],
        "endpoints": [str(endpoint) for endpoint in spec.endpoints],
        "label": spec.label,
    }


def peer_status_spec(status: PeerStatus, wall_offset: float,
                     relay: Endpoint | None = None) -> dict[str, Any]:
    """``relay``: the node's relay, so a relayed endpoint shows as ``relay:HOST:PORT``."""
    return {
        "label": status.label,
        "endpoint": describe(status.endpoint, relay),
        "state": status.state.value,
        "receiveBytes": status.rx_bytes,
        "transmitBytes": status.tx_bytes,
        "lastHandshakeTime": wall_time(status.last_handshake, wall_offset),
        "lastUsedEndpoint": describe(status.last_used_endpoint, relay),
        "lastEndpointChange": wall_time(status.last_endpoint_change, wall_offset),
    }


def endpoint_spec(observed: ObservedEndpoint) -> dict[str, Any]:
    return {"affiliateID": observed.affiliate_id, "endpoint": str(observed.endpoint)}


def affiliate_spec(affiliate: Affiliate) -> dict[str, Any]:
    kubespan = affiliate.kubespan
    return {
        "nodeId": affiliate.node_id,
        "hostname": affiliate.hostname,
        "nodename": affiliate.nodename,
        "addresses": [str(address) for address in affiliate.addresses],
        "kubespan": None
        if kubespan is None
        else {
            "publicKey": _b64(kubespan.public_key),
            "address": str(kubespan.address),
            "additionalAddresses": [str(p) for p in kubespan.additional_prefixes],
            "endpoints": [str(endpoint) for endpoint in kubespan.endpoints],
        },
    }


def member_spec(affiliate: Affiliate) -> dict[str, Any]:
    """A member (ID = nodename, as Talos): who is in the cluster, KubeSpan or not."""
    return {
        "nodeId": affiliate.node_id,
        "hostname": affiliate.hostname,
        "addresses": [str(address) for address in affiliate.addresses],
    }


def discovery_status_spec(
    service: str | None,
    connected_since: float | None,
    last_error: str | None,
    wall_offset: float,
    ignored: int = 0,
    reflexive: Sequence[Endpoint] = (),
    probes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """``ignored``: blobs that did not open under the cluster secret or did not parse;
    ``reflexive``: where the services see our WireGuard socket; ``probes``: the counts of
    ``uspan.mesh.reflexive`` (sent, answered, forged, malformed)."""
    return {
        "service": service,
        "connectedSince": wall_time(connected_since, wall_offset),
        "lastError": last_error,
        "ignoredBlobs": ignored,
        "reflexiveEndpoints": [str(endpoint) for endpoint in reflexive],
        "probes": {key: (probes or {}).get(key, 0)
                   for key in ("sent", "answered", "forged", "malformed")},
    }


# The store ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metadata:
    type: str
    id: str
    version: int
    created: float  # wall-clock seconds
    updated: float


@dataclass(frozen=True, slots=True)
class Resource:
    metadata: Metadata
    spec: Mapping[str, Any]

    def to_dict(self, *, show_secrets: bool = False) -> dict[str, Any]:
        """``{"metadata": ..., "spec": ...}`` as ``talosctl get -o yaml`` shows it."""
        meta = self.metadata
        rtype = resolve_type(meta.type)
        spec = dict(self.spec)
        if not show_secrets:
            spec = {key: REDACTED if key in rtype.secret_fields else value
                    for key, value in spec.items()}
        return {
            "metadata": {
                "namespace": rtype.namespace,
                "type": meta.type,
                "id": meta.id,
                "version": meta.version,
                "owner": rtype.owner,
                "phase": "running",
                "created": wall_time(meta.created, 0.0),
                "updated": wall_time(meta.updated, 0.0),
            },
            "spec": spec,
        }


class EventKind(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    resource: Resource  # for DESTROYED: the last version, as it was


class WatchOverflow(Exception):
    """The watcher fell more than WATCH_QUEUE_LIMIT events behind: list again."""


@dataclass(slots=True)
class Watch:
    """A subscriber's queue of events; the shell drains it when the store says it changed."""

    type_name: str | None
    queue: deque[Event] = field(default_factory=deque)
    overflowed: bool = False

    def drain(self) -> list[Event]:
        if self.overflowed:
            raise WatchOverflow(f"watcher fell more than {WATCH_QUEUE_LIMIT} events behind")
        events = list(self.queue)
        self.queue.clear()
        return events


class Store:
    """Resources by type and ID, with versions and watches."""

    def __init__(self, wall_offset: float, on_change: Callable[[], None] | None = None) -> None:
        self.wall_offset = wall_offset
        self.on_change = on_change  # the shell wakes its watchers here
        self._items: dict[str, dict[str, Resource]] = {rtype.name: {} for rtype in RESOURCE_TYPES}
        self._watches: list[Watch] = []

    def get(self, rtype: ResourceType, resource_id: str) -> Resource:
        try:
            return self._items[rtype.name][resource_id]
        except KeyError:
            raise ResourceError(f"{rtype.plural} {resource_id!r} not found") from None

    def list(self, rtype: ResourceType) -> list[Resource]:
        items = self._items[rtype.name]
        return [items[key] for key in sorted(items)]

    def put(
        self, rtype: ResourceType, resource_id: str, spec: Mapping[str, Any], now: float
    ) -> Resource:
        """Create or update; an equal spec leaves the resource (and its version) alone."""
        items = self._items[rtype.name]
        before = items.get(resource_id)
        if before is not None and before.spec == spec:
            return before
        wall = now + self.wall_offset
        if before is None:
            metadata = Metadata(rtype.name, resource_id, 1, wall, wall)
        else:
            meta = before.metadata
            metadata = Metadata(rtype.name, resource_id, meta.version + 1, meta.created, wall)
        resource = Resource(metadata, dict(spec))
        items[resource_id] = resource
        self._emit(Event(EventKind.CREATED if before is None else EventKind.UPDATED, resource))
        return resource

    def delete(self, rtype: ResourceType, resource_id: str) -> bool:
        resource = self._items[rtype.name].pop(resource_id, None)
        if resource is None:
            return False
        self._emit(Event(EventKind.DESTROYED, resource))
        return True

    def replace_all(
        self, rtype: ResourceType, specs: Mapping[str, Mapping[str, Any]], now: float
    ) -> None:
        """Make the resources of a type exactly ``specs`` (what a controller outputs)."""
        for resource_id in [key for key in self._items[rtype.name] if key not in specs]:
            self.delete(rtype, resource_id)
        for resource_id, spec in specs.items():
            self.put(rtype, resource_id, spec, now)

    def watch(self, rtype: ResourceType | None = None, *, bootstrap: bool = True) -> Watch:
        """Subscribe to one type (or all); ``bootstrap`` queues what exists as CREATED."""
        watch = Watch(None if rtype is None else rtype.name)
        if bootstrap:
            types = RESOURCE_TYPES if rtype is None else (rtype,)
            for each in types:
                watch.queue.extend(Event(EventKind.CREATED, r) for r in self.list(each))
        self._watches.append(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        self._watches.remove(watch)

    def _emit(self, event: Event) -> None:
        for watch in self._watches:
            if watch.type_name not in (None, event.resource.metadata.type) or watch.overflowed:
                continue
            if len(watch.queue) >= WATCH_QUEUE_LIMIT:
                watch.overflowed = True
                watch.queue.clear()
            else:
                watch.queue.append(event)
        if self.on_change is not None:
            self.on_change()


# Output ------------------------------------------------------------------------------------
# Exactly ``talosctl get``'s: its table is Go's tabwriter (padding 3), its yaml is yaml.v3
# (4-space indent, indented sequences, double quotes, no line wrapping), its json a stream of
# objects from Go's encoder (4-space indent, keys sorted, <>& escaped).

OUTPUTS = ("table", "yaml", "json")
EVENT_MARKS = {EventKind.CREATED: "+", EventKind.UPDATED: " ", EventKind.DESTROYED: "-"}
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                             "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _cell(value: object) -> str:
    """A print column's cell as Kubernetes' jsonpath prints it (what talosctl uses)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def _tabwriter(lines: list[list[str]]) -> str:
    """Go's tabwriter (min width 0, padding 3): every cell but a line's last is padded to
    its column's widest cell plus 3; the last is written as it is."""
    widths = [max(len(line[i]) for line in lines) + 3 for i in range(len(lines[0]) - 1)]
    return "".join(
        "".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + line[-1] + "\n"
        for line in lines
    )


def _headers(rtype: ResourceType, *, watch: bool) -> list[str]:
    first = ["NODE", "*"] if watch else ["NODE"]
    return [*first, "NAMESPACE", "TYPE", "ID", "VERSION", *(h for h, _ in rtype.columns)]


def _row(rtype: ResourceType, node: str, resource: Resource, mark: str | None = None) -> list[str]:
    meta = resource.metadata
    first = [node] if mark is None else [node, mark]
    return [*first, rtype.namespace, rtype.display, meta.id, str(meta.version),
            *(_cell(resource.spec.get(key)) for _, key in rtype.columns)]


class _GoYamlDumper(yaml.SafeDumper):
    """PyYAML made to write what Go's yaml.v3 writes for the same data."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # "key:\n    - item", not "key:\n- item"

    def choose_scalar_style(self) -> str:
        style: str = super().choose_scalar_style()
        return '"' if style == "'" else style


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Times are time.Time in Talos, which yaml.v3 writes plain; any other string that
    # would read back as something else is quoted (by choose_scalar_style, in double quotes).
    implicit = dumper.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    if implicit == _TIMESTAMP:
        return dumper.represent_scalar(_TIMESTAMP, value)
    return dumper.represent_str(value)


_GoYamlDumper.add_representer(str, _represent_str)


def _yaml(node: str, event: EventKind | None, document: dict[str, Any]) -> str:
    head = f"node: {node}\n" + ("" if event is None else f"event: {event.value}\n")
    return head + yaml.dump(document, Dumper=_GoYamlDumper, indent=4, sort_keys=False,
                            allow_unicode=True, width=1 << 30)


def _json(node: str, event: EventKind | None, document: dict[str, Any]) -> str:
    obj = {**document, "node": node}
    if event is not None:
        obj["event"] = event.value
    text = json.dumps(obj, indent=4, sort_keys=True, ensure_ascii=False)
    return text.translate(_GO_ESCAPES) + "\n"


def _unknown(output: str) -> ResourceError:
    return ResourceError(f"unknown output {output!r}; one of: {', '.join(OUTPUTS)}")


def format_resources(rtype: ResourceType, node: str, resources: Sequence[Resource],
                     output: str, *, show_secrets: bool = False) -> str:
    """``uspan get`` output for ``node`` (the NODE column, ``node`` key), as ``talosctl get``:
    table: NODE NAMESPACE TYPE ID VERSION and the type's columns; yaml: per resource ``node``,
    ``metadata``, ``spec``, documents separated by ``---``; json: one object per resource."""
    if output == "table":
        return _tabwriter([_headers(rtype, watch=False),
                           *(_row(rtype, node, r) for r in resources)])
    documents = [r.to_dict(show_secrets=show_secrets) for r in resources]
    if output == "yaml":
        return "---\n".join(_yaml(node, None, d) for d in documents)
    if output == "json":
        return "".join(_json(node, None, d) for d in documents)
    raise _unknown(output)


def format_events(rtype: ResourceType, node: str, events: Sequence[Event], output: str, *,
                  first: bool, show_secrets: bool = False) -> str:
    """``uspan get --watch`` output for a batch of events; ``first``: nothing was printed yet.

    As ``talosctl get --watch``, which flushes after each event: table: a ``*`` column
    after NODE (+ created, - destroyed, blank updated), the header aligned with the first
    event and every later event aligned on its own; yaml: ``event`` after ``node``; json:
    an ``event`` key.
    """
    if output == "table":
        blocks = [[_row(rtype, node, e.resource, EVENT_MARKS[e.kind])] for e in events]
        if first and blocks:
            blocks[0].insert(0, _headers(rtype, watch=True))
        return "".join(_tabwriter(block) for block in blocks)
    pairs = [(e.kind, e.resource.to_dict(show_secrets=show_secrets)) for e in events]
    if output == "yaml":
        texts = [_yaml(node, kind, d) for kind, d in pairs]
        return "".join(text if first and i == 0 else "---\n" + text
                       for i, text in enumerate(texts))
    if output == "json":
        return "".join(_json(node, kind, d) for kind, d in pairs)
    raise _unknown(output)

