"""The longest steps of big control operations on a running ``Daemon``, in process.

A ``Daemon`` on in-memory ports (no root, no network) serves UAPI requests over a
socketpair, as ``uspan-wg`` serves ``wg``: a set of one new peer with N allowed IPs, two
gets of it (the first renders the text, the second finds it kept), a set of 100,000
prefixes for a second peer, then one of 100,000 removals and 100,000 adds on it (bench/
control's ``removes``), and the first peer's removal. A trio Instrument takes the thread
CPU of every task step, so the figures hold on a loaded machine where wall-clock time
does not: per operation the steps over 2 ms, and the longest with the uspan code where
they began and ended and the cycle collections they ran. Also the CPU of one
``AllowedIPs.lookup`` (the data path's) against a table of one prefix and of N.

    bench/setsteps                  # 1,000,000 /32s, then 130,000
    bench/setsteps --sizes 300000
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import timeit
from typing import Any

import trio

from uspan.daemon.daemon import Daemon
from uspan.daemon.memory import MemoryNetwork, MemoryTun
from uspan.daemon.uapi_server import handle
from uspan.wg.allowedips import AllowedIPs
from uspan.wg.config import DeviceChange
from uspan.wg.crypto import clamp, public_key

BASE = 10 << 24  # 10.0.0.0
LONG = 2.0  # ms: a step longer than this is listed


class StepTimes(trio.abc.Instrument):
    """Thread CPU of each task step, in ms."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._start = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._start = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps.append((time.thread_time() - self._start) * 1000)


class TracedSteps(StepTimes):
    """StepTimes of the daemon's tasks (not of ``HARNESS``, which stands for ``wg``), and
    for each step over LONG ms: its task, where in uspan it resumed and where it stopped,
    and the cycle collections it ran (generation, ms)."""

    HARNESS = frozenset({"phases", "send_all"})

    def __init__(self) -> None:
        super().__init__()
        self.long: list[tuple[float, str, str, str, list[tuple[int, float]]]] = []
        self._resumed = ""
        self._collections: list[tuple[int, float]] = []
        self._collecting = 0.0
        gc.callbacks.append(self._collection)

    def _collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._collecting = time.thread_time()
        else:
            ms = (time.thread_time() - self._collecting) * 1000
            self._collections.append((info["generation"], ms))

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._resumed = where(task)
        self._collections = []
        super().before_task_step(task)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        name = task.name.rpartition(".")[2]
        if name in self.HARNESS:
            return
        super().after_task_step(task)
        if self.steps[-1] > LONG:
            self.long.append((self.steps[-1], name, self._resumed, where(task),
                              self._collections))


def where(task: trio.lowlevel.Task) -> str:
    """The innermost uspan frames a task is suspended in (file:line, outermost first)."""
    frames = []
    awaited: Any = task.coro
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None and "/uspan/" in frame.f_code.co_filename:
            frames.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return " > ".join(frames[-3:]) or "-"


def hosts(count: int) -> list[int]:
    """``count`` consecutive /32 prefixes from 10.0.0.0 (as ``prefix.parse`` makes them)."""
    tag_bits = 32 << 33
    return [(BASE + i) | tag_bits for i in range(count)]


def allowed_lines(count: int, offset: int = 0, sign: str = "") -> str:
    return "".join(f"allowed_ip={sign}{11 + (i >> 24)}.{i >> 16 & 255}.{i >> 8 & 255}."
                   f"{i & 255}/32\n" for i in range(offset, offset + count))


def report(name: str, steps: list[float], cpu: float) -> None:
    ordered = sorted(steps)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"{name:<16} CPU {cpu * 1000:7.0f} ms  steps {len(steps):6d}  "
          f"p50 {statistics.median(ordered):.2f}  p99 {p99:.2f}  max {ordered[-1]:.2f} ms  "
          f"over {LONG:.0f} ms {sum(s > LONG for s in steps)}")


async def ask(stream: trio.SocketStream, request: bytes) -> None:
    """Send a request and read its whole reply (as ``wg`` does, from another task)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, request)
        reply = bytearray()
        while not reply.endswith(b"\n\n"):
            data = await stream.receive_some(1 << 20)
            if not data:
                raise RuntimeError("the UAPI connection closed")
            reply += data
    if not reply.endswith(b"errno=0\n\n"):
        raise RuntimeError(f"the request failed: {bytes(reply[-40:])!r}")


async def phases(count: int, times: TracedSteps) -> None:
    daemon = Daemon(MemoryTun(), MemoryNetwork().bind("192.0.2.1", 51820))
    daemon.set(DeviceChange(private_key=clamp(os.urandom(32))))
    big, other = (public_key(clamp(os.urandom(32))).hex() for _ in range(2))
    requests = [
        (f"set {count // 1000}k", f"set=1\npublic_key={big}\n{allowed_lines(count)}\n"),
        ("get (render)", "get=1\n\n"),
        ("get (kept)", "get=1\n\n"),
        ("set 100k", f"set=1\npublic_key={other}\n{allowed_lines(100_000, 1 << 24)}\n"),
        ("removes 100k", f"set=1\npublic_key={other}\n"
         f"{allowed_lines(100_000, (1 << 24) + 100_000)}"
         f"{allowed_lines(100_000, 1 << 24, '-')}\n"),
        ("remove peer", f"set=1\npublic_key={big}\nremove=true\n\n"),
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        for name, text in requests:
            request = text.encode()
            await trio.sleep(0.05)
            client, server = trio.socket.socketpair()
            nursery.start_soon(handle, trio.SocketStream(server), daemon)
            times.steps.clear()
            times.long.clear()
            cpu = time.process_time()
            async with trio.SocketStream(client) as stream:
                await ask(stream, request)
            cpu = time.process_time() - cpu
            report(name, times.steps, cpu)
            for ms, task, resumed, stopped, collections in sorted(times.long)[::-1][:4]:
                print(f"    {ms:5.2f} ms {task}: {resumed} -> {stopped}"
                      + "".join(f"; collection gen {g} {c:.1f} ms" for g, c in collections))
        daemon.stop("done")


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
        times = TracedSteps()
        trio.run(phases, count, times, instruments=[times])
    lookup_ns(int(args.sizes.split(",")[0]))


if __name__ == "__main__":
    main()
