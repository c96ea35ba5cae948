"""``uspan discovery-service``: the process around ``Server``: backend choice, metrics,
signals. Stop signals are caught before any socket exists (``uspan.signals``), so a signal
at any moment ends in the same clean shutdown (state saved).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from uspan import metrics
from uspan import signals as stop_signals
from uspan.discovery.backend import Backend, MemoryBackend
from uspan.discovery.client import parse_endpoint
from uspan.discovery.persist import StateError
from uspan.discovery.reflect import ProbeResponder
from uspan.discovery.server import Limits, Server
from uspan.errors import expected
from uspan.relay import service as relay_service

log = logging.getLogger("uspan.discovery")


@dataclass
class Options:
    listen: tuple[str, int]
    state_file: Path | None = None
    etcd: list[str] | None = None
    etcd_prefix: str = "/uspan/discovery/"
    metrics: tuple[str, int] | None = None
    limits: Limits | None = None
    probe_port: int | None = None  # UDP, reflexive probes; None: the listen port, if free
    relay: tuple[str, int] | None = None  # also run a relay there (uspan.relay)


def parse_listen(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT (port 0 picks one) or ValueError naming ``flag``."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{flag}: {text!r} is not HOST:PORT")
    return host, int(port)


class MetricsCollector(Collector):
    """Reads the server's state at scrape time: nothing to keep in step."""

    def __init__(self, server: Server, probes: ProbeResponder) -> None:
        self.server = server
        self.probes = probes

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        clusters, affiliates = self.server.backend.counts()
        yield GaugeMetricFamily("uspan_discovery_clusters", "Clusters known", clusters)
        yield GaugeMetricFamily("uspan_discovery_affiliates", "Affiliates stored", affiliates)
        yield GaugeMetricFamily(
            "uspan_discovery_watchers", "Active watches", len(self.server.backend.hub)
        )
        yield GaugeMetricFamily(
            "uspan_discovery_connections", "Open client connections", len(self.server.connections)
        )
        requests = CounterMetricFamily("uspan_discovery_requests", "Requests by op", labels=["op"])
        for op, count in sorted(self.server.stats.requests.items()):
            requests.add_metric([op], count)
        yield requests
        refusals = CounterMetricFamily(
            "uspan_discovery_refusals", "Error replies by reason (error code)", labels=["reason"]
        )
        for reason, count in sorted(self.server.stats.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        probes = CounterMetricFamily(
            "uspan_discovery_probes", "Reflexive probes by result", labels=["result"]
        )
        for result, count in sorted(self.probes.counts.items()):
            probes.add_metric([result], count)
        yield probes


def make_backend(options: Options) -> Backend:
    if options.etcd:
        from uspan.discovery.etcd import EtcdBackend

        return EtcdBackend(options.etcd, prefix=options.etcd_prefix)
    return MemoryBackend(options.state_file)


async def serve(options: Options) -> None:
    """Run until SIGINT/SIGTERM (``uspan.signals.catch()`` must have run first)."""
    server = Server(make_backend(options), options.limits)
    probes = ProbeResponder()
    async with trio.open_nursery() as nursery:
        registry = CollectorRegistry()
        if options.relay is not None:
            await relay_service.start(nursery, options.relay, registry)
        if options.metrics is not None:
            registry.register(MetricsCollector(server, probes))
            host, _ = options.metrics
            port = await nursery.start(metrics.serve, host, options.metrics[1], registry)
            log.info("metrics on http://%s:%d/metrics", host, port)
        nursery.start_soon(server.serve, *options.listen)
        nursery.start_soon(_serve_probes, probes, options)
        signum = await stop_signals.first()
        log.info("signal %s: shutting down", signum.name)
        nursery.cancel_scope.cancel()


async def _serve_probes(probes: ProbeResponder, options: Options) -> None:
    """On the chosen port, or on the listen port's number when it is free."""
    host, port = options.listen
    try:
        await probes.serve(host, port if options.probe_port is None else options.probe_port)
    except OSError as exc:
        if options.probe_port is not None:
            raise
        log.warning("no reflexive probes: %s", exc.strerror or exc)


def run(options: Options) -> int:
    """The process: 0 after a signal, 1 (with the reason logged) if it cannot serve."""
    stop_signals.catch()
    try:
        trio.run(serve, options)
    except (OSError, StateError, BaseExceptionGroup) as error:
        found = expected(error, OSError, StateError)
        if found is None:
            raise
        for leaf in found:
            text = leaf.strerror if isinstance(leaf, OSError) and leaf.strerror else str(leaf)
            filename = getattr(leaf, "filename", None)
            log.error("discovery service: %s%s", f"{filename}: " if filename else "", text)
        return 1
    log.info("discovery service stopped")
    return 0


__all__ = ["Options", "parse_endpoint", "parse_listen", "run", "serve"]
