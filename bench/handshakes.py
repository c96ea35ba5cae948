"""Handshake benchmark: how many handshakes a responder completes per second, and how long
a fresh pair takes to carry its first packet, for uspan-wg and wireguard-go.

Responder rate: a Python initiator built on uspan's sans-IO core plays N distinct peers
(all configured on the responder). Initiations are prepared before the clock starts, so
the initiator's own crypto is not in the measured loop; the timed loop only sends them,
at most ``--rate`` per second with at most ``--window`` in flight, and collects
responses, which are verified afterwards (mac1 and the Noise response must decrypt).
Both limits keep the responders out of "under load" (uspan: more than 1000 handshake
messages in a second; wireguard-go: 128 queued), where they would demand cookies and
apply the per-source-IP rate limiter (20/s, burst 5); cookie replies are counted to show
that. So the rate row shows whether a responder keeps up with the offered rate, and the
CPU row what each handshake costs it. Round-robin over many peers keeps every peer's
initiations well over the 20 ms flood interval apart.

First packet: two fresh daemons of one implementation are launched and configured; the
first ping through the tunnel waits for the handshake, so its RTT is the time to first
reply from the first packet sent.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import functools
import os
import select
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from bench.common import (
    BenchError,
    Spread,
    add_common_arguments,
    cpu_seconds,
    machine_lines,
    publish,
    ratios,
    run_rounds,
    start_benchmark,
    table,
)
from uspan.testbed import Lab, Namespace, PeerConfig
from uspan.wg import cookie, crypto, messages, tai64n
from uspan.wg.constants import (
    COOKIE_REPLY_SIZE,
    KEY_SIZE,
    MSG_COOKIE_REPLY,
    MSG_RESPONSE,
    RESPONSE_SIZE,
    UNDER_LOAD_RATE,
)
from uspan.wg.drops import ProtocolError
from uspan.wg.handshake import InitiatorState, consume_response, create_initiation

OUTER = ("192.0.2.1", "192.0.2.2")  # initiator, responder
INNER = ("10.78.0.1", "10.78.0.2")
RESPONDER_PORT = 51830
IMPLS = ("uspan", "wgo")
CLONE_NEWNET = 0x40000000
PEER_SPACING = 0.025  # seconds between one peer's initiations (the flood rule is 20 ms)
ANSWER_TIMEOUT = 1.0  # an initiation unanswered this long is given up
NO_PSK = bytes(KEY_SIZE)
# How far in the past timestamps start; each peer's next initiation is one second later.
TIMESTAMP_BASE = time.time() - 30 * 86400


# --- the initiator ----------------------------------------------------------------------


@dataclass(slots=True)
class Identity:
    """One initiator peer: its keys, mac generator and timestamp counter."""

    private: bytes = field(repr=False)
    public: bytes
    macs: cookie.CookieGenerator
    sent: int = 0


@dataclass(frozen=True, slots=True)
class Prepared:
    peer: int
    message: bytes
    state: InitiatorState


@dataclass(slots=True)
class Drive:
    """What the timed loop saw; ``responses`` maps sender index to the raw response."""

    responses: dict[int, bytes] = field(default_factory=dict)
    cookie_replies: int = 0
    unanswered: int = 0
    elapsed: float = 0.0


def identities(count: int, responder_public: bytes) -> list[Identity]:
    result = []
    for _ in range(count):
        private = crypto.clamp(os.urandom(KEY_SIZE))
        result.append(
            Identity(private, crypto.public_key(private), cookie.CookieGenerator(responder_public))
        )
    return result


def prepare(peers: list[Identity], responder_public: bytes, count: int) -> list[Prepared]:
    """``count`` initiations round-robin over ``peers``; sender index = position."""
    prepared = []
    for index in range(count):
        number = index % len(peers)
        peer = peers[number]
        stamp = tai64n.encode(TIMESTAMP_BASE + peer.sent)
        peer.sent += 1
        message, state = create_initiation(
            peer.private, peer.public, responder_public, index, os.urandom(KEY_SIZE), stamp
        )
        peer.macs.add_macs(message, 0.0)
        prepared.append(Prepared(number, bytes(message), state))
    return prepared


def drive(
    sock: socket.socket, dest: tuple[str, int], prepared: list[Prepared], peers: int,
    window: int, rate: float,
) -> Drive:
    """Send at most ``rate`` per second with at most ``window`` unanswered; collect
    responses until all are settled."""
    result = Drive()
    in_flight: dict[int, float] = {}
    last_sent = [float("-inf")] * peers
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    position = 0
    started = last_answer = time.monotonic()
    while position < len(prepared) or in_flight:
        now = time.monotonic()
        wait = 0.01
        while position < len(prepared) and len(in_flight) < window:
            item = prepared[position]
            ready_at = max(last_sent[item.peer] + PEER_SPACING, started + position / rate)
            if now < ready_at:
                wait = min(wait, ready_at - now)
                break
            sock.sendto(item.message, dest)
            in_flight[position] = last_sent[item.peer] = now
            position += 1
        for index, sent in list(in_flight.items()):
            if now - sent > ANSWER_TIMEOUT:
                del in_flight[index]
                result.unanswered += 1
        if not poller.poll(wait * 1000):
            continue
        while True:
            try:
                data = sock.recv(256)
            except BlockingIOError:
                break
            kind = data[0] if data else 0
            if kind == MSG_RESPONSE and len(data) == RESPONSE_SIZE:
                receiver = int.from_bytes(data[8:12], "little")
                if in_flight.pop(receiver, None) is not None:
                    result.responses[receiver] = data
                    last_answer = time.monotonic()
            elif kind == MSG_COOKIE_REPLY and len(data) == COOKIE_REPLY_SIZE:
                result.cookie_replies += 1
                if in_flight.pop(int.from_bytes(data[4:8], "little"), None) is not None:
                    result.unanswered += 1
    result.elapsed = last_answer - started
    return result


def valid_responses(run: Drive, prepared: list[Prepared], peers: list[Identity]) -> int:
    """How many responses carry a correct mac1 and complete the Noise handshake."""
    valid = 0
    for index, data in run.responses.items():
        item = prepared[index]
        key = cookie.mac1_key(peers[item.peer].public)
        if crypto.mac(key, data[: cookie.MAC1.start]) != data[cookie.MAC1]:
            continue
        try:
            consume_response(item.state, NO_PSK, messages.parse_response(data))
        except ProtocolError:
            continue
        valid += 1
    return valid


# --- namespaces -------------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns to {what}: {os.strerror(errno)}")


@contextmanager
def inside(ns: Namespace) -> Iterator[None]:
    """Run the body in ``ns``'s network namespace (this thread only), then come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        _setns(target, ns.name)
        try:
            yield
        finally:
            _setns(own, "the original namespace")
    finally:
        os.close(own)
        os.close(target)


