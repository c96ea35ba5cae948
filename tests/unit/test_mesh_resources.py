import base64
import ipaddress

import pytest
import yaml

from tests.jsonstream import read_json_stream
from uspan.mesh.address import cluster_subnet, node_address
from uspan.mesh.affiliate import Affiliate, KubeSpanInfo
from uspan.mesh.cycling import ObservedEndpoint
from uspan.mesh.identity import Identity
from uspan.mesh.peerspec import PeerSpec
from uspan.mesh.resources import (
    AFFILIATE,
    DISCOVERY_STATUS,
    KUBESPAN_ENDPOINT,
    KUBESPAN_IDENTITY,
    KUBESPAN_IDENTITY_ID,
    KUBESPAN_PEER_STATUS,
    MEMBER,
    REDACTED,
    WATCH_QUEUE_LIMIT,
    EventKind,
    ResourceError,
    Store,
    WatchOverflow,
    affiliate_spec,
    discovery_status_spec,
    endpoint_spec,
    format_events,
    format_resources,
    identity_spec,
    member_spec,
    peer_spec_spec,
    peer_status_spec,
    resolve_type,
    wall_time,
)
from uspan.mesh.status import PeerState, PeerStatus
from uspan.wg.endpoint import Endpoint

WALL = 1_780_000_000.0  # wall minus monotonic
EP = Endpoint("192.0.2.2", 51820)
KEY = b"K" * 32
KEY_ID = base64.b64encode(KEY).decode()


def status(state: PeerState = PeerState.UP, rx: int = 10) -> PeerStatus:
    return PeerStatus(
        label="node-2",
        state=state,
        endpoint=EP,
        rx_bytes=rx,
        tx_bytes=20,
        last_handshake=100.0,
        last_used_endpoint=EP,
        last_endpoint_change=90.0,
    )


def test_resolve_type_names() -> None:
    assert resolve_type("kubespanpeerstatuses") is KUBESPAN_PEER_STATUS
    assert resolve_type("KubeSpanPeerStatus") is KUBESPAN_PEER_STATUS
    assert resolve_type("KubeSpanPeerStatuses.kubespan.uspan.dev") is KUBESPAN_PEER_STATUS
    assert resolve_type("discoverystatus") is DISCOVERY_STATUS
    with pytest.raises(ResourceError, match="one of: kubespanidentities"):
        resolve_type("pods")


def test_versions_count_real_changes() -> None:
    store = Store(WALL)
    first = store.put(KUBESPAN_PEER_STATUS, KEY_ID, peer_status_spec(status(), WALL), 5.0)
    assert first.metadata.version == 1
    assert first.metadata.created == first.metadata.updated == 5.0 + WALL
    same = store.put(KUBESPAN_PEER_STATUS, KEY_ID, peer_status_spec(status(), WALL), 6.0)
    assert same is first
    changed = store.put(KUBESPAN_PEER_STATUS, KEY_ID, peer_status_spec(status(rx=11), WALL), 7.0)
    assert changed.metadata.version == 2
    assert changed.metadata.created == 5.0 + WALL
    assert changed.metadata.updated == 7.0 + WALL
    assert store.get(KUBESPAN_PEER_STATUS, KEY_ID) is changed
    assert store.delete(KUBESPAN_PEER_STATUS, KEY_ID)
    assert not store.delete(KUBESPAN_PEER_STATUS, KEY_ID)
    with pytest.raises(ResourceError, match="not found"):
        store.get(KUBESPAN_PEER_STATUS, KEY_ID)
    again = store.put(KUBESPAN_PEER_STATUS, KEY_ID, peer_status_spec(status(), WALL), 8.0)
    assert again.metadata.version == 1


def test_watch_sees_creates_updates_and_deletes() -> None:
    woken = []
    store = Store(WALL, on_change=lambda: woken.append(1))
    store.put(MEMBER, "a", {"hostname": "a"}, 1.0)
    watch = store.watch(MEMBER)
    everything = store.watch(bootstrap=False)
    store.put(MEMBER, "a", {"hostname": "a"}, 2.0)  # unchanged: no event
    store.put(MEMBER, "a", {"hostname": "a2"}, 3.0)
    store.put(AFFILIATE, "x", {"hostname": "x"}, 3.0)  # another type
    store.delete(MEMBER, "a")
    events = watch.drain()
    assert [(e.kind, e.resource.metadata.version) for e in events] == [
        (EventKind.CREATED, 1),
        (EventKind.UPDATED, 2),
        (EventKind.DESTROYED, 2),
    ]
    assert watch.drain() == []
    assert [e.resource.metadata.type for e in everything.drain()] == [
        MEMBER.name,
        AFFILIATE.name,
        MEMBER.name,
    ]
    assert len(woken) == 4
    store.unwatch(watch)
    store.put(MEMBER, "b", {}, 4.0)
    assert watch.drain() == []


