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
    bench/peersteps --mesh 1000 --seconds 4  # bench/control's ``mesh``, from the set on

``--mesh N`` is ``bench/control``'s ``mesh`` case in process: one UAPI ``set=1`` text of N
new peers (endpoint, preshared key, keepalive 25, a /128), served by the UAPI code over a
memory stream, while the ping runs; traced from the set on: every step over ``--long`` ms
with its task, the initiations it sent and the collections in it, the pings' round
trips, and for the slowest pings the CPU of each task that ran while they waited.

Both modes report the passes of the event loop (from one I/O wait to the next) and show
those over ``--long`` ms with the CPU of each task in them: a packet that becomes
readable waits for the rest of the pass it came in, so a pass, not a step, is what a
ping waits for at each hop through a node.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import struct
import time
from array import array
from typing import Any

import trio
import trio.testing

from bench.setsteps import StepTimes, report
from uspan.daemon import uapi_server
from uspan.daemon.daemon import Daemon
from uspan.daemon.memory import MemoryNetwork, MemoryTun
from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.crypto import clamp, public_key
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint


class NamedSteps(StepTimes):
    """StepTimes, and of each step over ``long`` ms: its task, the handshake initiations
    the traced device sent in it and the cycle collections that ran in it. With
    ``timeline`` on, also every step's start, CPU and task in flat arrays (no object a
    step), to tell what ran while a ping waited."""

    def __init__(self, long: float = 5.0) -> None:
        super().__init__()
        self.long_ms = long
        self.long: list[tuple[float, str, int, int]] = []
        self.device: Device | None = None
        self.owners: dict[int, str] = {}  # id of a nursery: whose tasks it holds
        self.collections = 0  # counted by a gc callback (``count_collection``)
        self.timeline = False
        self.starts, self.cpus, self.names = array("d"), array("d"), array("H")
        self.name_ids: dict[str, int] = {}
        self._at = (0, 0)
        self._wall = 0.0
        # Passes of the event loop (from one I/O wait to the next): a task woken by I/O
        # waits for the rest of the pass it woke in, so a pass is what a packet waits for.
        self.passes = array("d")
        self.long_passes: list[tuple[float, float, dict[str, float]]] = []
        self._pass_start = time.thread_time()
        self._pass_wall = 0.0
        self._pass_tasks: dict[str, float] = {}

    def count_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            self.collections += 1

    def _initiations(self) -> int:
        return 0 if self.device is None else self.device.initiations_sent

    def name(self, task: trio.lowlevel.Task) -> str:
        nursery = task.parent_nursery
        owner = self.owners.get(id(nursery), "") if nursery is not None else ""
        return f"{owner}{task.name.rpartition('.')[2]}"

    def after_io_wait(self, timeout: float) -> None:
        self._pass_start = time.thread_time()
        self._pass_wall = time.perf_counter()
        self._pass_tasks = {}

    def before_io_wait(self, timeout: float) -> None:
        cpu = (time.thread_time() - self._pass_start) * 1000
        self.passes.append(cpu)
        if cpu > self.long_ms and self.timeline:
            self.long_passes.append((self._pass_wall, cpu, self._pass_tasks))

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._at = (self._initiations(), self.collections)
        self._wall = time.perf_counter()
        super().before_task_step(task)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        super().after_task_step(task)
        cpu = self.steps[-1]
        if cpu > self.long_ms:
            self.long.append((cpu, self.name(task), self._initiations() - self._at[0],
                              self.collections - self._at[1]))
        if self.timeline:
            name = self.name(task)
            self._pass_tasks[name] = self._pass_tasks.get(name, 0.0) + cpu
            self.starts.append(self._wall)
            self.cpus.append(cpu)
            self.names.append(self.name_ids.setdefault(name, len(self.name_ids)))


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


class Pings:
    """Round trips of the ping, in flat arrays: when each was sent, and its ms."""

    def __init__(self) -> None:
        self.sent, self.ms = array("d"), array("d")

    def clear(self) -> None:
        del self.sent[:], self.ms[:]


async def start_pair(nursery: trio.Nursery, pings: Pings) -> tuple[Daemon, Daemon]:
    """Two running daemons, ``b`` answering a ping from ``a`` every 10 ms."""
    network = MemoryNetwork()
    a, tun_a, b, tun_b = pair(network)
    await nursery.start(a.run)
    await nursery.start(b.run)

    async def echo() -> None:
        while True:
            await tun_b.next_written()
            tun_b.inject(PONG)

    async def ping() -> None:
        while True:
            start = time.perf_counter()
            tun_a.inject(PING)
            await tun_a.next_written()
            pings.sent.append(start)
            pings.ms.append((time.perf_counter() - start) * 1000)
            network.sent.clear()
            await trio.sleep(0.01)

    nursery.start_soon(echo)
    nursery.start_soon(ping)
    return a, b


