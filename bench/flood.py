"""Handshake flood benchmark: how soon a legitimate peer's first ping gets through a
responder that is flooded with initiations, for uspan-wg and each wireguard-go build
(``--wgo PATH``, repeatable; by default the current release and Debian's).

Each trial builds two namespaces joined by a veth: ``a`` holds the attacker and a
legitimate peer (Debian's wireguard-go), ``r`` the responder under test. The attacker
(``uspan.testbed.flood``, one Python process) sends initiations with a valid mac1 for
``--seconds`` as fast as it can, either from ``--ports`` sockets of a's address
(``ports``) or from random source addresses of a /16 routed to ``a`` (``spoof``).
``--legit-after`` seconds in, the peer starts pinging the responder's inner address
every 0.2 s; its first packet starts its first handshake. ``--endpoints`` says whether
every responder is configured with the peer's endpoint (``known``, as in a KubeSpan
mesh, where every peer has one) or learns it from the handshake (``unknown``), or both
are run. Measured: time from the first ping to the first reply, the responder's CPU
seconds over the flood and its peak RSS, the attacker's rate, and how long after the
flood the first reply came when none came during it. ``--tunnel`` measures instead what
a flood costs a tunnel that is already up: one TCP stream from the peer to the responder
(iperf3), without a flood and then during one. Responders alternate round by round, so
the machine's drift hits all alike; the load average is reported with each round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.common import (
    BenchError,
    Spread,
    add_common_arguments,
    cpu_seconds,
    iperf3,
    machine_lines,
    peak_rss_mib,
    publish,
    run_rounds,
    start_benchmark,
    table,
    uspan_tree,
)
from uspan.testbed import Lab, Namespace, PeerConfig, WireGuard
from uspan.testbed.flood import ATTACKER, RESPONDER, SPOOF_RANGE, Attack, Pinger, link

OUTER = (ATTACKER, RESPONDER)
INNER = ("10.79.0.1", "10.79.0.2")
PORT = 51840
PEER_PORT = 51841  # the peer's, fixed so a responder can be told it
KINDS = ("ports", "spoof")
ENDPOINTS = ("known", "unknown")
AFTER_FLOOD = 10.0  # seconds to wait for a first reply after the flood, if none came
IPERF_PORT = 5201
SETTLE = 1.0  # with --tunnel: seconds into the flood before the flooded iperf3 run


def _pair(lab: Lab, args: argparse.Namespace, impl: str,
          known: bool) -> tuple[Namespace, Namespace, WireGuard]:
    """Namespaces ``a`` and ``r``, the responder under test in ``r`` and the peer in
    ``a``, configured and up (no handshake yet); the peer's endpoint ``known`` to the
    responder or not."""
    a, r = lab.namespace("a"), lab.namespace("r")
    link(lab, a, r)
    responder = lab.start_wireguard(r, args.programs[impl])
    peer = lab.start_wireguard(a, args.legit)
    endpoint = f"{OUTER[0]}:{PEER_PORT}" if known else None
    responder.configure(listen_port=PORT, peers=[
        PeerConfig(peer.keys.public, [f"{INNER[0]}/32"], endpoint)])
    peer.configure(listen_port=PEER_PORT, peers=[
        PeerConfig(responder.keys.public, [f"{INNER[1]}/32"], f"{OUTER[1]}:{PORT}")])
    for wg, inner in ((responder, INNER[1]), (peer, INNER[0])):
        wg.add_address(f"{inner}/24")
        wg.up()
    return a, r, responder


def _attack(args: argparse.Namespace, a: Namespace, responder: WireGuard, kind: str,
            seconds: float) -> Attack:
    return Attack(a, OUTER[1], PORT, responder.keys.public, seconds=seconds, rate=args.rate,
                  ports=args.ports, spoof=SPOOF_RANGE if kind == "spoof" else None)


def flood_trial(args: argparse.Namespace, impl: str, kind: str,
                known: bool) -> dict[str, float | None]:
    """One fresh responder, one flood, one legitimate peer (its endpoint ``known`` to the
    responder or not)."""
    with Lab("bfl") as lab:
        a, _, responder = _pair(lab, args, impl, known)
        attack = _attack(args, a, responder, kind, args.seconds)
        pid = responder.process.pid
        load = float(Path("/proc/loadavg").read_text().split()[0])
        cpu_before = cpu_seconds(pid)
        time.sleep(args.legit_after)
        pinger = Pinger(a, INNER[1])
        sent = attack.wait()
        ended, cpu_used = time.monotonic(), cpu_seconds(pid) - cpu_before
        first = pinger.first_reply()
        through = first is not None and pinger.started + first <= ended
        recovery = None if through else pinger.wait_reply(ended, AFTER_FLOOD)
        first = pinger.first_reply()
        pinger.stop()
        if not responder.alive():
            raise BenchError(f"{impl} responder died:\n{lab.daemon_logs()}")
        rss = peak_rss_mib(pid)
    return {
        "first": first,
        "through": 1.0 if through else 0.0,
        "recovery": recovery,
        "cpu": cpu_used,
        "rss": rss,
        "rate": sent / (ended - attack.started),
        "load": load,
    }


def _tcp_mbps(a: Namespace, seconds: float, pid: int) -> tuple[float, float]:
    """(Mbit/s, responder CPU seconds a second) of one TCP stream from the peer to the
    responder through the tunnel."""
    cpu, started = cpu_seconds(pid), time.monotonic()
    end = iperf3(a, ["-c", INNER[1], "-p", str(IPERF_PORT), "-t", f"{seconds:g}"], seconds)
    used = (cpu_seconds(pid) - cpu) / (time.monotonic() - started)
    received = end["sum_received"]
    return float(received["bytes"]) * 8 / 1e6 / float(received["seconds"]), used


def tunnel_trial(args: argparse.Namespace, impl: str, kind: str,
                 known: bool) -> dict[str, float | None]:
    """One fresh responder and its tunnel with the peer, established before the flood:
    one TCP stream through it without a flood, then the same during one."""
    with Lab("bfl") as lab:
        a, r, responder = _pair(lab, args, impl, known)
        r.spawn("iperf3", "-s", "-p", str(IPERF_PORT))
        r.wait_listening(IPERF_PORT)
        if a.run("ping", "-n", "-c", "1", "-W", "10", INNER[1], check=False).returncode:
            raise BenchError(f"{impl}: no tunnel before the flood")
        pid = responder.process.pid
        load = float(Path("/proc/loadavg").read_text().split()[0])
        alone, cpu_alone = _tcp_mbps(a, args.iperf_seconds, pid)
        attack = _attack(args, a, responder, kind, SETTLE + args.iperf_seconds + 1.0)
        time.sleep(SETTLE)
        flooded, cpu_flooded = _tcp_mbps(a, args.iperf_seconds, pid)
        sent = attack.wait()
        rate = sent / (time.monotonic() - attack.started)
        if not responder.alive():
            raise BenchError(f"{impl} responder died:\n{lab.daemon_logs()}")
    return {"alone": alone, "flooded": flooded, "kept": flooded / alone if alone else None,
            "cpu_alone": cpu_alone, "cpu_flooded": cpu_flooded, "rate": rate, "load": load}


SHARED_ROWS = (
    ("rate", "flood sent (datagrams/s)", 0),
    ("load", "load average at the start of the round", 1),
)
TUNNEL_ROWS = (
    ("alone", "TCP through the tunnel, no flood (Mbit/s)", 0),
    ("flooded", "TCP through the tunnel during the flood (Mbit/s)", 0),
    ("kept", "during / no flood", 2),
    ("cpu_alone", "responder CPU, no flood (s a second)", 2),
    ("cpu_flooded", "responder CPU during the flood (s a second)", 2),
    *SHARED_ROWS,
)
ROWS = (
    ("first", "first ping reply after the first ping (s)", 2),
    ("through", "rounds with a reply during the flood (of all)", 0),
    ("recovery", "if not: first reply after the flood ended (s)", 2),
    ("cpu", "responder CPU during the flood (s)", 1),
    ("rss", "responder peak RSS (MiB)", 1),
    *SHARED_ROWS,
)


Case = tuple[str, str]  # (kind, endpoints)


def render(values: dict[tuple[str, Case], dict[str, list[float | None]]], impls: list[str],
           cases: list[Case], info: dict[str, str], settings: dict[str, str],
           tunnel: bool, markdown: bool) -> str:
    heading = "## " if markdown else ""
    parts = [f"{heading}Machine", machine_lines(info, markdown),
             f"{heading}Settings", machine_lines(settings, markdown)]
    # Each round's headline figure, in order: the tunnel's Mbit/s or the first reply.
    each, each_label, each_format = (("flooded", "TCP during the flood per round (Mbit/s)",
                                      "{:.0f}") if tunnel else
                                     ("first", "first reply per round (s)", "{:.1f}"))
    for case in cases:
        rows = []
        for key, label, digits in TUNNEL_ROWS if tunnel else ROWS:
            cells = []
            for impl in impls:
                got = values[(impl, case)][key]
                if key == "through":
                    done = [v for v in got if v is not None]
                    cells.append(f"{int(sum(done))}/{len(done)}")
                    continue
                spread = Spread.of(got)
                cells.append(spread.format(digits) if spread else "n/a")
            rows.append([label, *cells])
        rounds = [[impl, " ".join("-" if v is None else each_format.format(v)
                                  for v in values[(impl, case)][each])] for impl in impls]
        kind, endpoint = case
        parts += [f"{heading}Flood `{kind}`, peer's endpoint {endpoint}: median [min-max] "
                  "over rounds",
                  table(["metric", *impls], rows, markdown),
                  f"{each_label}, in order",
                  table(["responder", "rounds"], rounds, markdown)]
    return "\n\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/flood",
        description="A legitimate peer's first ping through a responder flooded with "
        "initiations, uspan-wg vs wireguard-go (needs root; traffic stays in its own "
        "namespaces).")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--seconds", type=float, default=15.0, help="flood length (15)")
    parser.add_argument("--legit-after", type=float, default=2.0,
                        help="seconds into the flood the peer starts pinging (2)")
    parser.add_argument("--ports", type=int, default=64, help="attacker source ports (64)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="cap the flood at this many datagrams/s (0: as fast as it can)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="ports,spoof")
    parser.add_argument("--endpoints", default="known",
                        help="known (every responder is configured with the peer's "
                        "endpoint), unknown (it learns it from the handshake) or both: "
                        "known,unknown")
    parser.add_argument("--tunnel", action="store_true",
                        help="instead of a newcomer's first ping: one TCP stream (iperf3) "
                        "from the peer through a tunnel established before the flood, "
                        "without and then during a flood")
    parser.add_argument("--iperf-seconds", type=float, default=4.0,
                        help="with --tunnel: seconds of each iperf3 run (4)")
    parser.add_argument("--legit", default="/usr/bin/wireguard-go",
                        help="the legitimate peer's program (Debian's wireguard-go)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in KINDS for k in args.kinds):
        parser.error(f"--kinds: choose from {','.join(KINDS)}")
    args.endpoints = [e for e in args.endpoints.split(",") if e]
    if not args.endpoints or any(e not in ENDPOINTS for e in args.endpoints):
        parser.error(f"--endpoints: choose from {','.join(ENDPOINTS)}")
    if min(args.rounds, args.seconds, args.ports) <= 0 or args.legit_after >= args.seconds:
        parser.error("--rounds, --seconds, --ports must be positive, --legit-after < --seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # bench/flood puts this tree first on the path; the daemons inherit the environment,
    # so without this a --uspan of another install would run this tree's code. (The
    # attacker puts the tree on its own path.)
    os.environ.pop("PYTHONPATH", None)
    info = start_benchmark("flood", args, ["ip", "wg", "ping", *(["iperf3"] * args.tunnel)])
    if info is None:
        return 2
    info["uspan tree"] = uspan_tree(args.uspan)
    print(f"bench/flood: uspan-wg {args.uspan} runs {info['uspan tree']}", flush=True)
    impls = list(args.programs)
    flood_seconds = SETTLE + args.iperf_seconds + 1.0 if args.tunnel else args.seconds
    settings = {
        "rounds": str(args.rounds),
        "flood": f"{flood_seconds:g} s of 148-byte initiations with a valid mac1 and random "
        f"body, one Python process in the peer's namespace, "
        + (f"at most {args.rate:g}/s" if args.rate else "as fast as it can"),
        "ports": f"from {args.ports} UDP sockets of {OUTER[0]}",
        "spoof": f"from random (address, port) pairs of {SPOOF_RANGE} (raw socket), a "
        f"range the responder routes via {OUTER[0]}",
        "legitimate peer": f"{args.legit} on {OUTER[0]}:{PEER_PORT}, pings every 0.2 s "
        f"from {args.legit_after:g} s into the flood; its first packet starts its first "
        "handshake",
        "peer's endpoint": "known: every responder is configured with it; unknown: "
        "learned from the handshake",
    }
    if args.tunnel:
        settings["legitimate peer"] = (
            f"{args.legit} on {OUTER[0]}:{PEER_PORT}, its tunnel up (one ping) before the "
            f"flood; {args.iperf_seconds:g} s of one TCP stream (iperf3) from it to the "
            f"responder without a flood, then the same from {SETTLE:g} s into the flood")
    rows = TUNNEL_ROWS if args.tunnel else ROWS
    run_trial = tunnel_trial if args.tunnel else flood_trial
    cases = [(kind, endpoint) for kind in args.kinds for endpoint in args.endpoints]
    values = {(impl, case): {key: [None] * args.rounds for key, *_ in rows}
              for impl in impls for case in cases}

    def trial(impl: str, case: Case, round_: int) -> None:
        got = run_trial(args, impl, case[0], case[1] == "known")
        for key, value in got.items():
            values[(impl, case)][key][round_] = value
        if args.tunnel:
            print(f"  TCP {got['alone']:.0f} Mbit/s, during the flood {got['flooded']:.0f}",
                  flush=True)
        else:
            first = got["first"]
            print(f"  first reply {first if first is None else round(first, 2)} s", flush=True)

    failures = run_rounds(args.rounds, [
        (f"{case[0]} {case[1]} {impl}", lambda round_, i=impl, c=case: trial(i, c, round_))
        for case in cases for impl in impls
    ])
    publish("handshake flood",
            lambda md: render(values, impls, cases, info, settings, args.tunnel, markdown=md),
            args.markdown)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
