"""Where a newcomer's handshake goes in one flood round against uspan-wg (``bench/flood``'s
case, one round, uspan only): what the responder's sample, gate and socket did each
0.25 s, and each packet between the newcomer and the responder.

The responder's side is read in process: ``stats=1`` on its UAPI socket (the sample:
``sample_*``; the reads in C: ``gate_*``; the socket: ``udp_*``) and its namespace's
UDP counters (``/proc/PID/net/snmp``: ``RcvbufErrors`` counts a full queue's drops,
``InErrors`` those and the early-drop filter's). The newcomer's packets are captured in
its own namespace (a packet socket with a classic BPF filter on its port, so the flood
on the same link costs the capture nothing): its initiations, with or without mac2,
and the responder's answers (cookie replies, responses).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

from bench.common import add_common_arguments, cpu_seconds, start_benchmark
from bench.flood import INNER, OUTER, PEER_PORT, _attack, _pair
from uspan.daemon import earlydrop, uapi_client
from uspan.testbed import Lab
from uspan.testbed.flood import Pinger

INTERVAL = 0.25
_ETH_P_ALL = 0x0003
_KINDS = {1: "initiation", 2: "response", 3: "cookie reply", 4: "transport"}
_COLUMNS = ("sample_keep_ppm", "sample_aim", "sample_target", "sample_drained",
            "udp_backlog_permille")
_DELTAS = ("udp_socket_drops", "RcvbufErrors", "InErrors", "gate_cookies", "gate_dropped",
           "gate_handed_up", "drop_cookie_sent", "drop_cookie_limited")


def _peer_filter(host: str, port: int) -> list[earlydrop.Instruction]:
    """Ethernet frames of IPv4 UDP from or to ``host``:``port`` (no IP options)."""
    ip = int.from_bytes(socket.inet_aton(host), "big")
    return [(0x28, 0, 0, 12), (0x15, 0, 11, 0x0800),  # ldh ethertype; IPv4?
            (0x30, 0, 0, 23), (0x15, 0, 9, 17),  # ldb protocol; UDP?
            (0x20, 0, 0, 26), (0x15, 0, 2, ip),  # ld source address
            (0x28, 0, 0, 34), (0x15, 4, 0, port),  # ldh source port
            (0x20, 0, 0, 30), (0x15, 0, 3, ip),  # ld destination address
            (0x28, 0, 0, 36), (0x15, 0, 1, port),  # ldh destination port
            (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]


def capture(port: int) -> int:
    """In the newcomer's namespace: print one line per WireGuard datagram from or to
    its ``port`` (monotonic time, direction, kind, whether an initiation carries mac2)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    earlydrop.attach(sock, _peer_filter(OUTER[0], port))
    print("ready", flush=True)
    while True:
        frame, address = sock.recvfrom(2048)
        payload = frame[42:]
        if not payload:
            continue
        outgoing = address[2] == socket.PACKET_OUTGOING
        kind = _KINDS.get(payload[0], f"type {payload[0]}")
        if payload[0] == 1 and len(payload) == 148:
            kind += " with mac2" if any(payload[-16:]) else " without mac2"
        print(f"{time.monotonic():.3f} {'sent' if outgoing else 'received'} {kind}",
              flush=True)


def _snmp_udp(pid: int) -> dict[str, int]:
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:], strict=True)}


def probe(args: argparse.Namespace) -> int:
    start_benchmark("floodprobe", args, ["ip", "wg", "ping"])
    events: list[str] = []
    with Lab("bfp") as lab:
        a, _, responder = _pair(lab, args, "uspan", known=False)
        tap = a.spawn(sys.executable, "-m", "bench.floodprobe", "--capture", str(PEER_PORT),
                      stdout=-1)
        assert tap.stdout is not None
        if tap.stdout.readline().strip() != b"ready":
            raise SystemExit("the capture did not start")
        threading.Thread(target=lambda: events.extend(
            line.decode().strip() for line in tap.stdout or ()), daemon=True).start()
        pid = responder.process.pid
        print(f"load average: {Path('/proc/loadavg').read_text().strip()}", flush=True)
        attack = _attack(args, a, responder, "spoof", args.seconds)
        cpu, t0 = cpu_seconds(pid), attack.started
        pinger: Pinger | None = None
        rows: list[str] = []
        last: dict[str, int] = {}
        while attack.process.poll() is None or time.monotonic() < t0 + args.seconds + 3:
            if pinger is None and time.monotonic() >= t0 + args.legit_after:
                pinger = Pinger(a, INNER[1])
                events.append(f"{pinger.started:.3f} ping started")
            lines = uapi_client.request(str(responder.socket), "stats=1\n\n")
            got = {k: int(v) for k, v in (line.split("=", 1) for line in lines)}
            got.update(_snmp_udp(pid))
            rows.append(f"{time.monotonic():.3f} " + " ".join(
                [str(got.get(c, "-")) for c in _COLUMNS]
                + [str(got.get(d, 0) - last.get(d, 0)) for d in _DELTAS]))
            last = got
            time.sleep(INTERVAL)
        sent = attack.wait()
        used = cpu_seconds(pid) - cpu
        first = pinger.first_reply() if pinger else None
        if pinger:
            pinger.stop()
        tap.terminate()
    print(f"flood: {sent} datagrams, {sent / args.seconds:.0f}/s; responder CPU {used:.1f} s;"
          f" first reply {first} s after the first ping; load average now "
          f"{Path('/proc/loadavg').read_text().strip()}")
    print("t(s) " + " ".join(c.removeprefix("sample_") for c in _COLUMNS) + " | deltas: "
          + " ".join(_DELTAS))
    timeline = [(float(r.split()[0]), r.split(" ", 1)[1]) for r in rows]
    timeline += [(float(e.split()[0]), "** " + e.split(" ", 1)[1]) for e in events]
    for at, text in sorted(timeline):
        print(f"{at - t0:6.2f} {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/floodprobe", description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--legit-after", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--ports", type=int, default=64)
    parser.add_argument("--legit", default="/usr/bin/wireguard-go")
    parser.add_argument("--capture", type=int, help=argparse.SUPPRESS)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.capture:
        return capture(args.capture)
    return probe(args)


if __name__ == "__main__":
    sys.exit(main())