def test_a_watcher_too_far_behind_must_relist() -> None:
    store = Store(WALL)
    watch = store.watch(MEMBER)
    for n in range(WATCH_QUEUE_LIMIT + 1):
        store.put(MEMBER, "a", {"n": n}, float(n))
    with pytest.raises(WatchOverflow):
        watch.drain()


def test_replace_all_deletes_what_is_gone() -> None:
    store = Store(WALL)
    store.replace_all(MEMBER, {"a": {"n": 1}, "b": {"n": 1}}, 1.0)
    watch = store.watch(MEMBER, bootstrap=False)
    store.replace_all(MEMBER, {"b": {"n": 2}, "c": {"n": 1}}, 2.0)
    assert [r.metadata.id for r in store.list(MEMBER)] == ["b", "c"]
    assert [(e.kind, e.resource.metadata.id) for e in watch.drain()] == [
        (EventKind.DESTROYED, "a"),
        (EventKind.UPDATED, "b"),
        (EventKind.CREATED, "c"),
    ]


def test_specs_use_talos_field_names() -> None:
    identity = Identity(node_id="n" * 43, private_key=bytes(range(32)))
    subnet = cluster_subnet("8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=")
    address = node_address(subnet, bytes.fromhex("0a1b2c3d4e5f"), identity.public_key)
    assert identity_spec(identity, address, subnet) == {
        "address": "fd7f:175a:b97c:5602:81b:2cff:fe3d:4e5f/128",
        "subnet": "fd7f:175a:b97c:5602::/64",
        "privateKey": base64.b64encode(bytes(range(32))).decode(),
        "publicKey": base64.b64encode(identity.public_key).decode(),
    }
    spec = PeerSpec(
        KEY,
        "node2id",
        "node-2",
        ipaddress.IPv6Address("fd00::2"),
        (ipaddress.ip_network("fd00::2/128"),),
        (EP,),
    )
    assert peer_spec_spec(spec) == {
        "address": "fd00::2",
        "allowedIPs": ["fd00::2/128"],
        "endpoints": ["192.0.2.2:51820"],
        "label": "node-2",
    }
    assert peer_status_spec(status(), WALL) == {
        "label": "node-2",
        "endpoint": "192.0.2.2:51820",
        "state": "up",
        "receiveBytes": 10,
        "transmitBytes": 20,
        "lastHandshakeTime": "2026-05-28T20:28:20Z",
        "lastUsedEndpoint": "192.0.2.2:51820",
        "lastEndpointChange": "2026-05-28T20:28:10Z",
    }
    assert peer_status_spec(PeerStatus(label="x"), WALL)["lastHandshakeTime"] is None
    assert endpoint_spec(ObservedEndpoint(KEY_ID, "node2id", EP)) == {
        "affiliateID": "node2id",
        "endpoint": "192.0.2.2:51820",
    }
    affiliate = Affiliate(
        "node2id",
        "node-2.example",
        "node-2",
        (ipaddress.ip_address("192.0.2.2"),),
        KubeSpanInfo(KEY, ipaddress.IPv6Address("fd00::2"), (), (EP,)),
    )
    assert affiliate_spec(affiliate)["kubespan"] == {
        "publicKey": KEY_ID,
        "address": "fd00::2",
        "additionalAddresses": [],
        "endpoints": ["192.0.2.2:51820"],
    }
    assert member_spec(affiliate) == {
        "nodeId": "node2id",
        "hostname": "node-2.example",
        "addresses": ["192.0.2.2"],
    }
    assert discovery_status_spec("d:3000", 100.0, None, WALL, ignored=3) == {
        "service": "d:3000",
        "connectedSince": wall_time(100.0, WALL),
        "lastError": None,
        "ignoredBlobs": 3,
        "reflexiveEndpoints": [],
        "probes": {"sent": 0, "answered": 0, "forged": 0, "malformed": 0},
    }


