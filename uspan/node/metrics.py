"""The node's Prometheus metrics, read at scrape time from its resource store and from
its relay link's counters (the ones ``uspan stats`` shows)."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from uspan.mesh.resources import DISCOVERY_STATUS, KUBESPAN_PEER_STATUS, MEMBER, Store

STATES = ("unknown", "up", "down")
RelayStats = Callable[[], dict[str, int]]  # RelayLink.stats, or {} without a relay
RELAY_DROPS = ("not_from_relay", "bad_control", "tcp_backlog")


class NodeCollector(Collector):
    """Per-peer state, bytes and last handshake; members; discovery connection; the
    relay link, when the node has one."""

    def __init__(self, store: Store, relay: RelayStats) -> None:
        self.store = store
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        labels = ["peer", "label"]
        state = GaugeMetricFamily("uspan_peer_state",
                                  "1 for the state the peer is in (unknown, up, down)",
                                  labels=[*labels, "state"])
        rx = GaugeMetricFamily("uspan_peer_receive_bytes", "bytes received from the peer",
                               labels=labels)
        tx = GaugeMetricFamily("uspan_peer_transmit_bytes", "bytes sent to the peer",
                               labels=labels)
        handshake = GaugeMetricFamily("uspan_peer_last_handshake_seconds",
                                      "Unix time of the last handshake (0 = never)",
                                      labels=labels)
        for resource in self.store.list(KUBESPAN_PEER_STATUS):
            spec = resource.spec
            ids = [resource.metadata.id, str(spec.get("label") or "")]
            for name in STATES:
                state.add_metric([*ids, name], 1.0 if spec.get("state") == name else 0.0)
            rx.add_metric(ids, float(spec.get("receiveBytes") or 0))
            tx.add_metric(ids, float(spec.get("transmitBytes") or 0))
            handshake.add_metric(ids, _unix(spec.get("lastHandshakeTime")))
        yield from (state, rx, tx, handshake)
        yield GaugeMetricFamily("uspan_members", "cluster members known through discovery",
                                value=len(self.store.list(MEMBER)))
        connected = 0.0
        for resource in self.store.list(DISCOVERY_STATUS):
            connected = 1.0 if resource.spec.get("service") else 0.0
        yield GaugeMetricFamily("uspan_discovery_connected",
                                "1 while a discovery service is connected", value=connected)
        yield from relay_metrics(self.relay())


def relay_metrics(stats: dict[str, int]) -> Iterator[Metric]:
    """The relay link's metrics from its counters; none without a relay."""
    if not stats:
        return
    transport = GaugeMetricFamily("uspan_relay_link_transport",
                                  "1 for the transport the relay link uses (udp, tcp)",
                                  labels=["transport"])
    tcp = stats["relay_tcp"]
    transport.add_metric(["udp"], float(1 - tcp))
    transport.add_metric(["tcp"], float(tcp))
    yield transport
    yield GaugeMetricFamily("uspan_relay_link_registered", "1 while registered at the relay",
                            value=stats["relay_registered"])
    for name, key, text in (
            ("transmit_frames", "sent", "datagrams sent through the relay"),
            ("transmit_bytes", "sent_bytes", "bytes of datagrams sent through the relay"),
            ("receive_frames", "received", "datagrams received through the relay"),
            ("receive_bytes", "received_bytes", "bytes of datagrams received through the relay"),
            ("fallbacks", "fallbacks", "switches from UDP to TCP"),
            ("udp_returns", "udp_returns", "switches from TCP back to UDP"),
            ("reconnects", "reconnects",
             "TCP connections to the relay lost (closed, broken or found dead) and replaced")):
        yield CounterMetricFamily(f"uspan_relay_link_{name}", text,
                                  value=stats[f"relay_{key}"])
    dropped = CounterMetricFamily("uspan_relay_link_dropped_frames",
                                  "relay frames dropped by reason", labels=["reason"])
    for reason in RELAY_DROPS:
        dropped.add_metric([reason], stats[f"relay_{reason}"])
    yield dropped


def _unix(text: object) -> float:
    """An RFC 3339 time of the store as Unix seconds; 0 for none."""
    if not isinstance(text, str) or not text:
        return 0.0
    return datetime.datetime.fromisoformat(text).timestamp()


def registry_for(store: Store, relay: RelayStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(NodeCollector(store, relay))
    return registry
