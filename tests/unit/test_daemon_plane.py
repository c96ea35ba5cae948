"""The shell's side of the data plane (``Daemon._plane_loop``) against a fake plane
behind ``PlanePort``: a real eventfd signalled as the C plane signals it, and a
``collect`` that says when it was called. Real time (the plane's clock is
``MonotonicClock``), with margins a loaded machine keeps."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable
from typing import Any, cast

import trio

from uspan.daemon import dataplane
from uspan.daemon.clock import MonotonicClock
from uspan.daemon.daemon import SYNC_DELAY, Daemon
from uspan.daemon.memory import MemoryNetwork, MemoryTun
from uspan.daemon.ports import PlanePort
from uspan.plane._plane import NEWS_URGENT
from uspan.wg import prefix
from uspan.wg.admission import SAMPLE_WINDOW
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.constants import UNDER_LOAD_AFTER
from uspan.wg.cookie import cookie_key, mac1_key
from uspan.wg.crypto import clamp, public_key


class NewsOnly:
    """A plane with no peers: only its eventfd and its collects are used. It signals as
    the C plane does: each kind of news once until the next collect."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.collects: list[float] = []
        self.started = False
        self.gates: list[tuple[object, ...]] = []  # the plans set (): none
        self.taken = (0, 0, 0, 0, 0, 0)  # what the "thread" judged, for the next gate_take
        self._signalled: set[bool] = set()

    def signal(self, urgent: bool) -> float:
        if urgent not in self._signalled:
            self._signalled.add(urgent)
            os.eventfd_write(self.fd, NEWS_URGENT if urgent else 1)
        return time.monotonic()

    def fileno(self) -> int:
        return self.fd

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.started = False

    def collect(self) -> tuple[list[Any], list[Any], list[Any]]:
        self.collects.append(time.monotonic())
        self._signalled.clear()
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        return [], [], []

    def counters(self) -> dict[str, int]:
        return {}

    def routes_pending(self) -> int:
        return 0

    def sync_routes(self) -> None:
        pass

    def set_gate(self, *plan: object) -> None:
        self.gates.append(plan)

    def gate_take(self) -> tuple[int, int, int, int, int, int]:
        taken, self.taken = self.taken, (0, 0, 0, 0, 0, 0)
        return taken


def test_records_wait_for_the_sync_and_a_punt_is_collected_at_once() -> None:
    plane = NewsOnly()

    async def main() -> None:
        daemon = Daemon(MemoryTun(), MemoryNetwork().bind("192.0.2.1", 51820),
                        plane=cast(PlanePort, plane))
        async with daemon.running():
            assert plane.started
            await trio.sleep(0.1)
            before = len(plane.collects)
            signalled = plane.signal(urgent=False)  # the thread's first packet
            await trio.sleep(0.3)
            assert len(plane.collects) == before  # records alone: no collect yet
            plane.signal(urgent=False)  # more records do not wake it again
            await trio.sleep(SYNC_DELAY)
            assert len(plane.collects) == before + 1  # the timers' sync
            assert plane.collects[-1] - signalled < SYNC_DELAY + 0.5
            punted = plane.signal(urgent=True)
            await trio.sleep(0.2)
            assert len(plane.collects) == before + 2
            assert plane.collects[-1] - punted < 0.2  # at once
            assert daemon.plane_wakes == 2  # the records' first signal and the punt's

    trio.run(main, clock=MonotonicClock())
    os.close(plane.fd)


def test_the_planes_offload_flags_follow_what_the_kernel_took() -> None:
    """The thread cuts and merges only what the TUN and sockets were set up for: a TUN
    without IFF_VNET_HDR gets no bits whatever the sockets do; USO only with uso4 and uso6."""
    from uspan.plane import _plane

    tso = frozenset({"csum", "tso4", "tso6"})
    assert dataplane.flags(None, True) == 0
    assert dataplane.flags(tso, False) == _plane.OFFLOAD_TUN_VNET
    assert dataplane.flags(tso | {"uso4"}, True) == _plane.OFFLOAD_TUN_VNET | _plane.OFFLOAD_UDP_GSO
    assert dataplane.flags(tso | {"uso4", "uso6"}, True) == (
        _plane.OFFLOAD_TUN_VNET | _plane.OFFLOAD_TUN_USO | _plane.OFFLOAD_UDP_GSO)


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for ``condition``: a loaded machine is late, never early."""
    deadline = trio.current_time() + within
    while not condition():
        assert trio.current_time() < deadline
        await trio.sleep(0.005)


def test_the_threads_gate_follows_the_cores_plan() -> None:
    """No key: no plan (every handshake message goes up); a key: the calm plan with its
    mac1 key. A flood of bad mac1s the thread dropped turns the load on: the plan says
    so, a collect is due within SAMPLE_WINDOW of each such plan, so it is made again
    while the load lasts, and calm after. (Polls, not fixed sleeps: at 0.1 s for the
    first and 2 to 4 plans in 0.75 s, a runner late by a window failed.)"""
    plane = NewsOnly()
    private = clamp(bytes(range(32)))
    public = public_key(private)

    async def main() -> None:
        daemon = Daemon(MemoryTun(), MemoryNetwork().bind("192.0.2.1", 51820),
                        plane=cast(PlanePort, plane))
        async with daemon.running():
            assert plane.gates == [()]
            daemon.set(DeviceChange(private_key=private))
            assert plane.gates[-1][:4] == (mac1_key(public), cookie_key(public), None, False)
            plane.taken = (5000, 0, 0, 0, 0, 0)
            plane.signal(urgent=True)
            await _until(lambda: plane.gates[-1][3] is True)  # under load
            assert plane.gates[-1][2] is not None  # with a secret for cookies
            assert daemon._sync_at <= trio.current_time() + SAMPLE_WINDOW
            planned = len(plane.gates)
            await _until(lambda: len(plane.gates) >= planned + 2)
            await _until(lambda: plane.gates[-1][3] is False, UNDER_LOAD_AFTER + 5.0)

    trio.run(main, clock=MonotonicClock())


class QueuedRoutes(NewsOnly):
    """A plane whose route changes, once it is started, wait in a queue until the test
    applies them, as the C plane's routes thread does (before, each call applies its
    own). ``sync_routes`` would block the loop while the queue is not empty: the shell
    calls it only once ``routes_pending`` says the queue is empty, and learns that it
    drained from ``routes_fileno``, signalled as the queue drains."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[int] = []  # prefixes per queued call
        self.applied = 0  # prefixes
        self.synced = 0
        self.looks = 0  # routes_pending calls
        self.routes_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self._ids = itertools.count(1)

    def add_peer(self) -> int:
        return next(self._ids)

    def add_routes(self, peer: int, prefixes: list[int]) -> None:
        if self.started:
            self.queued.append(len(prefixes))
        else:
            self.applied += len(prefixes)

    def remove_routes(self, peer: int, prefixes: list[int]) -> None:
        self.add_routes(peer, prefixes)

    def routes_pending(self) -> int:
        self.looks += 1
        return len(self.queued)

    def routes_fileno(self) -> int:
        return self.routes_fd

    def apply_queued(self) -> None:
        self.applied += sum(self.queued)
        self.queued.clear()
        os.eventfd_write(self.routes_fd, 1)

    def sync_routes(self) -> None:
        assert not self.queued, "sync_routes would hold the loop until the queue drains"
        self.synced += 1