def peer_store() -> Store:
    store = Store(WALL)
    store.put(KUBESPAN_PEER_STATUS, KEY_ID, peer_status_spec(status(), WALL), 5.0)
    other = PeerStatus(label="n3", state=PeerState.DOWN)
    store.put(KUBESPAN_PEER_STATUS, "AAAA", peer_status_spec(other, WALL), 5.0)
    store.put(KUBESPAN_PEER_STATUS, "AAAA", peer_status_spec(other, WALL) | {"label": "n4"}, 6.0)
    return store


def test_table_output_is_talosctls() -> None:
    store = peer_store()
    text = format_resources(KUBESPAN_PEER_STATUS, "n1", store.list(KUBESPAN_PEER_STATUS),
                            "table")
    assert text == (
        "NODE   NAMESPACE   TYPE                 ID                                  "
        "           VERSION   LABEL    ENDPOINT          STATE   RX   TX\n"
        "n1     kubespan    KubeSpanPeerStatus   AAAA                                "
        "           2         n4                         down    0    0\n"
        f"n1     kubespan    KubeSpanPeerStatus   {KEY_ID}   "
        "1         node-2   192.0.2.2:51820   up      10   20\n"
    )
    assert format_resources(MEMBER, "n1", [], "table") == (
        "NODE   NAMESPACE   TYPE   ID   VERSION   HOSTNAME   ADDRESSES\n")


def test_table_cells_are_jsonpaths() -> None:
    store = Store(WALL)
    store.put(MEMBER, "n2", {"hostname": "", "addresses": ["192.0.2.2", "fd00::2"]}, 1.0)
    assert format_resources(MEMBER, "n1", store.list(MEMBER), "table").splitlines()[1] == (
        'n1     cluster     Member   n2   1                    ["192.0.2.2","fd00::2"]')


def test_yaml_output_is_talosctls() -> None:
    store = peer_store()
    text = format_resources(KUBESPAN_PEER_STATUS, "n1", store.list(KUBESPAN_PEER_STATUS),
                            "yaml")
    assert text.split("---\n")[1] == f"""node: n1
metadata:
    namespace: kubespan
    type: KubeSpanPeerStatuses.kubespan.uspan.dev
    id: {KEY_ID}
    version: 1
    owner: kubespan.ManagerController
    phase: running
    created: 2026-05-28T20:26:45Z
    updated: 2026-05-28T20:26:45Z
spec:
    label: node-2
    endpoint: 192.0.2.2:51820
    state: up
    receiveBytes: 10
    transmitBytes: 20
    lastHandshakeTime: 2026-05-28T20:28:20Z
    lastUsedEndpoint: 192.0.2.2:51820
    lastEndpointChange: 2026-05-28T20:28:10Z
"""
    assert text.count("---\n") == 1 and text.startswith("node: n1\nmetadata:\n")
    documents = list(yaml.safe_load_all(text))
    assert [d["metadata"]["id"] for d in documents] == ["AAAA", KEY_ID]


def test_yaml_quotes_as_go_does() -> None:
    store = Store(WALL)
    store.put(AFFILIATE, "n2", {"hostname": "", "addresses": [], "nodename": "[x]: y",
                                "kubespan": None}, 1.5)
    text = format_resources(AFFILIATE, "n1", store.list(AFFILIATE), "yaml")
    (document,) = yaml.safe_load_all(text)
    assert text.endswith('''    created: 2026-05-28T20:26:41.5Z
    updated: 2026-05-28T20:26:41.5Z
spec:
    hostname: ""
    addresses: []
    nodename: "[x]: y"
    kubespan: null
''')
    assert document["spec"]["nodename"] == "[x]: y"


def test_json_output_is_talosctls_stream() -> None:
    store = Store(WALL)
    store.put(MEMBER, "n2", {"hostname": "n2<&>", "addresses": ["192.0.2.2"], "nodeId": "x"},
              1.0)
    text = format_resources(MEMBER, "n1", store.list(MEMBER) * 2, "json")
    one = """{
    "metadata": {
        "created": "2026-05-28T20:26:41Z",
        "id": "n2",
        "namespace": "cluster",
        "owner": "cluster.MemberController",
        "phase": "running",
        "type": "Members.cluster.uspan.dev",
        "updated": "2026-05-28T20:26:41Z",
        "version": 1
    },
    "node": "n1",
    "spec": {
        "addresses": [
            "192.0.2.2"
        ],
        "hostname": "n2\\u003c\\u0026\\u003e",
        "nodeId": "x"
    }
}
"""
    assert text == one * 2
    assert [item["spec"]["hostname"] for item in read_json_stream(text)] == ["n2<&>"] * 2
    assert format_resources(MEMBER, "n1", [], "json") == ""