# --- trials -----------------------------------------------------------------------------


def _program(args: argparse.Namespace, impl: str) -> str:
    """uspan's path, or for ``wgo`` the first (baseline) wireguard-go build given."""
    return str(args.programs[args.wgo_names[0] if impl == "wgo" else impl])


def handshake_trial(args: argparse.Namespace, impl: str) -> dict[str, float | None]:
    """One fresh responder, ``--count`` initiations from ``--peers`` identities."""
    with Lab("bh") as lab:
        i, r = lab.namespace("i"), lab.namespace("r")
        lab.veth(i, r, [f"{OUTER[0]}/24"], [f"{OUTER[1]}/24"])
        responder = lab.start_wireguard(r, _program(args, impl))
        responder_public = base64.b64decode(responder.keys.public)
        peers = identities(args.peers, responder_public)
        responder.configure(
            listen_port=RESPONDER_PORT,
            peers=[PeerConfig(base64.b64encode(p.public).decode()) for p in peers],
        )
        prepared = prepare(peers, responder_public, args.count)
        with inside(i):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((OUTER[0], 0))
            sock.setblocking(False)
            cpu_before, own_before = cpu_seconds(responder.process.pid), time.process_time()
            run = drive(sock, (OUTER[1], RESPONDER_PORT), prepared, len(peers), args.window,
                        args.rate)
            cpu_used = cpu_seconds(responder.process.pid) - cpu_before
            own_used = time.process_time() - own_before
        valid = valid_responses(run, prepared, peers)
        if not responder.alive():
            raise BenchError(f"{impl} responder died:\n{lab.daemon_logs()}")
    return {
        "rate": valid / run.elapsed if run.elapsed > 0 else 0.0,
        "cpu_us": cpu_used / valid * 1e6 if valid else None,
        "initiator_us": own_used / valid * 1e6 if valid else None,
        "invalid": float(len(run.responses) - valid),
        "unanswered": float(run.unanswered),
        "cookies": float(run.cookie_replies),
    }


def _rtts(text: str) -> list[float]:
    return [
        float(w[5:]) for line in text.splitlines() for w in line.split() if w.startswith("time=")
    ]


