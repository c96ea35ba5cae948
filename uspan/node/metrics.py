"""The node's Prometheus metrics, read from its resource store at scrape time."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from uspan.mesh.resources import DISCOVERY_STATUS, KUBESPAN_PEER_STATUS, MEMBER, Store

STATES = ("unknown", "up", "down")


class NodeCollector(Collector):
    """Per-peer state, bytes and last handshake; members; discovery connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

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


def _unix(text: object) -> float:
    """An RFC 3339 time of the store as Unix seconds; 0 for none."""
    if not isinstance(text, str) or not text:
        return 0.0
    return datetime.datetime.fromisoformat(text).timestamp()


def registry_for(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(NodeCollector(store))
    return registry
