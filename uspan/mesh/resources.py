"""The resource store that ``uspan get`` reads, and its table/yaml/json output.

Resources are ``metadata`` (type, id, version, created, updated) and a ``spec`` with
Talos's field names, built from the mesh's own objects by the ``*_spec`` functions. A
resource's version grows by one on every change; putting an equal spec changes nothing,
so a version is a count of real changes. Puts and deletes become events for watchers,
which the shell drains (the store never blocks and never does I/O).

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
    secret_fields: frozenset[str] = frozenset()


KUBESPAN_IDENTITY = ResourceType(
    "KubeSpanIdentities.kubespan.uspan.dev",
    "kubespanidentities",
    ("kubespanidentity", "ksi"),
    (("ADDRESS", "address"), ("PUBLIC KEY", "publicKey")),
    frozenset({"privateKey"}),
)
KUBESPAN_PEER_SPEC = ResourceType(
    "KubeSpanPeerSpecs.kubespan.uspan.dev",
    "kubespanpeerspecs",
    ("kubespanpeerspec",),
    (("LABEL", "label"), ("ENDPOINTS", "endpoints")),
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
)
KUBESPAN_ENDPOINT = ResourceType(
    "KubeSpanEndpoints.kubespan.uspan.dev",
    "kubespanendpoints",
    ("kubespanendpoint",),
    (("ENDPOINT", "endpoint"), ("AFFILIATE ID", "affiliateID")),
)
MEMBER = ResourceType(
    "Members.cluster.uspan.dev",
    "members",
    ("member",),
    (("HOSTNAME", "hostname"), ("ADDRESSES", "addresses")),
)
AFFILIATE = ResourceType(
    "Affiliates.cluster.uspan.dev",
    "affiliates",
    ("affiliate",),
    (("HOSTNAME", "hostname"), ("ADDRESSES", "addresses")),
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
        if wanted in (rtype.plural, rtype.name.lower(), *rtype.aliases):
            return rtype
    known = ", ".join(rtype.plural for rtype in RESOURCE_TYPES)
    raise ResourceError(f"unknown resource {name!r}; one of: {known}")


# Specs -------------------------------------------------------------------------------------


def wall_time(monotonic: float | None, wall_offset: float) -> str | None:
    """RFC 3339 UTC for a monotonic time; None stays None (never happened)."""
    if monotonic is None:
        return None
    moment = datetime.datetime.fromtimestamp(monotonic + wall_offset, tz=datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


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
        """``{"metadata": ..., "spec": ...}`` as yaml/json show it."""
        meta = self.metadata
        spec = dict(self.spec)
        if not show_secrets:
            secret = resolve_type(meta.type).secret_fields
            spec = {key: REDACTED if key in secret else value for key, value in spec.items()}
        return {
            "metadata": {
                "type": meta.type,
                "id": meta.id,
                "version": meta.version,
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


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


OUTPUTS = ("table", "yaml", "json")
EVENT_MARKS = {EventKind.CREATED: "+", EventKind.UPDATED: " ", EventKind.DESTROYED: "-"}


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines) + "\n"


def _row(rtype: ResourceType, resource: Resource) -> list[str]:
    meta = resource.metadata
    return [
        meta.id,
        str(meta.version),
        *(_cell(resource.spec.get(key)) for _, key in rtype.columns),
    ]


def _headers(rtype: ResourceType) -> list[str]:
    return ["ID", "VERSION", *(header for header, _ in rtype.columns)]


def format_resources(
    rtype: ResourceType, resources: Sequence[Resource], output: str, *, show_secrets: bool = False
) -> str:
    """``uspan get`` output.

    table: aligned columns like ``talosctl get`` (ID, VERSION, then the type's own);
    yaml: each resource as a document (metadata + spec), separated by ``---``;
    json: one JSON array of those objects.
    """
    if output == "table":
        return _table(_headers(rtype), [_row(rtype, r) for r in resources])
    if output == "yaml":
        return "---\n".join(
            yaml.safe_dump(r.to_dict(show_secrets=show_secrets), sort_keys=False) for r in resources
        )
    if output == "json":
        items = [r.to_dict(show_secrets=show_secrets) for r in resources]
        return json.dumps(items, indent=2) + "\n"
    raise ResourceError(f"unknown output {output!r}; one of: {', '.join(OUTPUTS)}")


def format_events(
    rtype: ResourceType,
    events: Sequence[Event],
    output: str,
    *,
    header: bool,
    show_secrets: bool = False,
) -> str:
    """``uspan get --watch`` output for a batch of events.

    table: a first column ``*`` marks + created, - destroyed, blank updated (``header``
    prints the column names, for the first batch); yaml: one document per event with an
    ``event`` field; json: one object per line (a stream cannot be one array).
    """
    if output == "table":
        rows = [[EVENT_MARKS[e.kind], *_row(rtype, e.resource)] for e in events]
        text = _table(["*", *_headers(rtype)], rows)
        return text if header else text.split("\n", 1)[1]
    documents = [
        {"event": e.kind.value, **e.resource.to_dict(show_secrets=show_secrets)} for e in events
    ]
    if output == "yaml":
        return "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in documents)
    if output == "json":
        return "".join(json.dumps(d) + "\n" for d in documents)
    raise ResourceError(f"unknown output {output!r}; one of: {', '.join(OUTPUTS)}")