def test_json_stream_reader() -> None:
    assert read_json_stream(" \n") == []
    assert read_json_stream('{"a": 1}\n{"b": [2]}\n') == [{"a": 1}, {"b": [2]}]
    with pytest.raises(ValueError, match="not a JSON object at character 9"):
        read_json_stream('{"a": 1} [1]')
    with pytest.raises(ValueError):
        read_json_stream('{"a": ')


def test_private_key_is_redacted_unless_asked_for() -> None:
    identity = Identity(node_id="n" * 43, private_key=bytes(range(32)))
    subnet = cluster_subnet("x")
    spec = identity_spec(identity, node_address(subnet, None, identity.public_key), subnet)
    store = Store(WALL)
    store.put(KUBESPAN_IDENTITY, KUBESPAN_IDENTITY_ID, spec, 1.0)
    resources = store.list(KUBESPAN_IDENTITY)
    secret = spec["privateKey"]
    for output in ("table", "yaml", "json"):
        assert secret not in format_resources(KUBESPAN_IDENTITY, "n1", resources, output)
    assert REDACTED in format_resources(KUBESPAN_IDENTITY, "n1", resources, "yaml")
    assert secret in format_resources(KUBESPAN_IDENTITY, "n1", resources, "json",
                                      show_secrets=True)
    watch = store.watch(KUBESPAN_IDENTITY)
    events = watch.drain()
    for output in ("table", "yaml", "json"):
        assert secret not in format_events(KUBESPAN_IDENTITY, "n1", events, output, first=True)


def test_unknown_output() -> None:
    with pytest.raises(ResourceError, match="one of: table, yaml, json"):
        format_resources(MEMBER, "n1", [], "xml")
    with pytest.raises(ResourceError, match="one of"):
        format_events(MEMBER, "n1", [], "xml", first=False)


def test_watch_output() -> None:
    store = Store(WALL)
    watch = store.watch(KUBESPAN_ENDPOINT)
    store.put(KUBESPAN_ENDPOINT, "k", {"affiliateID": "n2", "endpoint": "192.0.2.2:1"}, 1.0)
    store.put(KUBESPAN_ENDPOINT, "k", {"affiliateID": "n2", "endpoint": "192.0.2.2:2"}, 2.0)
    store.delete(KUBESPAN_ENDPOINT, "k")
    events = watch.drain()
    assert format_events(KUBESPAN_ENDPOINT, "n1", events, "table", first=True) == (
        "NODE   *   NAMESPACE   TYPE               ID   VERSION   ENDPOINT      AFFILIATE ID\n"
        "n1     +   kubespan    KubeSpanEndpoint   k    1         192.0.2.2:1   n2\n"
        "n1   " + " " + "   kubespan   KubeSpanEndpoint   k   2   192.0.2.2:2   n2\n"
        "n1   -   kubespan   KubeSpanEndpoint   k   2   192.0.2.2:2   n2\n"
    )  # talosctl flushes its tabwriter after each event: only the first is aligned
    assert format_events(KUBESPAN_ENDPOINT, "n1", events[:1], "table", first=False) == (
        "n1   +   kubespan   KubeSpanEndpoint   k   1   192.0.2.2:1   n2\n")
    assert format_events(KUBESPAN_ENDPOINT, "n1", [], "table", first=True) == ""
    stream = read_json_stream(format_events(KUBESPAN_ENDPOINT, "n1", events, "json", first=True))
    assert [(item["node"], item["event"]) for item in stream] == [
        ("n1", "created"), ("n1", "updated"), ("n1", "destroyed")]
    later = format_events(KUBESPAN_ENDPOINT, "n1", events[1:], "yaml", first=False)
    assert later.startswith("---\nnode: n1\nevent: updated\nmetadata:\n")
    assert later.count("---\n") == 2
    first = format_events(KUBESPAN_ENDPOINT, "n1", events, "yaml", first=True)
    assert first.startswith("node: n1\nevent: created\nmetadata:\n")
    docs = list(yaml.safe_load_all(first))
    assert [(d["event"], d["metadata"]["version"]) for d in docs] == [
        ("created", 1), ("updated", 2), ("destroyed", 2)]