def _peer_change(count: int) -> DeviceChange:
    key = public_key(clamp(os.urandom(32)))
    return DeviceChange(peers=[PeerChange(key, allowed_ips=[
        prefix.parse(f"10.9.{i >> 8}.{i & 255}/32") for i in range(count)])])


def test_a_set_ends_once_the_plane_applied_its_routes_and_the_loop_runs_meanwhile() -> None:
    """A set's reply means its routes carry traffic: ``configure`` waits for the
    plane's routes thread to apply what the set queued, and lets every other task run
    while it waits; ``set`` (before the run: the calls applied them) syncs at once."""
    plane = QueuedRoutes()

    async def main() -> None:
        daemon = Daemon(MemoryTun(), MemoryNetwork().bind("192.0.2.1", 51820),
                        plane=cast(PlanePort, plane))
        daemon.set(DeviceChange(private_key=clamp(os.urandom(32))))
        daemon.set(_peer_change(300))
        assert (plane.applied, plane.synced) == (300, 2)
        async with daemon.running():
            done = trio.Event()
            ticks = 0

            async def configure() -> None:
                await daemon.configure(_peer_change(1000))
                done.set()

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(configure)
                nursery.start_soon(tick)
                await trio.sleep(0.2)
                assert not done.is_set()  # the device has it all, the plane not yet
                assert plane.queued == [256, 256, 256, 232]
                assert ticks > 20  # the loop was not held meanwhile
                assert plane.looks <= 2  # it waits for the signal (polling: ~150 looks)
                plane.apply_queued()
                with trio.fail_after(1):
                    await done.wait()
                assert (plane.applied, plane.synced) == (1300, 3)
                nursery.cancel_scope.cancel()

    trio.run(main, clock=MonotonicClock())
    os.close(plane.fd)
    os.close(plane.routes_fd)


class Collecting(NewsOnly):
    """A plane whose collects return a record (of no peer: the core skips it), so the
    collect's records take a slice before its punts; gate_take calls counted."""

    def __init__(self) -> None:
        super().__init__()
        self.takes = 0

    def collect(self) -> tuple[list[Any], list[Any], list[Any]]:
        super().collect()
        return [(999_999,)], [], []

    def gate_take(self) -> tuple[int, int, int, int, int, int]:
        self.takes += 1
        return super().gate_take()


def test_a_sets_replan_waits_for_the_punts_of_a_collect_under_way() -> None:
    """A set's replan (the end of ``_set_steps``) can run while a collect waits between
    its slices, its punts not judged yet. The thread's counts taken then say the
    initiations it handed up there were judged, so a plan made then, from tokens those
    have not spent yet, offered them again (the core judged them after, against tokens
    the thread had spent too). The plan waits for the collect's own step."""
    plane = Collecting()
    private = clamp(bytes(range(32)))

    async def main() -> None:
        daemon = Daemon(MemoryTun(), MemoryNetwork().bind("192.0.2.1", 51820),
                        plane=cast(PlanePort, plane))
        async with daemon.running():
            daemon.set(DeviceChange(private_key=private))
            out: list[Any] = []
            own: list[Any] = []
            steps = daemon._plane_steps(out, own)
            next(steps)  # collected; a slice of records done, its punts still to come
            takes, gates = plane.takes, len(plane.gates)
            daemon._gate_step(trio.current_time(), replan=True)  # as a set ends
            assert (plane.takes, len(plane.gates)) == (takes, gates)
            for _ in steps:
                pass
            assert (plane.takes, len(plane.gates)) == (takes + 1, gates + 1)  # then

    trio.run(main, clock=MonotonicClock())
    os.close(plane.fd)