async def run(peers: int, seconds: float, times: NamedSteps) -> None:
    gc.collect()
    before = len(gc.get_objects())
    async with trio.open_nursery() as nursery:
        pings = Pings()
        a, b = await start_pair(nursery, pings)
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
        del times.passes[:]
        times.owners = {id(a._nursery): "a.", id(b._nursery): "b."}
        times.timeline = True
        zero = time.perf_counter()
        cpu, gets = time.process_time(), []
        end = trio.current_time() + seconds
        walls = []
        while trio.current_time() < end:
            start, wall = time.process_time(), time.perf_counter()
            sum(map(len, await a.get_pieces()))
            gets.append(time.process_time() - start)
            walls.append(time.perf_counter() - wall)
            await trio.sleep(1)
        cpu = time.process_time() - cpu
        times.timeline = False
        gc.callbacks.remove(collections)
        report(f"{peers} peers", times.steps, cpu)
        print(f"steps > {times.long_ms:g} ms "
              f"{len(times.long)} {[f'{ms:.1f} {name}' for ms, name, _, _ in times.long]}; "
              f"get CPU min {min(gets) * 1000:.0f} ms")
        names = {number: name for name, number in times.name_ids.items()}
        own = sum(cpu for cpu, name in zip(times.cpus, times.names, strict=True)
                  if names[name] == "run")
        print(f"a get: its own steps' CPU {own / len(gets):.0f} ms, wall min "
              f"{min(walls) * 1000:.0f} max {max(walls) * 1000:.0f} ms")
        print_passes(times, zero)
        for generation in range(3):
            mine = [(ms, size) for g, ms, size in collections.done if g == generation]
            if mine:
                print(f"gen{generation} collections {len(mine)}, max "
                      f"{max(ms for ms, _ in mine):.2f} ms CPU, walked max "
                      f"{max(size for _, size in mine)}")
        print(f"tracked, not frozen: {len(gc.get_objects())}; frozen: {frozen}")
        nursery.cancel_scope.cancel()
    gc.unfreeze()


def mesh_request(count: int) -> bytes:
    """bench/control's ``mesh`` set: ``count`` new peers as a node applies them."""
    return ("set=1\n" + "".join(
        f"public_key={os.urandom(32).hex()}\nendpoint=198.18.{i >> 8 & 255}.{i & 255}:51820\n"
        f"persistent_keepalive_interval=25\npreshared_key={os.urandom(32).hex()}\n"
        f"allowed_ip=fd00:78::{i:x}/128\n" for i in range(count)) + "\n").encode()


async def mesh(peers: int, seconds: float, times: NamedSteps) -> None:
    async with trio.open_nursery() as nursery:
        pings = Pings()
        a, b = await start_pair(nursery, pings)
        times.device = a.device
        await trio.sleep(1)  # the pair's handshake
        times.owners = {id(a._nursery): "a.", id(b._nursery): "b."}
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(uapi_server.handle, server, a)
        request = mesh_request(peers)
        gc.callbacks.append(times.count_collection)
        pings.clear()
        times.steps.clear()
        times.long.clear()
        del times.passes[:]
        times.timeline = True
        cpu, sent = time.process_time(), a.device.initiations_sent
        start = trio.current_time()
        await client.send_all(request)
        reply = b""
        while not reply.endswith(b"\n\n"):
            reply += await client.receive_some()
        took = trio.current_time() - start
        await trio.sleep_until(start + seconds)
        times.timeline = False
        zero = time.perf_counter() - (trio.current_time() - start)
        cpu = time.process_time() - cpu
        gc.callbacks.remove(times.count_collection)
        report(f"mesh {peers}", times.steps, cpu)
        ordered = sorted(pings.ms)
        print(f"set {took * 1000:.0f} ms ({reply.decode().strip()}); initiations "
              f"{a.device.initiations_sent - sent}; ping median "
              f"{statistics.median(ordered):.2f} p99 "
              f"{ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]:.2f} max "
              f"{ordered[-1]:.2f} ms ({len(ordered)} pings)")
        print_passes(times, zero)
        print(f"steps > {times.long_ms:g} ms: {len(times.long)}")
        for ms, name, initiations, collections in times.long:
            print(f"  {ms:6.2f} ms  {name:<16} initiations {initiations:3d}  "
                  f"collections {collections}")
        waits(times, pings, zero)
        nursery.cancel_scope.cancel()


def print_passes(times: NamedSteps, zero: float, shown: int = 40) -> None:
    """The loop passes' CPU, and each pass over ``times.long_ms`` with its tasks."""
    passes = sorted(times.passes)
    print(f"loop passes {len(passes)}: p99 {passes[int(len(passes) * 0.99)]:.2f} max "
          f"{passes[-1]:.2f} ms CPU, over 1 ms {sum(p > 1 for p in passes)}, over 2 ms "
          f"{sum(p > 2 for p in passes)}")
    for at, ms, tasks in times.long_passes[:shown]:
        print(f"  pass at {at - zero:6.3f} s {ms:5.2f} ms: " + ", ".join(
            f"{name} {cpu:.2f}" for name, cpu in sorted(tasks.items(), key=lambda t: -t[1])))


def waits(times: NamedSteps, pings: Pings, zero: float) -> None:
    """The slowest pings, each with the CPU of every task that ran while it waited."""
    names = {number: name for name, number in times.name_ids.items()}
    for sent, ms in sorted(zip(pings.sent, pings.ms, strict=True), key=lambda p: -p[1])[:5]:
        end = sent + ms / 1000
        spent: dict[str, list[float]] = {}
        for at, cpu, name in zip(times.starts, times.cpus, times.names, strict=True):
            if sent <= at < end:
                entry = spent.setdefault(names[name], [0.0, 0])
                entry[0] += cpu
                entry[1] += 1
        busiest = sorted(spent.items(), key=lambda item: -item[1][0])[:6]
        print(f"ping at {sent - zero:5.3f} s: {ms:5.2f} ms; ran: " + ", ".join(
            f"{name} {cpu:.2f} ms/{count}" for name, (cpu, count) in busiest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--mesh", type=int, metavar="N",
                        help="bench/control's mesh case with N new peers instead")
    parser.add_argument("--long", type=float, default=2.0, metavar="MS",
                        help="show every loop pass and step over MS ms of CPU (2)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    times = NamedSteps(args.long)
    if args.mesh:
        trio.run(mesh, args.mesh, args.seconds, times, instruments=[times])
    else:
        trio.run(run, args.peers, args.seconds, times, instruments=[times])


if __name__ == "__main__":
    main()
