"""The longest steps of a ``Daemon`` with many silent peers, and its cycle collections.

Two ``Daemon``s on in-memory ports (no root, no network) with a ping every 10 ms through
them; N peers that never answer (keepalive 25 s, a /32 each) are set on the first, which
is then read whole (``get_pieces``, as ``get=1``) once a second. Reported: the thread CPU
of every task step (``setsteps.StepTimes``), the thread CPU and size of every collection
(``gc.callbacks``), the objects the collector tracks a peer, and the CPU of a ``get``.
Nothing here keeps an object per step or per datagram (the memory network's record is
cleared): a harness that did measured full collections mostly of its own objects.

    bench/peersteps                        # 20,000 peers for 15 s
    bench/peersteps --peers 1000 --seconds 5
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import struct
import time
from typing import Any

import trio

from bench.setsteps import StepTimes, report
from uspan.daemon.daemon import Daemon
from uspan.daemon.memory import MemoryNetwork, MemoryTun
from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.crypto import clamp, public_key
from uspan.wg.endpoint import Endpoint


class NamedSteps(StepTimes):
    """StepTimes, and the task of each step over LONG ms."""

    LONG = 5.0

    def __init__(self) -> None:
        super().__init__()
        self.long: list[tuple[float, str]] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        super().after_task_step(task)
        if self.steps[-1] > self.LONG:
            self.long.append((self.steps[-1], task.name.rpartition(".")[2]))


class Collections:
    """Each collection as (generation, thread CPU ms, objects in the generations walked)."""

    def __init__(self) -> None:
        self.done: list[tuple[int, float, int]] = []
        self._start = 0.0
        self._size = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._size = sum(len(gc.get_objects(g)) for g in range(info["generation"] + 1))
            self._start = time.thread_time()
        else:
            cpu = (time.thread_time() - self._start) * 1000
            self.done.append((info["generation"], cpu, self._size))


def packet(source: str, destination: str) -> bytes:
    """An IPv4 header and 56 bytes (the core reads only the addresses and length)."""
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 76, 0, 0, 64, 17, 0,
                       socket.inet_aton(source), socket.inet_aton(destination)) + bytes(56)


PING, PONG = packet("10.0.0.1", "10.0.0.2"), packet("10.0.0.2", "10.0.0.1")


def silent(count: int) -> list[PeerChange]:
    return [PeerChange(public_key=public_key(clamp(os.urandom(32))),
                       endpoint=Endpoint(f"198.18.{i >> 8 & 255}.{i & 255}", 51820),
                       persistent_keepalive=25,
                       allowed_ips=[prefix.parse(f"10.200.{i >> 8 & 255}.{i & 255}/32")])
            for i in range(count)]


def pair(network: MemoryNetwork) -> tuple[Daemon, MemoryTun, Daemon, MemoryTun]:
    keys = [clamp(os.urandom(32)) for _ in range(2)]
    tuns = [MemoryTun(), MemoryTun()]
    daemons = [Daemon(tun, network.bind(f"192.0.2.{i + 1}", 51820)) for i, tun in enumerate(tuns)]
    for i, daemon in enumerate(daemons):
        other = 1 - i
        daemon.set(DeviceChange(private_key=keys[i], peers=[PeerChange(
            public_key=public_key(keys[other]),
            endpoint=Endpoint(f"192.0.2.{other + 1}", 51820) if i == 0 else None,
            allowed_ips=[prefix.parse(f"10.0.0.{other + 1}/32")])]))
    return daemons[0], tuns[0], daemons[1], tuns[1]


async def run(peers: int, seconds: float, times: NamedSteps) -> None:
    network = MemoryNetwork()
    a, tun_a, b, tun_b = pair(network)
    gc.collect()
    before = len(gc.get_objects())
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)

        async def echo() -> None:
            while True:
                await tun_b.next_written()
                tun_b.inject(PONG)

        async def ping() -> None:
            while True:
                tun_a.inject(PING)
                await tun_a.next_written()
                network.sent.clear()
                await trio.sleep(0.01)

        nursery.start_soon(echo)
        nursery.start_soon(ping)
        await a.configure(DeviceChange(peers=silent(peers)))
        await trio.sleep(6)  # first handshakes and their retransmissions
        gc.collect()
        frozen = gc.get_freeze_count()
        print(f"objects the collector tracks a peer: "
              f"{(len(gc.get_objects()) + frozen - before) / peers:.2f}")
        collections = Collections()
        gc.callbacks.append(collections)
        await trio.sleep(0)  # this step ran the collection above
        times.steps.clear()
        times.long.clear()
        cpu, gets = time.process_time(), []
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            start = time.process_time()
            sum(map(len, await a.get_pieces()))
            gets.append(time.process_time() - start)
            await trio.sleep(1)
        cpu = time.process_time() - cpu
        gc.callbacks.remove(collections)
        report(f"{peers} peers", times.steps, cpu)
        print(f"steps > 2 ms {sum(s > 2 for s in times.steps)}, > 5 ms "
              f"{len(times.long)} {[f'{ms:.1f} {name}' for ms, name in times.long]}; "
              f"get CPU min {min(gets) * 1000:.0f} ms")
        for generation in range(3):
            mine = [(ms, size) for g, ms, size in collections.done if g == generation]
            if mine:
                print(f"gen{generation} collections {len(mine)}, max "
                      f"{max(ms for ms, _ in mine):.2f} ms CPU, walked max "
                      f"{max(size for _, size in mine)}")
        print(f"tracked, not frozen: {len(gc.get_objects())}; frozen: {frozen}")
        nursery.cancel_scope.cancel()
    gc.unfreeze()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    times = NamedSteps()
    trio.run(run, args.peers, args.seconds, times, instruments=[times])


if __name__ == "__main__":
    main()
