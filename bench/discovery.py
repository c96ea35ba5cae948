"""Discovery service benchmark: update rate, watch fan-out latency, memory, per backend.

For each backend (memory, memory with --state-file, etcd with two replicas) a fresh
service is started on loopback, its rate limit lifted. Then, from this process:
1. populate: CLUSTERS clients (one per cluster) each write AFFILIATES affiliates (sealed
   data of DATA bytes, 2 endpoints, TTL 600 s), concurrently: updates/s = total / time;
2. fan-out: WATCHERS clients watch cluster 0 (each its own connection and snapshot),
   then PROBES updates are written one at a time; latency = from just before the update
   is sent until the last of the watchers has it; p50 and p99 (nearest rank);
3. memory: the peak RSS (VmHWM) of the service process (both replicas and etcd for etcd).
Everything it starts is stopped by PID; it sends traffic to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.common import BenchError, Spread, peak_rss_mib, percentile, table
from bench.common import machine as machine_info
from uspan.discovery.client import DiscoveryClient, Updated
from uspan.discovery.procs import ETCD, EtcdProcess, ServiceProcess

SECRET = os.urandom(32)
NO_LIMIT = ("--rate-limit", "1000000/1000000")
PROBE = "node-00000"  # an existing affiliate: a full cluster takes no new one


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/discovery", description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--affiliates", type=int, default=1024, help="per cluster")
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--probes", type=int, default=200, help="updates timed for fan-out")
    parser.add_argument("--data", type=int, default=256, help="plaintext bytes per affiliate")
    parser.add_argument("--backends", default="memory,state-file,etcd")
    parser.add_argument("--rounds", type=int, default=1, help="each backend once per round")
    parser.add_argument("--markdown", type=Path, help="write the results as markdown here")
    return parser.parse_args()


def client(address: str, cluster: int) -> DiscoveryClient:
    return DiscoveryClient([address], f"bench-cluster-{cluster}", SECRET, attempts=3)


async def populate(addresses: list[str], args: argparse.Namespace) -> float:
    data = os.urandom(args.data)

    async def fill(cluster: int) -> None:
        async with client(addresses[cluster % len(addresses)], cluster) as c:
            for i in range(args.affiliates):
                endpoints = [("192.0.2.1", 1024 + i), ("2001:db8::1", 1024 + i)]
                await c.update(f"node-{i:05d}", data, endpoints, 600)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for cluster in range(args.clusters):
            nursery.start_soon(fill, cluster)
    return args.clusters * args.affiliates / (time.perf_counter() - start)


async def fan_out(writer_address: str, watch_addresses: list[str],
                  args: argparse.Namespace) -> list[float]:  # fmt: skip
    """Latencies (s) from an update to the last watcher seeing it."""
    seen: dict[int, int] = {}
    done: dict[int, trio.Event] = {}
    ready = 0

    async def watcher(index: int, task_status: trio.TaskStatus[None]) -> None:
        nonlocal ready
        address = watch_addresses[index % len(watch_addresses)]
        async with client(address, 0) as c, c.watch() as events:
            await events.receive()  # the snapshot
            task_status.started()
            async for event in events:
                if isinstance(event, Updated) and event.affiliate.id == PROBE:
                    n = int.from_bytes(event.affiliate.data or b"\0", "big")
                    seen[n] = seen.get(n, 0) + 1
                    if seen[n] == args.watchers:
                        done[n].set()

    latencies = []
    async with trio.open_nursery() as nursery:
        for index in range(args.watchers):
            await nursery.start(watcher, index)
        async with client(writer_address, 0) as writer:
            await writer.hello()
            for n in range(1, args.probes + 1):
                done[n] = trio.Event()
                start = time.perf_counter()
                await writer.update(PROBE, n.to_bytes(4, "big"), [], 600)
                with trio.fail_after(30):
                    await done[n].wait()
                latencies.append(time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return latencies


METRICS = {  # name: (digits, what)
    "updates/s (populate)": 0,
    "fan-out p50 (ms)": 1,
    "fan-out p99 (ms)": 1,
    "service RSS at start (MiB)": 1,
    "service peak RSS (MiB)": 1,
    "etcd peak RSS (MiB)": 1,
}


def measure(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """One round of one backend: the METRICS (RSS summed over both replicas for etcd)."""
    etcd = None
    services: list[ServiceProcess] = []
    try:
        if backend == "etcd":
            etcd = EtcdProcess(workdir).start()
            for _ in range(2):
                services.append(ServiceProcess(workdir, "--etcd", etcd.url, *NO_LIMIT).start())
        else:
            flags = ["--state-file", str(workdir / "state")] if backend == "state-file" else []
            services.append(ServiceProcess(workdir, *flags, *NO_LIMIT).start())
        addresses = [s.address for s in services]
        start_rss = sum(peak_rss_mib(s.pid) for s in services)
        rate = trio.run(populate, addresses, args)
        # with two replicas: write through the first, watch through both
        latencies = sorted(trio.run(fan_out, addresses[0], addresses, args))
        result = {
            "updates/s (populate)": rate,
            "fan-out p50 (ms)": percentile(latencies, 0.5) * 1000,
            "fan-out p99 (ms)": percentile(latencies, 0.99) * 1000,
            "service RSS at start (MiB)": start_rss,
            "service peak RSS (MiB)": sum(peak_rss_mib(s.pid) for s in services),
        }
        if etcd is not None:
            result["etcd peak RSS (MiB)"] = peak_rss_mib(etcd.pid)
        return result
    finally:
        for service in services:
            service.stop()
        if etcd is not None:
            etcd.stop()


def main() -> int:
    args = options()
    backends = [b for b in args.backends.split(",") if b]
    if "etcd" in backends and not os.access(ETCD, os.X_OK):
        raise BenchError(f"{ETCD} is missing (apt-get install etcd-server), or drop etcd")
    results: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    for round_ in range(1, args.rounds + 1):
        for backend in backends:
            print(f"round {round_}, {backend}: running...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="uspan-bench-discovery-") as workdir:
                results[backend].append(measure(backend, args, Path(workdir)))
            print(f"  {results[backend][-1]}", file=sys.stderr, flush=True)
    rows = []
    for metric, digits in METRICS.items():
        cells = []
        for backend in backends:
            spread = Spread.of([r.get(metric) for r in results[backend]])
            cells.append(spread.format(digits) if spread else "-")
        rows.append([metric, *cells])
    header = ["metric", *backends]
    print(table(header, rows))
    if args.markdown:
        info = machine_info({})
        lines = [f"- {k}: {v}" for k, v in info.items() if k not in ("iperf3", "wg")]
        settings = (
            f"- {args.clusters} clusters x {args.affiliates} affiliates, {args.data}-byte data "
            f"(sealed: {args.data + 28} bytes) and 2 endpoints each, TTL 600 s\n"
            f"- fan-out: {args.watchers} watchers of one cluster, {args.probes} probe updates "
            "sent one at a time\n"
            f"- rounds: {args.rounds}; cells are median [min-max] over rounds; etcd: two "
            "service replicas (RSS summed) and one etcd member"
        )
        text = "\n".join(lines) + "\n\n" + settings + "\n\n" + table(header, rows, True) + "\n"
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
