"""Single-stream TCP through a pair of plane threads against a pair of current
wireguard-go, alternated within each round, same namespaces, addresses and MTUs as
``bench/throughput``:

- ``wgo``: a current wireguard-go pair (its offloads on);
- ``plane``: two ``tests/system/planeside.py`` ends (the handshake in the Python core,
  then uspan/plane/_plane.c's thread carries the session), offloads off;
- ``planeo``: the same with offloads (vnet-header TUN with TSO/USO, UDP_SEGMENT, UDP_GRO).

Each trial runs iperf3 for SECONDS A->B and then B->A and reports Mbit/s and the CPU
seconds both ends spent per GB delivered (``bench.common.cpu_seconds``: every thread of
each end). Prints every trial with the load average at its start, then the median of
each kind and its ratio to ``wgo``'s median.

    bench/planetcp [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cpu_seconds, iperf3, load_average
from bench.throughput import INNER, IPERF_PORT, OUTER, OUTER_MTU, WG_PORTS, _tunnel
from uspan.testbed import Lab, Namespace, genkey

WGO = "/work/anchors/wireguard-go-current"
KINDS = ("wgo", "plane", "planeo")
ROOT = Path(__file__).resolve().parent.parent
METRICS = ("ab_mbps", "ba_mbps", "ab_cpu_s_per_gb", "ba_cpu_s_per_gb")


def _ready(side: subprocess.Popen[bytes], timeout: float) -> None:
    assert side.stdout is not None
    ready, _, _ = select.select([side.stdout], [], [], timeout)
    line = side.stdout.readline().decode().strip() if ready else ""
    if line != "ready":
        raise RuntimeError(f"planeside: {line!r} (exit {side.poll()})")


def _plane_pair(lab: Lab, offloads: bool) -> tuple[Namespace, list[subprocess.Popen[bytes]]]:
    """Namespaces a and b, each with a planeside end (B responds, A initiates)."""
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.veth(a, b, [f"{OUTER[0]}/24"], [f"{OUTER[1]}/24"])
    a.ip("link", "set", link.a_dev, "mtu", str(OUTER_MTU))
    b.ip("link", "set", link.b_dev, "mtu", str(OUTER_MTU))
    keys = [genkey(), genkey()]
    sides, tuns = [], []
    for i, (ns, extra) in enumerate(((b, ["--respond"]), (a, []))):
        me, other = (1, 0) if ns is b else (0, 1)
        tun = lab.interface_name()
        argv = [sys.executable, "-m", "tests.system.planeside", "--tun", tun,
                "--port", str(WG_PORTS[me]),
                "--private-key-file", str(lab.secret_file(keys[me].private)),
                "--peer-public", keys[other].public,
                "--peer-endpoint", f"{OUTER[other]}:{WG_PORTS[other]}",
                "--peer-allowed", f"{INNER[other]}/32", *extra]
        if offloads:
            argv.append("--offloads")
        sides.append(ns.spawn(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}))
        tuns.append((ns, tun, INNER[me]))
        if i == 0:
            b.wait_listening(WG_PORTS[1], udp=True)
    for side in sides:
        _ready(side, 30)
    for ns, tun, inner in tuns:
        ns.ip("addr", "add", f"{inner}/24", "dev", tun)
        ns.ip("link", "set", tun, "up")
    return a, sides


def trial(kind: str, seconds: float) -> dict[str, float]:
    row: dict[str, float] = {}
    with Lab("ptc") as lab:
        sides: list[subprocess.Popen[bytes]] = []
        if kind == "wgo":
            a, wa, wb = _tunnel(lab, WGO, WGO)
            pids = [wa.process.pid, wb.process.pid]
        else:
            a, sides = _plane_pair(lab, kind == "planeo")
            pids = [side.pid for side in sides]
        ping = a.run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", INNER[1], check=False)
        if ping.returncode != 0:
            raise RuntimeError(f"{kind}: no ping through the tunnel")
        b = lab.namespaces[1]
        row["load1"] = float(load_average().split()[0])
        for key, extra in (("ab", []), ("ba", ["-R"])):
            server = b.spawn("iperf3", "-s", "-1", "-p", str(IPERF_PORT))
            b.wait_listening(IPERF_PORT)
            before = sum(cpu_seconds(pid) for pid in pids)
            end = iperf3(a, ["-c", INNER[1], "-p", str(IPERF_PORT), "-t", f"{seconds:g}",
                             *extra], seconds)
            after = sum(cpu_seconds(pid) for pid in pids)
            server.wait(10)
            moved = float(end["sum_received"]["bytes"])
            row[f"{key}_mbps"] = moved * 8 / 1e6 / seconds
            row[f"{key}_cpu_s_per_gb"] = (after - before) / (moved / 1e9)
        for side in sides:
            assert side.stdin is not None and side.stdout is not None
            side.stdin.close()
            counts = json.loads(side.stdout.readline())
            side.wait(10)
            print("    " + ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {load_average()}")
    rows: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    for round_ in range(1, args.rounds + 1):
        for kind in KINDS:
            row = trial(kind, args.seconds)
            rows[kind].append(row)
            print(f"round {round_} {kind}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()),
                  flush=True)
    print(f"end {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {load_average()}")
    print("median over rounds (ratio to wgo's median)")
    print("metric | " + " | ".join(KINDS))
    for metric in METRICS:
        medians = {kind: statistics.median(r[metric] for r in rows[kind]) for kind in KINDS}
        print(f"{metric} | " + " | ".join(
            f"{medians[k]:.1f} ({medians[k] / medians['wgo']:.2f}x)" for k in KINDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
