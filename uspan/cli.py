"""The ``uspan`` command line.

``uspan demo``: two fresh network namespaces joined by a veth, ``uspan-wg`` in one and
``wireguard-go`` in the other, a tunnel with fresh keys and a preshared key, pings both
ways over IPv4 and IPv6, ``wg show`` of both sides, then everything is removed (also on
Ctrl-C or SIGTERM). Needs root.

``uspan stats IFACE``: the counters a running ``uspan-wg`` keeps besides what ``wg show``
reports: packets dropped by reason (bad mac1, replay, unknown index, ...) and I/O errors.

``uspan discovery-service --listen HOST:PORT``: the discovery registry that mesh nodes
use to find each other (docs/discovery-protocol.md), in memory, durable with
``--state-file``, or shared by replicas through ``--etcd``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType

from uspan import signals as stop_signals
from uspan import userpaths, wgtool
from uspan.daemon import uapi_client
from uspan.daemon.uapi_server import socket_path
from uspan.lab import cli as lab_cli
from uspan.node import cli as node_cli
from uspan.testbed import Lab, NetnsError, PeerConfig, WireGuard, genpsk, run

WIREGUARD_GO = "/usr/bin/wireguard-go"
OUTER = ("192.0.2.1", "192.0.2.2")
INNER4 = ("10.77.0.1", "10.77.0.2")
INNER6 = ("fd00:77::1", "fd00:77::2")
PORTS = (51820, 51821)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uspan", description="Userspace WireGuard mesh: a lab of nodes on this machine, "
        "a node, its discovery service and relay, and tools for uspan-wg.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="a tunnel between uspan-wg and wireguard-go in two namespaces (root)",
        description="Build two namespaces, run uspan-wg in one and wireguard-go in the "
        "other, ping across the tunnel both ways, show both sides, clean up.",
    )
    demo.add_argument("--count", type=positive_int, default=3, help="pings each way (3)")
    demo.add_argument("--keep", action="store_true", help="keep it running until Ctrl-C")
    demo.add_argument("--uspan-wg", default=userpaths.program("uspan-wg"), metavar="PATH",
                      help="the program for the first namespace (%(default)s)")  # fmt: skip
    demo.add_argument("--wireguard-go", default=WIREGUARD_GO, metavar="PATH",
                      help="the program for the second namespace (%(default)s)")  # fmt: skip
    demo.set_defaults(handler=demo_command)
    stats = commands.add_parser(
        "stats",
        help="drop and error counters of a running uspan-wg interface",
        description="Print the counters uspan-wg keeps besides wg show: drops by reason "
        "and I/O errors (UAPI 'stats=1' on IFACE.sock in --socket-dir).",
    )
    stats.add_argument("interface", metavar="IFACE")
    stats.add_argument("--socket-dir", default=None, metavar="DIR",
                       help=f"where the UAPI sockets are ({userpaths.uapi_dir()})")
    stats.set_defaults(handler=stats_command)
    disc = commands.add_parser(
        "discovery-service",
        help="run the discovery service that mesh nodes use to find each other",
        description="Serve the discovery protocol (docs/discovery-protocol.md) until SIGINT "
        "or SIGTERM. State is in memory unless --state-file or --etcd is given.",
    )
    disc.add_argument("--listen", required=True, metavar="HOST:PORT",
                      help="address to serve on, e.g. 0.0.0.0:3000 or [::]:3000")
    backend = disc.add_mutually_exclusive_group()
    backend.add_argument("--state-file", metavar="FILE", type=Path,
                         help="make the in-memory state durable in FILE (and FILE.log.N)")
    backend.add_argument("--etcd", metavar="URL[,URL...]",
                         help="keep state in etcd (its JSON gateway), shared by replicas")
    disc.add_argument("--etcd-prefix", default="/uspan/discovery/", metavar="PREFIX",
                      help="key prefix in etcd (%(default)s)")
    disc.add_argument("--probe-port", type=int, metavar="PORT",
                      help="UDP port answering nodes' reflexive address probes "
                      "(default: the --listen port's number, when free)")
    disc.add_argument("--metrics", metavar="HOST:PORT",
                      help="serve Prometheus metrics at http://HOST:PORT/metrics")
    disc.add_argument("--rate-limit", default="15/60", metavar="RATE/BURST",
                      help="requests per second and burst per source IP (%(default)s)")
    disc.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                      help="(%(default)s)")
    disc.add_argument("--relay", metavar="HOST:PORT",
                      help="also relay WireGuard datagrams for nodes no direct path reaches "
                      "(UDP and TCP on HOST:PORT; docs/relay-protocol.md)")
    disc.set_defaults(handler=discovery_command, parser=disc, service=True)
    relay = commands.add_parser(
        "relay",
        help="forward members' encrypted WireGuard datagrams when no direct path works",
        description="Serve the relay protocol (docs/relay-protocol.md) on UDP and TCP until "
        "SIGINT or SIGTERM. It forwards opaque datagrams between nodes that prove "
        "membership of the same cluster, and sees nothing else.",
    )
    relay.add_argument("--listen", required=True, metavar="HOST:PORT",
                       help="address for UDP and TCP, e.g. 0.0.0.0:3001")
    relay.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics")
    relay.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                       help="(%(default)s)")
    relay.set_defaults(handler=relay_command, parser=relay, service=True)
    node_cli.add_commands(commands)
    lab_cli.add_commands(commands)
    wgtool.add_command(commands)
    return parser


def discovery_command(args: argparse.Namespace) -> int:
    from uspan.discovery.server import Limits
    from uspan.discovery.service import Options, parse_listen, run

    parser: argparse.ArgumentParser = args.parser
    try:
        listen = parse_listen(args.listen, "--listen")
        metrics = parse_listen(args.metrics, "--metrics") if args.metrics else None
        relay = parse_listen(args.relay, "--relay") if args.relay else None
    except ValueError as e:
        parser.error(str(e))
    rate_text, _, burst_text = args.rate_limit.partition("/")
    try:
        limits = Limits(rate=float(rate_text), burst=int(burst_text))
        if limits.rate <= 0 or limits.burst < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--rate-limit: {args.rate_limit!r} is not RATE/BURST (e.g. 15/60)")
    etcd = None
    if args.etcd is not None:
        etcd = [u.strip() for u in args.etcd.split(",") if u.strip()]
        if not etcd or not all(u.startswith(("http://", "https://")) for u in etcd):
            parser.error(f"--etcd: {args.etcd!r} is not a list of http(s):// URLs")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.probe_port is not None and not 0 <= args.probe_port <= 65535:
        parser.error(f"--probe-port: {args.probe_port} is not a port")
    return run(Options(listen, args.state_file, etcd, args.etcd_prefix, metrics, limits,
                       args.probe_port, relay))


def relay_command(args: argparse.Namespace) -> int:
    from uspan.discovery.service import parse_listen
    from uspan.relay import service

    parser: argparse.ArgumentParser = args.parser
    try:
        listen = parse_listen(args.listen, "--listen")
        metrics = parse_listen(args.metrics, "--metrics") if args.metrics else None
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return service.run(listen, metrics)


def stats_command(args: argparse.Namespace) -> int:
    path = socket_path(args.interface, args.socket_dir)
    try:
        lines = uapi_client.request(path, "stats=1\n\n")
    except uapi_client.UapiClientError as exc:
        if "errno=" in str(exc):
            exc = uapi_client.UapiClientError(
                f"{args.interface} did not answer stats=1 (not uspan-wg?)")
        print(f"uspan stats: {exc}", file=sys.stderr)
        return 1
    for line in counter_lines(lines):
        print(line)
    return 0


def counter_lines(lines: list[str]) -> list[str]:
    """``name=value`` lines as two columns, the values aligned after the longest name
    (a fixed width let ``plane_egress_punts_dropped`` push its value out of line)."""
    pairs = [line.partition("=")[::2] for line in lines]
    width = max((len(name) for name, _ in pairs), default=0)
    return [f"{name:{width}}   {value}" for name, value in pairs]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _missing(programs: dict[str, str]) -> list[str]:
    problems = []
    for option, path in programs.items():
        if not os.access(path, os.X_OK):
            problems.append(f"{path} is not an executable (choose another with --{option})")
    return problems


def demo_command(args: argparse.Namespace) -> int:
    programs = {"uspan-wg": args.uspan_wg, "wireguard-go": args.wireguard_go}
    problems = _missing(programs)
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, TUN devices)")
    if shutil.which("wg") is None:
        problems.append("the wg tool is missing (apt-get install wireguard-tools)")
    if problems:
        for problem in problems:
            print(f"uspan demo: {problem}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    lab = Lab("demo")
    try:
        return _demo(lab, args)
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    except (NetnsError, TimeoutError) as e:
        print(f"uspan demo: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("cleaning up: stopping daemons, deleting namespaces")
        lab.close(raise_errors=False)


def _demo(lab: Lab, args: argparse.Namespace) -> int:
    a, b = lab.namespace("a"), lab.namespace("b")
    lab.veth(a, b, [f"{OUTER[0]}/24"], [f"{OUTER[1]}/24"])
    print(f"namespaces {a.name} ({OUTER[0]}) and {b.name} ({OUTER[1]}), joined by a veth")
    wa = lab.start_wireguard(a, args.uspan_wg)
    print(f"{args.uspan_wg}: interface {wa.name} in {a.name}")
    wb = lab.start_wireguard(b, args.wireguard_go)
    print(f"{args.wireguard_go}: interface {wb.name} in {b.name}")

    psk = genpsk()
    routes = [[f"{INNER4[i]}/32", f"{INNER6[i]}/128"] for i in (0, 1)]
    wa.configure(
        listen_port=PORTS[0],
        peers=[PeerConfig(wb.keys.public, routes[1], f"{OUTER[1]}:{PORTS[1]}", psk)],
    )
    wb.configure(
        listen_port=PORTS[1],
        peers=[PeerConfig(wa.keys.public, routes[0], f"{OUTER[0]}:{PORTS[0]}", psk)],
    )
    for i, wg in enumerate((wa, wb)):
        wg.add_address(f"{INNER4[i]}/24", f"{INNER6[i]}/64")
        wg.up()

    ok = True
    for src, dst in ((0, 1), (1, 0)):
        for inner in (INNER4, INNER6):
            ns = (a, b)[src]
            print(f"\n$ ip netns exec {ns.name} ping -c {args.count} {inner[dst]}")
            done = ns.run("ping", "-c", str(args.count), "-i", "0.2", "-W", "2", inner[dst],
                          check=False, timeout=10 + args.count)  # fmt: skip
            print(done.stdout.rstrip())
            ok = ok and done.returncode == 0
    for wg in (wa, wb):
        _show(wg)
    if args.keep:
        print(f"\nrunning; try: ip netns exec {a.name} ping {INNER4[1]}   (Ctrl-C to stop)")
        signal.pause()
    print("\ndemo " + ("passed: pings crossed the tunnel both ways" if ok else "FAILED"))
    return 0 if ok else 1


def _show(wg: WireGuard) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WG_HIDE_KEYS"}  # keep keys hidden
    print(f"\n$ wg show {wg.name}   # {Path(wg.program).name} in {wg.ns.name}")
    print(run(["wg", "show", wg.name], env=env).stdout.rstrip())


def command_signals(service: bool) -> None:
    """A tool gets Ctrl-C and SIGTERM as usual now, and ends quietly in a closed pipe
    (`uspan stats wg0 | head`). A service keeps the stop signals the launcher held and
    Python's ignored SIGPIPE: a client that closes its socket mid-reply is an EPIPE for
    that client, not the death of the node."""
    if not service:
        stop_signals.release()
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command_signals(service=getattr(args, "service", False))
    args.argv_given = sys.argv[1:] if argv is None else argv  # to re-run it elsewhere
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:  # a tool interrupted: the shell's status, no traceback
        return 128 + signal.SIGINT
    return code
