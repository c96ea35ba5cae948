"""Side-by-side data-path benchmark: uspan-wg against wireguard-go through a real tunnel.

Every trial builds namespaces ``a`` and ``b`` joined by a veth (MTU 1500), starts the two
daemons of one pair (``A-B``: A in namespace a, the iperf3 client side; B in b, the
server side), configures a tunnel of MTU 1420 and measures: ping RTT, single- and
4-stream TCP each direction, UDP at a fixed offered rate each direction, daemon CPU per GB
and peak RSS. Pairs alternate within each round so slow drifts of the machine hit all of
them alike. Everything is torn down after each trial, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    MEASUREMENT_ERRORS,
    BenchError,
    Spread,
    add_common_arguments,
    cpu_seconds,
    iperf3,
    load_average,
    machine_lines,
    peak_rss_mib,
    percentile,
    publish,
    ratios,
    report_failure,
    run_rounds,
    start_benchmark,
    table,
)
from uspan.testbed import Lab, Namespace, PeerConfig, WireGuard

OUTER = ("192.0.2.1", "192.0.2.2")
INNER = ("10.77.0.1", "10.77.0.2")
WG_PORTS = (51820, 51821)
IPERF_PORT = 5201
OUTER_MTU, TUNNEL_MTU = 1500, 1420
UDP_PAYLOAD = TUNNEL_MTU - 20 - 8  # one datagram fills the tunnel MTU (IPv4)
GB = 1e9


def all_pairs(wgo_names: list[str]) -> list[str]:
    """``uspan-uspan``, then per wireguard-go build (baseline first) the mixed pair and
    its own pair: ``uspan-wgoX``, ``wgoX-wgoX``."""
    pairs = ["uspan-uspan"]
    for name in wgo_names:
        pairs += [f"uspan-{name}", f"{name}-{name}"]
    return pairs


@dataclass(frozen=True, slots=True)
class Metric:
    """A row of the result table; ``ratio`` says whether uspan/wgo ratios make sense."""

    key: str
    label: str
    digits: int
    ratio: bool = True


def _metrics() -> list[Metric]:
    rows = [
        Metric("ping_median", "ping RTT median (ms)", 3),
        Metric("ping_p99", "ping RTT p99 (ms)", 3),
        Metric("ping_loss", "ping loss (%)", 1, ratio=False),
        Metric("ping_cpu_A", "ping CPU per ping, A (us)", 0),
        Metric("ping_cpu_B", "ping CPU per ping, B (us)", 0),
    ]
    for test in TESTS:
        rows.append(Metric(f"{test.key}_mbps", f"{test.label} (Mbit/s)", 0))
        if test.udp:
            rows.append(Metric(f"{test.key}_loss", f"{test.label} loss (%)", 2, ratio=False))
        for side in "AB":
            role = "sender" if (side == "A") == test.forward else "receiver"
            rows.append(
                Metric(f"{test.key}_cpu_{side}", f"{test.label} CPU s/GB, {side} ({role})", 2)
            )
    rows += [Metric("rss_A", "peak RSS A (MiB)", 1), Metric("rss_B", "peak RSS B (MiB)", 1)]
    return rows


@dataclass(frozen=True, slots=True)
class IperfTest:
    key: str
    label: str
    forward: bool  # A sends to B (else iperf3 -R: B sends to A)
    streams: int = 1
    udp: bool = False

    def argv(self, seconds: float, udp_rate: str) -> list[str]:
        argv = [
            "-c",
            INNER[1],
            "-p",
            str(IPERF_PORT),
            "-t",
            f"{seconds:g}",
            "--connect-timeout",
            "5000",
        ]
        if not self.forward:
            argv.append("-R")
        if self.streams > 1:
            argv += ["-P", str(self.streams)]
        if self.udp:
            argv += ["-u", "-b", udp_rate, "-l", str(UDP_PAYLOAD)]
        return argv


TESTS = (
    IperfTest("tcp1_ab", "TCP 1 stream A->B", True),
    IperfTest("tcp1_ba", "TCP 1 stream B->A", False),
    IperfTest("tcp4_ab", "TCP 4 streams A->B", True, streams=4),
    IperfTest("tcp4_ba", "TCP 4 streams B->A", False, streams=4),
    IperfTest("udp_ab", "UDP A->B", True, udp=True),
    IperfTest("udp_ba", "UDP B->A", False, udp=True),
)
METRICS = _metrics()


@dataclass(slots=True)
class Results:
    """results[pair][metric key] is one value (or None) per round."""

    rounds: int
    values: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)

    def record(self, pair: str, round_: int, key: str, value: float | None) -> None:
        per_metric = self.values.setdefault(pair, {})
        per_metric.setdefault(key, [None] * self.rounds)[round_] = value

    def series(self, pair: str, key: str) -> list[float | None]:
        return self.values.get(pair, {}).get(key, [None] * self.rounds)


# --- one trial --------------------------------------------------------------------------


def _tunnel(lab: Lab, a_prog: str, b_prog: str) -> tuple[Namespace, WireGuard, WireGuard]:
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.veth(a, b, [f"{OUTER[0]}/24"], [f"{OUTER[1]}/24"])
    a.ip("link", "set", link.a_dev, "mtu", str(OUTER_MTU))
    b.ip("link", "set", link.b_dev, "mtu", str(OUTER_MTU))
    wa, wb = lab.start_wireguard(a, a_prog), lab.start_wireguard(b, b_prog)
    wa.configure(
        listen_port=WG_PORTS[0],
        peers=[PeerConfig(wb.keys.public, [f"{INNER[1]}/32"], f"{OUTER[1]}:{WG_PORTS[1]}")],
    )
    wb.configure(
        listen_port=WG_PORTS[1],
        peers=[PeerConfig(wa.keys.public, [f"{INNER[0]}/32"], f"{OUTER[0]}:{WG_PORTS[0]}")],
    )
    for wg, inner in ((wa, INNER[0]), (wb, INNER[1])):
        wg.link_ns.ip("link", "set", wg.name, "mtu", str(TUNNEL_MTU))
        wg.add_address(f"{inner}/24")
        wg.up()
    warm = a.run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", INNER[1], check=False)
    if warm.returncode != 0:
        raise BenchError(f"no ping through the tunnel:\n{lab.daemon_logs()}")
    return a, wa, wb


def ping_stats(ns: Namespace, count: int) -> dict[str, float | None]:
    """Median and p99 RTT (ms) and loss (%) of ``count`` pings at 10 ms intervals."""
    done = ns.run(
        "ping",
        "-n",
        "-c",
        str(count),
        "-i",
        "0.01",
        "-W",
        "1",
        INNER[1],
        timeout=count * 0.01 + 15,
        check=False,
    )
    rtts = sorted(
        float(word[5:])
        for line in done.stdout.splitlines()
        for word in line.split()
        if word.startswith("time=")
    )
    loss = 100.0 * (count - len(rtts)) / count
    if not rtts:
        return {"ping_median": None, "ping_p99": None, "ping_loss": loss}
    return {
        "ping_median": percentile(rtts, 0.5),
        "ping_p99": percentile(rtts, 0.99),
        "ping_loss": loss,
    }


def _iperf(ns: Namespace, test: IperfTest, seconds: float, udp_rate: str) -> tuple[float, float]:
    """(bytes that arrived, loss % or 0) of one iperf3 run."""
    end = iperf3(ns, test.argv(seconds, udp_rate), seconds)
    if test.udp:
        total = end["sum"]
        arrived = (total["packets"] - total["lost_packets"]) * UDP_PAYLOAD
        return float(arrived), float(total["lost_percent"])
    return float(end["sum_received"]["bytes"]), 0.0


def run_trial(args: argparse.Namespace, pair: str, round_: int, results: Results) -> None:
    a_name, b_name = pair.split("-")

    def record(key: str, value: float | None) -> None:
        results.record(pair, round_, key, value)

    with Lab("bt") as lab:
        a, wa, wb = _tunnel(lab, args.programs[a_name], args.programs[b_name])
        before = (cpu_seconds(wa.process.pid), cpu_seconds(wb.process.pid))
        for key, value in ping_stats(a, args.pings).items():
            record(key, value)
        after = (cpu_seconds(wa.process.pid), cpu_seconds(wb.process.pid))
        for side, b0, b1 in zip("AB", before, after, strict=True):
            record(f"ping_cpu_{side}", (b1 - b0) / args.pings * 1e6)
        tests = () if args.ping_only else TESTS
        if tests:
            server = wb.ns.spawn("iperf3", "-s", "-p", str(IPERF_PORT))
            wb.ns.wait_listening(IPERF_PORT)
        for test in tests:
            if server.poll() is not None:
                server = wb.ns.spawn("iperf3", "-s", "-p", str(IPERF_PORT))
                wb.ns.wait_listening(IPERF_PORT)
            before = (cpu_seconds(wa.process.pid), cpu_seconds(wb.process.pid))
            started = time.monotonic()
            try:
                moved, loss = _iperf(a, test, args.seconds, args.udp_rate)
            except MEASUREMENT_ERRORS as e:
                report_failure(f"{pair} round {round_ + 1} {test.label}", e)
                continue
            elapsed = time.monotonic() - started
            after = (cpu_seconds(wa.process.pid), cpu_seconds(wb.process.pid))
            record(f"{test.key}_mbps", moved * 8 / 1e6 / args.seconds)
            if test.udp:
                record(f"{test.key}_loss", loss)
            for side, b0, b1 in zip("AB", before, after, strict=True):
                record(f"{test.key}_cpu_{side}", (b1 - b0) / (moved / GB) if moved else None)
            print(
                f"    {test.label}: {moved * 8 / 1e6 / args.seconds:.0f} Mbit/s"
                f"{f', loss {loss:.2f}%' if test.udp else ''} ({elapsed:.1f}s)"
            )
        record("rss_A", peak_rss_mib(wa.process.pid))
        record("rss_B", peak_rss_mib(wb.process.pid))
        if not (wa.alive() and wb.alive()):
            raise BenchError(f"a daemon died during the trial:\n{lab.daemon_logs()}")


# --- report -----------------------------------------------------------------------------


def _pair_title(pair: str) -> str:
    a, b = pair.split("-")
    return f"A={a}, B={b}"


def render(results: Results, info: dict[str, str], settings: dict[str, str], markdown: bool,
           order: list[str], baseline: str) -> str:
    pairs = [p for p in order if p in results.values]
    header = ["metric", *(_pair_title(p) for p in pairs)]
    rows = []
    measured = [m for m in METRICS if any(results.series(p, m.key) != [None] * results.rounds
                                          for p in pairs)]
    for metric in measured:
        cells = []
        for pair in pairs:
            spread = Spread.of(results.series(pair, metric.key))
            cells.append(spread.format(metric.digits) if spread else "n/a")
        rows.append([metric.label, *cells])
    others = [p for p in pairs if p != baseline]
    ratio_rows = []
    for metric in (m for m in measured if m.ratio):
        cells = []
        for pair in others:
            spread = ratios(results.series(pair, metric.key), results.series(baseline, metric.key))
            cells.append(spread.format(2) if spread else "n/a")
        ratio_rows.append([metric.label, *cells])
    heading = "## " if markdown else ""
    parts = [
        f"{heading}Machine",
        machine_lines(info, markdown),
        f"{heading}Settings",
        machine_lines(settings, markdown),
        f"{heading}Results: median [min-max] over rounds",
        table(header, rows, markdown),
    ]
    if others and baseline in pairs:
        parts += [
            f"{heading}Ratios to {baseline}, per round: median [min-max]",
            "Throughput: higher is better for uspan; RTT, CPU s/GB and RSS: lower is better.",
            table(["metric", *(f"{p} / {baseline}" for p in others)], ratio_rows, markdown),
        ]
    return "\n\n".join(parts) + "\n"


# --- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/throughput",
        description="Throughput, latency, CPU and memory of uspan-wg vs wireguard-go "
        "(needs root; all traffic stays in namespaces it creates).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all pairs (3)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per iperf3 test (4)")
    parser.add_argument("--udp-rate", default="200M", help="UDP offered rate, iperf3 -b (200M)")
    parser.add_argument("--pings", type=int, default=200, help="pings at 10 ms (200)")
    parser.add_argument("--ping-only", action="store_true", help="only the ping rows")
    parser.add_argument(
        "--pairs", help="comma-separated subset of uspan-uspan, uspan-wgoX, wgoX-wgoX (X: "
        "each wireguard-go build's version date, e.g. wgo20250522; default: all)"
    )
    add_common_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write every round's raw values here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.pings < 1:
        parser.error("--rounds, --seconds and --pings must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = start_benchmark("throughput", args, ["ip", "wg", "iperf3", "ping", "ss"])
    if info is None:
        return 2
    order = all_pairs(args.wgo_names)
    baseline = order[2]
    pairs = order if args.pairs is None else [
        p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in order]
    if unknown:
        print(f"bench/throughput: --pairs: unknown {', '.join(unknown)}; choose from "
              f"{', '.join(order)}", file=sys.stderr)
        return 2
    settings = {
        "rounds": str(args.rounds),
        "seconds per iperf3 test": f"{args.seconds:g}",
        "UDP offered rate": f"{args.udp_rate}bit/s, {UDP_PAYLOAD}-byte datagrams",
        "pings": f"{args.pings} at 10 ms intervals",
        "MTU": f"veth {OUTER_MTU}, tunnel {TUNNEL_MTU}; IPv4 inside and outside",
        "pairs": ", ".join(pairs) + " (A runs the iperf3 client, B the server)",
        "baseline of the ratios": baseline,
    }
    if args.ping_only:
        settings["iperf3 tests"] = "none (--ping-only)"
    results = Results(args.rounds)
    failures = run_rounds(args.rounds, [
        (pair, functools.partial(run_trial, args, pair, results=results))
        for pair in pairs
    ])
    settings["load average (1/5/15 min) at the end"] = load_average()
    publish("throughput", lambda md: render(results, info, settings, md, order, baseline),
            args.markdown)
    if args.json:
        raw = {"machine": info, "settings": settings, "values": results.values}
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
