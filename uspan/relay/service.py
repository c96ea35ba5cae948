"""``uspan relay``: the relay as a process of its own (metrics, signals), and the piece
``uspan discovery-service --relay`` runs beside the registry."""

from __future__ import annotations

import logging

import trio
from prometheus_client.registry import CollectorRegistry

from uspan import metrics
from uspan import signals as stop_signals
from uspan.errors import expected
from uspan.relay.server import RelayCollector, RelayServer

log = logging.getLogger("uspan.relay")


async def start(nursery: trio.Nursery, listen: tuple[str, int],
                registry: CollectorRegistry | None) -> RelayServer:
    """A relay serving on ``listen`` in ``nursery``, its metrics in ``registry``."""
    server = RelayServer()
    await nursery.start(server.serve, *listen)
    if registry is not None:
        registry.register(RelayCollector(server))
    return server


async def serve(listen: tuple[str, int], metrics_at: tuple[str, int] | None) -> None:
    """Run until SIGINT/SIGTERM (``uspan.signals.catch()`` must have run first)."""
    async with trio.open_nursery() as nursery:
        registry = None if metrics_at is None else CollectorRegistry()
        await start(nursery, listen, registry)
        if registry is not None and metrics_at is not None:
            port = await nursery.start(metrics.serve, *metrics_at, registry)
            log.info("metrics on http://%s:%d/metrics", metrics_at[0], port)
        signum = await stop_signals.first()
        log.info("signal %s: shutting down", signum.name)
        nursery.cancel_scope.cancel()


def run(listen: tuple[str, int], metrics_at: tuple[str, int] | None) -> int:
    """The process: 0 after a signal, 1 (with the reason logged) if it cannot serve."""
    stop_signals.catch()
    try:
        trio.run(serve, listen, metrics_at)
    except (OSError, BaseExceptionGroup) as error:
        found = expected(error, OSError)
        if found is None:
            raise
        for leaf in found:
            log.error("relay: %s", leaf.strerror if isinstance(leaf, OSError) else leaf)
        return 1
    return 0