def first_packet_trial(args: argparse.Namespace, impl: str) -> dict[str, float | None]:
    """Two fresh daemons: start time, first ping RTT (with handshake), launch to reply."""
    program = _program(args, impl)
    with Lab("bf") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.veth(a, b, [f"{OUTER[0]}/24"], [f"{OUTER[1]}/24"])
        launched = time.monotonic()
        wa = lab.start_wireguard(a, program)
        started_a = time.monotonic()
        wb = lab.start_wireguard(b, program)
        started_b = time.monotonic()
        wa.configure(
            listen_port=RESPONDER_PORT,
            peers=[PeerConfig(wb.keys.public, [f"{INNER[1]}/32"], f"{OUTER[1]}:{RESPONDER_PORT}")],
        )
        wb.configure(listen_port=RESPONDER_PORT,
                     peers=[PeerConfig(wa.keys.public, [f"{INNER[0]}/32"])])
        for wg, inner in ((wa, INNER[0]), (wb, INNER[1])):
            wg.add_address(f"{inner}/24")
            wg.up()
        first = a.run("ping", "-n", "-c", "1", "-W", "5", INNER[1], check=False)
        replied = time.monotonic()
        second = a.run("ping", "-n", "-c", "1", "-W", "5", INNER[1], check=False)
        rtts = _rtts(first.stdout) + _rtts(second.stdout)
        if len(rtts) != 2:
            raise BenchError(f"{impl}: ping through a fresh tunnel failed:\n{lab.daemon_logs()}")
    return {
        "start": (started_a - launched + started_b - started_a) / 2,
        "first_rtt": rtts[0],
        "second_rtt": rtts[1],
        "launch_to_reply": replied - launched,
    }


# --- report -----------------------------------------------------------------------------

ROWS = (
    ("rate", "handshakes/s completed (valid responses)", 0, True),
    ("cpu_us", "responder CPU per handshake (us)", 0, True),
    ("initiator_us", "initiator CPU per handshake, timed loop (us)", 0, False),
    ("unanswered", "initiations unanswered", 0, False),
    ("invalid", "responses failing verification", 0, False),
    ("cookies", "cookie replies (under load)", 0, False),
    ("start", "daemon start: launch to UAPI ready (s)", 3, True),
    ("first_rtt", "first ping RTT, incl. handshake (ms)", 2, True),
    ("second_rtt", "second ping RTT (ms)", 3, True),
    ("launch_to_reply", "launch of 2 daemons to first reply (s)", 2, True),
)


def render(
    values: dict[str, dict[str, list[float | None]]],
    info: dict[str, str],
    settings: dict[str, str],
    markdown: bool,
) -> str:
    rows = []
    for key, label, digits, has_ratio in ROWS:
        cells = []
        for impl in IMPLS:
            spread = Spread.of(values[impl][key])
            cells.append(spread.format(digits) if spread else "n/a")
        ratio = ratios(values["uspan"][key], values["wgo"][key]) if has_ratio else None
        rows.append([label, *cells, ratio.format(2) if ratio else "-"])
    heading = "## " if markdown else ""
    return (
        "\n\n".join(
            [
                f"{heading}Machine",
                machine_lines(info, markdown),
                f"{heading}Settings",
                machine_lines(settings, markdown),
                f"{heading}Results: median [min-max] over rounds; ratio per round, "
                "median [min-max]",
                table(["metric", "uspan-wg", "wireguard-go", "uspan/wgo"], rows, markdown),
            ]
        )
        + "\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/handshakes",
        description="Handshakes per second as responder and time to first packet, "
        "uspan-wg vs wireguard-go (needs root; traffic stays in its own namespaces).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (3)")
    parser.add_argument("--count", type=int, default=3000, help="initiations per round (3000)")
    parser.add_argument("--peers", type=int, default=1000, help="initiator identities (1000)")
    parser.add_argument(
        "--window",
        type=int,
        default=32,
        help="initiations in flight (32; wireguard-go is under load from 128)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=900.0,
        help="initiations offered per second (900; uspan is under load from 1000)",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.rounds, args.count, args.peers, args.window, args.rate) <= 0:
        parser.error("--rounds, --count, --peers, --window and --rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = start_benchmark("handshakes", args, ["ip", "wg", "ping", "ss"])
    if info is None:
        return 2
    settings = {
        "rounds": str(args.rounds),
        "initiations per round": f"{args.count} from {args.peers} peers, at most "
        f"{args.rate:g}/s and {args.window} in flight, one source address",
        "rate limiter": (
            "idle: below both under-load thresholds (uspan 1000 handshakes/s, wireguard-go "
            "128 queued), so no cookies and no per-source limit (20/s) apply"
            if args.rate < UNDER_LOAD_RATE and args.window < 128
            else "a responder may go under load: cookie replies are not answered, so "
            "cookies and the per-source limit (20/s) cap the rate"
        ),
        "initiator": "Python, same machine; its crypto is done before and after the timed loop",
    }
    values = {impl: {key: [None] * args.rounds for key, *_ in ROWS} for impl in IMPLS}
    def measure(trial, impl: str, round_: int) -> None:
        for key, value in trial(args, impl).items():
            values[impl][key][round_] = value

    failures = run_rounds(args.rounds, [
        (f"{trial.__name__} {impl}", functools.partial(measure, trial, impl))
        for trial in (handshake_trial, first_packet_trial)
        for impl in IMPLS
    ])
    publish("handshakes", lambda md: render(values, info, settings, markdown=md), args.markdown)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
