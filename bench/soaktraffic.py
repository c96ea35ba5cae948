"""The soak's traffic agent: run inside one node's namespace, it sends a steady UDP stream
to every other node's KubeSpan address and receives theirs, and writes one JSON line a
second (bytes received per source, totals, and every gap longer than a second between two
arrivals from one source, with its wall-clock start and end, so the soak can tell a stall
from a pause it made itself).

A file ``PAUSE`` next to the output stops sending while it exists: the soak pauses all
agents to read both ends' WireGuard counters with nothing in flight.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import struct
import time
from pathlib import Path

PORT = 7000
STALL = 1.0  # seconds without a packet from a live stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=ADDRESS")
    parser.add_argument("--rate", type=float, default=100.0, help="packets/s per peer")
    parser.add_argument("--size", type=int, default=1200, help="UDP payload bytes")
    args = parser.parse_args()
    peers = dict(p.split("=", 1) for p in args.peer)
    names = {socket.inet_pton(socket.AF_INET6, a): n for n, a in peers.items()}
    running = True

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::", PORT))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    pause = args.out.parent / "PAUSE"
    sent = dict.fromkeys(peers, 0)
    received = dict.fromkeys(peers, 0)
    second = dict.fromkeys(peers, 0)
    last: dict[str, float] = {}
    gaps: list[list[object]] = []
    errors = 0
    seq = 0
    pad = b"\0" * (args.size - 8)
    interval = 1.0 / args.rate
    next_send = time.monotonic()
    next_report = time.time() + 1.0
    with args.out.open("a", buffering=1) as out:
        while running:
            now = time.monotonic()
            if now >= next_send:
                next_send = max(next_send + interval, now - 1.0)
                if not pause.exists():
                    seq += 1
                    for name, address in peers.items():
                        try:
                            sock.sendto(struct.pack("!Q", seq) + pad, (address, PORT))
                            sent[name] += 1
                        except OSError:
                            errors += 1  # the node is restarting: no route for a moment
            for _key, _ev in sel.select(max(0.0, next_send - time.monotonic())):
                while True:
                    try:
                        data, source = sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    wall = time.time()
                    name = names.get(socket.inet_pton(socket.AF_INET6, source[0]))
                    if name is None:
                        continue
                    if name in last and wall - last[name] > STALL:
                        gaps.append([name, last[name], wall])
                    last[name] = wall
                    received[name] += 1
                    second[name] += len(data)
            wall = time.time()
            if wall >= next_report or not running:
                next_report += 1.0
                out.write(json.dumps({"t": wall, "node": args.name, "rx": second,
                                      "sent": sent, "received": received, "gaps": gaps,
                                      "errors": errors}) + "\n")
                second = dict.fromkeys(peers, 0)
                gaps = []


if __name__ == "__main__":
    main()
