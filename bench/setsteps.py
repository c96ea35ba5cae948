"""The longest steps of big control operations on a running ``Daemon``, in process.

A ``Daemon`` on in-memory ports (no root, no network) gets one peer with N allowed IPs
(``configure``, as the UAPI applies a set), is read whole (``get_pieces``, as ``get=1``),
and loses the peer again; a trio Instrument takes the thread CPU of every task step, so
the figures hold on a loaded machine where wall-clock time does not. Also the CPU of one
``AllowedIPs.lookup`` (the data path's) against a table of one prefix and of N.

    bench/setsteps                  # 1,000,000 /32s, then 130,000
    bench/setsteps --sizes 300000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import timeit

import trio

from uspan.daemon.daemon import Daemon
from uspan.daemon.memory import MemoryNetwork, MemoryTun
from uspan.wg.allowedips import AllowedIPs
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.crypto import clamp, public_key

BASE = 10 << 24  # 10.0.0.0


class StepTimes(trio.abc.Instrument):
    """Thread CPU of each task step, in ms."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._start = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._start = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps.append((time.thread_time() - self._start) * 1000)


def hosts(count: int) -> list[int]:
    """``count`` consecutive /32 prefixes from 10.0.0.0 (as ``prefix.parse`` makes them)."""
    tag_bits = 32 << 33
    return [(BASE + i) | tag_bits for i in range(count)]


def report(name: str, steps: list[float], cpu: float) -> None:
    ordered = sorted(steps)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"{name:<16} CPU {cpu * 1000:7.0f} ms  steps {len(steps):6d}  "
          f"p50 {statistics.median(ordered):.2f}  p99 {p99:.2f}  max {ordered[-1]:.2f} ms  "
          f"top3 {', '.join(f'{s:.1f}' for s in ordered[-3:][::-1])}")


async def phases(count: int, times: StepTimes) -> None:
    daemon = Daemon(MemoryTun(), MemoryNetwork().bind("192.0.2.1", 51820))
    daemon.set(DeviceChange(private_key=clamp(os.urandom(32))))
    key = public_key(clamp(os.urandom(32)))
    prefixes = hosts(count)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        for name, work in (
            ("set", lambda: daemon.configure(DeviceChange(
                peers=[PeerChange(public_key=key, allowed_ips=prefixes)]))),
            ("get", daemon.get_pieces),
            ("remove peer", lambda: daemon.configure(DeviceChange(
                peers=[PeerChange(public_key=key, remove=True)]))),
        ):
            await trio.sleep(0.05)
            times.steps.clear()
            cpu = time.process_time()
            await work()
            cpu = time.process_time() - cpu
            report(f"{name} {count // 1000}k", times.steps, cpu)
        daemon.stop("done")
        nursery.cancel_scope.cancel()


def lookup_ns(count: int) -> None:
    for size in (1, count):
        table: AllowedIPs[object] = AllowedIPs()
        peer = object()
        every = hosts(size)
        for start in range(0, size, 256):
            table.insert(every[start:start + 256], peer)
        best = min(timeit.repeat("lookup(address)", number=100_000, repeat=7, globals={
            "lookup": table.lookup, "address": (BASE + size // 2).to_bytes(4, "big")}))
        print(f"lookup, table of {size:>9,}: {best * 1e4:.0f} ns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,130000")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    for count in map(int, args.sizes.split(",")):
        times = StepTimes()
        trio.run(phases, count, times, instruments=[times])
    lookup_ns(int(args.sizes.split(",")[0]))


if __name__ == "__main__":
    main()
