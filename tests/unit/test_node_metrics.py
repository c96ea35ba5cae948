"""The node's metrics page: the relay link's metrics from its real counters, and none
without a relay."""

from __future__ import annotations

import re

import trio
from prometheus_client import generate_latest

from tests.unit.test_daemon_memory import Node, run
from tests.unit.test_node_relaylink import link
from uspan.daemon.memory import MemoryNetwork
from uspan.mesh.resources import Store
from uspan.node.metrics import registry_for


def scrape(stats: dict[str, int]) -> dict[str, float]:
    text = generate_latest(registry_for(Store(0.0), lambda: stats)).decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(uspan_relay_link\S*) (\S+)$", text, re.M)}


def test_relay_link_metrics_follow_its_counters() -> None:
    async def main() -> None:
        relay_link = link(Node(MemoryNetwork(), "192.0.2.1", "10.0.0.1"))
        relay_link.counters.update(sent=3, sent_bytes=300, received=2, received_bytes=200,
                                   tcp_backlog=1)
        session = relay_link.session
        session.fallbacks, session.udp_returns, session.reconnects = 2, 1, 4
        session.registered_until = trio.current_time() + 60
        metrics = scrape(relay_link.stats())
        assert metrics == {
            'uspan_relay_link_transport{transport="udp"}': 1.0,
            'uspan_relay_link_transport{transport="tcp"}': 0.0,
            "uspan_relay_link_registered": 1.0,
            "uspan_relay_link_transmit_frames_total": 3.0,
            "uspan_relay_link_transmit_bytes_total": 300.0,
            "uspan_relay_link_receive_frames_total": 2.0,
            "uspan_relay_link_receive_bytes_total": 200.0,
            "uspan_relay_link_fallbacks_total": 2.0,
            "uspan_relay_link_udp_returns_total": 1.0,
            "uspan_relay_link_reconnects_total": 4.0,
            'uspan_relay_link_dropped_frames_total{reason="not_from_relay"}': 0.0,
            'uspan_relay_link_dropped_frames_total{reason="bad_control"}': 0.0,
            'uspan_relay_link_dropped_frames_total{reason="tcp_backlog"}': 1.0,
        }

    run(main)


def test_no_relay_no_relay_metrics() -> None:
    assert scrape({}) == {}
