"""Instructions per packet of the plane's C paths against the core's compiled AEAD, in
process under callgrind (robust on a shared machine, unlike wall-clock time).

A loop of ROUNDS round trips of one ping-sized packet (84 bytes) each, per kind:
- ``aead``: ``uspan.wg._aead`` Sealer.seal then Opener.open, one packet per call (what
  the core's Keypair does);
- ``plane``: the plane's slow-path ``seal`` then ``open`` on installed keypairs;
- ``steps``: the plane thread's two steps (``_tun_step`` on A: route, current keypair,
  seal, record; ``_udp_step`` on B: index, open, replay, record, inner source route);
- ``tunnel``: pings through two started planes (tests/unit/planekit's tunnel: a
  SOCK_SEQPACKET pair as each TUN, UDP on loopback), an echo from A's TUN to B's and a
  reply back, one at a time; ``plane_run`` is both threads' wakes, reads, steps, sends
  and writes (the kernel's share not counted), halved: one side's cost per ping (one
  packet out, one in), the prototype's measure (proto/results-callgrind.txt).
Whole: the loop's instructions (the run with ROUNDS minus the same run with 0) per round
trip, Python calls included. Then callgrind's inclusive count per round trip of the C
functions: the methods as Python calls them (``_aead``'s sealer_seal and opener_open,
the plane's plane_seal and plane_open: argument parsing and the bytes objects
included), and what the thread runs per packet without the interpreter
(seal_message + open_message; tun_step + udp_step, which hold all the per-packet work).

    bench/planeinstr [--rounds 1000]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

KINDS = ("aead", "plane", "steps", "tunnel")
C_FUNCTIONS = {"aead": ("sealer_seal", "opener_open"), "plane": ("plane_seal", "plane_open"),
               "steps": ("tun_step", "udp_step"), "tunnel": ("plane_run",)}
PACKET = bytes([0x45, 0, 0, 84]) + bytes(8) + bytes([10, 77, 0, 1, 10, 77, 0, 2]) + bytes(64)
REPLY = PACKET[:12] + PACKET[16:20] + PACKET[12:16] + PACKET[20:]


def _loop(kind: str, rounds: int) -> None:
    """The measured loop (run under callgrind by ``main``)."""
    from uspan.plane._plane import Plane  # imported in the child only
    from uspan.wg import _aead, prefix

    if kind == "tunnel":
        from tests.unit.planekit import tunnel

        with tunnel() as (a, b):
            for _ in range(rounds):
                a.write_tun(PACKET)
                b.read_tun()
                b.write_tun(REPLY)
                a.read_tun()
        return
    k1, k2 = os.urandom(32), os.urandom(32)
    if kind == "aead":
        sealer, opener = _aead.Sealer(k1), _aead.Opener(k1)
        for counter in range(rounds):
            opener.open(sealer.seal(7, counter, [PACKET], 1420))
        return
    a, b = Plane(-1, [], 1420), Plane(-1, [], 1420)
    pa, pb = a.add_peer(), b.add_peer()
    now = time.monotonic_ns()
    a.install(pa, 1, 2, k1, k2, now, True)
    b.install(pb, 2, 1, k2, k1, now, False)
    a.assign(pa, -1, 1, -1)
    b.assign(pb, -1, 2, -1)
    a.add_routes(pa, [prefix.parse("10.77.0.2/32")])
    b.add_routes(pb, [prefix.parse("10.77.0.1/32")])
    a.set_endpoint(pa, b"\x7f\x00\x00\x01", 2)
    b.set_endpoint(pb, b"\x7f\x00\x00\x01", 1)
    if kind == "plane":
        for _ in range(rounds):
            b.open(2, a.seal(1, [PACKET]))
    else:
        source = (b"\x7f\x00\x00\x01", 1)
        for _ in range(rounds):
            ((datagram, _),) = a._tun_step([PACKET], now)
            b._udp_step([(datagram, *source)], now)
    a.close()
    b.close()


def _callgrind(kind: str, rounds: int, work: str) -> tuple[int, dict[str, int]]:
    out = os.path.join(work, f"{kind}-{rounds}.out")
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, "-m", "bench.planeinstr", "--child", kind, str(rounds)],
                   check=True, capture_output=True)
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", out],
                          check=True, capture_output=True, text=True).stdout
    totals = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text)
    assert totals is not None, text[:500]
    total = int(totals[1].replace(",", ""))
    functions: dict[str, int] = {}
    for name in C_FUNCTIONS[kind]:
        found = re.search(r"^\s*([\d,]+) \([^)]*\)\s+\S*:" + name + r"\b", text, re.MULTILINE)
        functions[name] = int(found[1].replace(",", "")) if found else 0
    return total, functions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _loop(args.child[0], int(args.child[1]))
        return 0
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.rounds} round trips "
          f"of one {len(PACKET)}-byte packet; instructions per round trip (seal + open)")
    with tempfile.TemporaryDirectory() as work:
        for kind in KINDS:
            base, _ = _callgrind(kind, 0, work)
            total, functions = _callgrind(kind, args.rounds, work)
            per = args.rounds * (2 if kind == "tunnel" else 1)
            parts = ", ".join(f"{n} {v / per:,.0f}" for n, v in functions.items())
            print(f"{kind:6} whole {(total - base) / args.rounds:8,.0f}   ({parts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
