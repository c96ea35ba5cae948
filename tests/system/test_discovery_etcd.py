"""Two service replicas on a real etcd (started here, on loopback, in a temp dir): shared
state, failover between replicas, etcd down and back without restarting anything."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from uspan.discovery import protocol as p
from uspan.discovery.client import (
    DiscoveryClient,
    DiscoveryError,
    Snapshot,
    Updated,
    View,
    WatchEvent,
)
from uspan.discovery.procs import EtcdProcess, ServiceProcess

pytestmark = pytest.mark.system

SECRET = os.urandom(32)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.etcd = EtcdProcess(tmp_path)
        self.replicas: list[ServiceProcess] = []

    def replica(self) -> ServiceProcess:
        service = ServiceProcess(self.tmp, "--etcd", self.etcd.url, "--rate-limit", "1000/1000")
        self.replicas.append(service)
        return service.start()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    s.etcd.start()
    try:
        yield s
    finally:
        for service in s.replicas:
            service.kill()
            print(f"--- {service.log}\n{service.log_tail()}")
        s.etcd.kill()
        print(f"--- {s.etcd.log}\n{s.etcd.log_tail()}")


def run(main: Callable[[], Awaitable[None]], timeout: float = 90) -> None:
    """trio.run with a deadline: a hang fails here, clearly, before pytest-timeout."""

    async def bounded() -> None:
        with trio.fail_after(timeout):
            await main()

    trio.run(bounded)


def client(*addresses: str, attempts: int = 1) -> DiscoveryClient:
    return DiscoveryClient(list(addresses), "cluster", SECRET, backoff_min=0.05,
                           backoff_max=0.5, attempts=attempts)  # fmt: skip


async def until(events: trio.MemoryReceiveChannel[WatchEvent], view: View,
                done: object, timeout: float = 30) -> None:
    """Apply events to ``view`` until ``done(view)``."""
    with trio.fail_after(timeout):
        while not done(view):  # type: ignore[operator]
            view.apply(await events.receive())


async def next_update(events: trio.MemoryReceiveChannel[WatchEvent]) -> Updated:
    while True:
        event = await events.receive()
        if isinstance(event, Updated):
            return event


def test_write_through_one_watch_through_the_other(setup: Setup) -> None:
    a, b = setup.replica(), setup.replica()

    async def main() -> None:
        watcher = client(b.address)
        async with client(a.address) as writer, watcher, watcher.watch() as events:
            assert await events.receive() == Snapshot(())
            await writer.update("n1", b"one", [("192.0.2.1", 51820)], 60)
            event = await next_update(events)
            assert (event.affiliate.data, event.affiliate.endpoints) == (
                b"one", (("192.0.2.1", 51820),))  # fmt: skip
            await writer.update("n1", None, [("192.0.2.2", 51820)], 60)
            event = await next_update(events)
            assert event.affiliate.data == b"one" and len(event.affiliate.endpoints) == 2
            # a list through either replica sees the same, at once
            async with client(b.address) as reader:
                assert [x.id for x in await reader.list()] == ["n1"]
            # the pin is shared: a wrong secret is refused by the other replica too
            outsider = DiscoveryClient([b.address], "cluster", os.urandom(32), attempts=1)
            with pytest.raises(DiscoveryError) as caught:
                await outsider.list()
            assert caught.value.code == p.E_PROOF_MISMATCH
            await writer.delete("n1")
            async with client(b.address) as reader:
                assert await reader.list() == []

    run(main)


def test_client_fails_over_when_a_replica_dies(setup: Setup) -> None:
    a, b = setup.replica(), setup.replica()

    async def main() -> None:
        both = client(a.address, b.address, attempts=4)
        async with both, both.watch() as events:
            await events.receive()
            await both.update("n1", b"before", [], 60)
            assert both.status.requests.endpoint == a.address
            a.kill()
            await both.update("n2", b"after", [], 60)  # retried on b
            assert both.status.requests.endpoint == b.address
            assert {x.id for x in await both.list()} == {"n1", "n2"}  # nothing lost
            # the watch re-subscribed on b: a fresh snapshot, then both
            view = View()
            await until(events, view, lambda v: v.snapshots and set(v.affiliates) == {"n1", "n2"})
            assert both.status.watch.endpoint == b.address

    run(main)


def test_etcd_down_clear_errors_then_recovery(setup: Setup) -> None:
    a, b = setup.replica(), setup.replica()

    async def main() -> None:
        watcher = client(b.address)
        async with client(a.address) as writer, watcher, watcher.watch() as events:
            await events.receive()
            await writer.update("n1", b"1", [], 600)
            await next_update(events)
            setup.etcd.stop()
            with trio.fail_after(20):
                while True:  # the replica may need a health probe to notice
                    try:
                        await writer.update("n2", b"2", [], 600)
                    except DiscoveryError as e:
                        assert e.code == p.E_BACKEND_UNAVAILABLE, e
                        assert "etcd" in e.message
                        break
                    await trio.sleep(0.1)
            with trio.fail_after(20):
                while watcher.status.watching:
                    await trio.sleep(0.1)
            assert "etcd" in (watcher.status.watch.last_error or "")
            await trio.to_thread.run_sync(setup.etcd.start)  # same data dir, same ports
            with trio.fail_after(30):
                while True:
                    try:
                        await writer.update("n3", b"3", [], 600)
                        break
                    except DiscoveryError:
                        await trio.sleep(0.2)
            # the watcher is back with a fresh snapshot, and sees n1 and n3
            view = View()
            await until(events, view, lambda v: v.snapshots and set(v.affiliates) >= {"n1", "n3"})
            assert a.alive() and b.alive()  # nothing was restarted

    run(main)
