"""``uspan lab``: the commands (see the package docstring and the README's "The lab")."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from uspan.daemon.uapi_client import UapiClientError
from uspan.lab import build, faults, plan, privileges, procs, status, userns, wgo
from uspan.lab.record import (
    DEFAULT_NAME,
    LabError,
    LabRecord,
    default_root,
    load,
    locked,
    names,
    resolve,
)
from uspan.node.api import SOCKET_NAME
from uspan.testbed.process import NetnsError, poll

STATE_STYLE = {"up": "green", "down": "red", "unknown": "yellow", "-": "dim"}
UP_TIMEOUT = 120.0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = commands.add_parser(
        "lab", help="a test mesh on this machine in one command: `uspan lab up`",
        description="Build and drive a mesh of uspan nodes in network namespaces: "
        "underlay networks, NAT, wireguard-go peers, faults on demand. As root, or rootless "
        "in a user namespace of the user's own.")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", metavar="LAB",
                        help="which lab (default: the only one; `up`: 'lab')")
    common.add_argument("--root", type=Path, default=None, metavar="DIR",
                        help=f"where labs live (${'USPAN_LAB_ROOT'} or {default_root()})")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=["table", "json"], default="table")

    def command(name: str, handler: Any, help_text: str, *parents: argparse.ArgumentParser,
                ) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common, *parents], help=help_text,
                                description=help_text)
        parser.set_defaults(handler=run_lab_command, lab_handler=handler)
        return parser

    up = command("up", up_command, "create a lab and wait until every pair is up")
    up.add_argument("--nodes", type=int, default=3, metavar="N", help="(3)")
    up.add_argument("--networks", type=int, default=1, metavar="K",
                    help="underlay networks, every node on each (1)")
    up.add_argument("--nat", nargs="+", default=[], metavar="NODE[:easy|hard]",
                    help="put these nodes (n1, n2...) behind a NAT router of their own: "
                    "easy = masquerading, one mapping for all destinations (default); "
                    "hard = a new random port per destination")
    up.add_argument("--block-udp", nargs="+", default=[], metavar="NODE",
                    help="these nodes' routers drop all UDP (an easy NAT unless --nat says)")
    up.add_argument("--with-wireguard-go", type=int, default=0, metavar="M",
                    help="make the last M nodes plain wireguard-go peers")
    up.add_argument("--mtu", type=int, default=1420, help="(1420)")
    up.add_argument("--timeout", type=float, default=UP_TIMEOUT, metavar="S",
                    help="give up waiting for the full mesh after S seconds (%(default)s)")

    st = command("status", status_command, "pair states, endpoint networks, RTTs", output)
    st.add_argument("-w", "--watch", action="store_true", help="a live view (Ctrl-C ends)")
    st.add_argument("--no-rtt", action="store_true", help="skip the pings")
    pg = command("ping", ping_command, "ping every pair over the mesh", output)
    pg.add_argument("-c", "--count", type=int, default=3)
    ex = command("exec", exec_command, "run a command in a node's namespace (-- CMD...)")
    ex.add_argument("node", metavar="NODE")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD")
    lg = command("logs", logs_command, "a node's log (or 'discovery', 'agent')")
    lg.add_argument("node", metavar="NODE")
    lg.add_argument("-f", "--follow", action="store_true")
    bn = command("bench", bench_command, "iperf3 TCP through the mesh from A to B")
    bn.add_argument("a", metavar="A")
    bn.add_argument("b", metavar="B")
    bn.add_argument("--seconds", type=float, default=5.0, metavar="S")
    command("list", list_command, "the labs on this machine", output)
    dn = command("down", down_command, "remove a lab (everything it made)")
    dn.add_argument("--all", action="store_true", help="every lab under the root")
    for name, handler, text in (("cut", cut_command, "drop underlay traffic between A and B"),
                                ("heal", heal_command, "undo `cut` between A and B")):
        fault = command(name, handler, text)
        fault.add_argument("a", metavar="A")
        fault.add_argument("b", metavar="B")
        fault.add_argument("--network", type=int, metavar="I", help="only network I")
    nm = command("netem", netem_command, "delay, jitter, loss on what NODE sends (tc netem)")
    nm.add_argument("node", metavar="NODE")
    nm.add_argument("--network", type=int, metavar="I", help="only network I")
    nm.add_argument("--delay", metavar="TIME", help="e.g. 50ms")
    nm.add_argument("--jitter", metavar="TIME", help="e.g. 5ms")
    nm.add_argument("--loss", metavar="PERCENT", help="e.g. 5%%")
    nm.add_argument("--clear", action="store_true", help="remove the netem")
    kl = command("kill", kill_command, "stop a node's process")
    kl.add_argument("node", metavar="NODE")
    kl.add_argument("--signal", choices=["TERM", "KILL", "INT"], default="TERM")
    sn = command("start", start_command, "start a stopped node again")
    sn.add_argument("node", metavar="NODE")
    dc = command("discovery", discovery_command, "stop or start the lab's discovery service")
    dc.add_argument("action", choices=["stop", "start"])
    agent = sub.add_parser("agent", parents=[common])  # internal, unlisted: uspan.lab.wgo
    agent.set_defaults(handler=run_lab_command, lab_handler=agent_command)


# helpers -----------------------------------------------------------------------------------


def console() -> Console:
    wide = None if sys.stdout.isatty() else 200  # piped: no wrapping at 80 columns
    return Console(highlight=False, soft_wrap=False, width=wide)


def _root(args: argparse.Namespace) -> Path:
    root: Path = args.root if args.root is not None else default_root()
    return root


def _record(args: argparse.Namespace) -> LabRecord:
    return resolve(_root(args), args.name)


def run_lab_command(args: argparse.Namespace) -> int:
    """Entry point from ``uspan.cli``: one-line errors for every expected failure.

    Not as root, the command runs inside the user's own user namespace (uspan.lab.userns).
    """
    os.umask(0o077)  # everything a lab writes is its user's alone
    try:
        root = _root(args)
        if userns.wanted(root, args.lab_command):
            return userns.run_inside(root, args.argv_given, announce=args.lab_command == "up")
        if os.geteuid() != 0 and args.lab_command not in ("list", "logs"):
            raise LabError(f"no lab in {root}: start one with `uspan lab up`")
        code: int = args.lab_handler(args)
        return code
    except (LabError, plan.PlanError, NetnsError, TimeoutError, UapiClientError) as exc:
        print(f"uspan lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _running(record: LabRecord) -> int:
    return sum(1 for n in record.nodes if procs.alive(n.proc))


COMPACT = 6  # more nodes than this: cells without units, so 10 nodes fit 132 columns


def cell(pair: status.Pair, compact: bool = False) -> Text:
    text = Text(pair.state, style=STATE_STYLE.get(pair.state, ""))
    if pair.network is not None:
        text.append(f" {pair.network}" if compact else f" net{pair.network}")
    if pair.path is not None:
        text.append(f" {pair.path[0]}" if compact else f" {pair.path}")
    if pair.rtt_ms is not None:
        text.append(f" {pair.rtt_ms:.1f}" if compact else f" {pair.rtt_ms:.2f}ms")
    return text


def matrix(snap: status.Snapshot, title: str | None = None) -> Table:
    compact = len(snap.nodes) > COMPACT
    if compact and title is not None:
        title += "   (state, network, RTT in ms)"
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("from \\ to", style="bold")
    for view in snap.nodes:
        table.add_column(view.name)
    for view in snap.nodes:
        label = view.name + ("" if view.running else " (stopped)")
        if view.kind != "uspan":
            label += " wg-go"
        if view.nat:
            label += f" {view.nat}-nat"
        if view.block_udp:
            label += " no-udp"
        row: list[Text | str] = [label]
        for other in snap.nodes:
            row.append("" if other is view
                       else cell(snap.pairs[(view.name, other.name)], compact))
        table.add_row(*row)
    return table


def summary(snap: status.Snapshot) -> str:
    discovery = "running" if snap.discovery_running else "stopped"
    connected = sum(1 for v in snap.nodes if v.discovery)
    uspan_nodes = sum(1 for v in snap.nodes if v.kind == "uspan")
    lines = [f"pairs up {snap.up_count()}/{snap.pair_count()}; discovery {discovery} "
             f"({connected}/{uspan_nodes} uspan nodes connected)"]
    if snap.cuts:
        lines.append("cuts: " + ", ".join(
            f"{a}-{b} net{k}" for a, b, k in snap.cuts))
    if snap.netem:
        lines.append("netem: " + ", ".join(
            f"{node} net{k}: {args}" for node, nets in snap.netem.items()
            for k, args in nets.items()))
    for view in snap.nodes:
        if view.running and view.error:
            lines.append(f"{view.name}: {view.error}")
    return "\n".join(lines)


# up ----------------------------------------------------------------------------------------


def up_command(args: argparse.Namespace) -> int:
    privileges.require_root("up")
    privileges.require_tools("ip", "iptables", "ping", "ss", "mount", "tc")
    if args.with_wireguard_go:
        wgo.require_wireguard_go()
    out = console()
    started = time.monotonic()
    name = args.name or DEFAULT_NAME
    record = build.create(_root(args), name, args.nodes, args.networks,
                          plan.parse_nat(args.nat), args.with_wireguard_go, args.mtu,
                          args.block_udp)
    try:
        build.build(record, lambda text: out.print(text))
        for node in record.nodes:
            build.start_node(record, node)
        build.start_agent(record)
    except BaseException as exc:
        out.print(f"uspan lab up: {exc}; removing what was made", style="red")
        build.down(record)
        if isinstance(exc, (LabError, NetnsError, TimeoutError, UapiClientError)):
            return 1
        raise
    out.print(f"started {len(record.nodes)} nodes and the discovery service "
              f"({time.monotonic() - started:.1f}s)")
    snap = trio.run(_wait_full, record, out, started, args.timeout)
    elapsed = time.monotonic() - started
    full = snap.up_count() == snap.pair_count()
    trio.run(status.ping_all, record, snap)
    out.print(matrix(snap, title=f"lab {record.name}"))
    out.print(summary(snap))
    if not full:
        out.print(f"the mesh is not complete after {elapsed:.1f}s; the lab keeps running "
                  f"(`uspan lab status`, `uspan lab logs NODE`, `uspan lab down`)",
                  style="red")
        return 1
    with locked(record) as current:
        current.ready_seconds = round(elapsed, 2)
        current.save()
    out.print(f"lab {record.name} is up: {len(record.nodes)} nodes, every pair up in "
              f"{elapsed:.1f}s. Try `uspan lab status`, `uspan lab ping`, "
              f"`uspan lab exec n1 -- wg show`, `uspan lab down`.", style="bold green")
    return 0


async def _wait_full(record: LabRecord, out: Console, started: float, timeout: float,
                     ) -> status.Snapshot:
    deadline = time.monotonic() + timeout
    last = ""

    def line(snap: status.Snapshot) -> str:
        return (f"nodes started {snap.started()}/{len(snap.nodes)}, pairs up "
                f"{snap.up_count()}/{snap.pair_count()}")

    with Live(Text(""), console=out, transient=True, auto_refresh=False) as live:
        while True:
            snap = await status.snapshot(record)
            text = line(snap)
            elapsed = time.monotonic() - started
            if out.is_terminal:
                live.update(Text(f"{text}, {elapsed:.1f}s"), refresh=True)
            elif text != last:
                out.print(f"{text} ({elapsed:.1f}s)")
            last = text
            if snap.up_count() == snap.pair_count() or time.monotonic() > deadline:
                return snap
            for view in snap.nodes:
                node = record.node(view.name)
                if not view.running and node.proc is not None:
                    raise LabError(f"{node.name} exited; its log ends:\n"
                                   + _tail(record.log_path(node), 15))
            await trio.sleep(0.25)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# status, ping, list ------------------------------------------------------------------------


def status_command(args: argparse.Namespace) -> int:
    record = _record(args)
    out = console()
    if args.output == "json":
        snap = trio.run(lambda: status.snapshot(record, rtt=not args.no_rtt))
        print(json.dumps(snap.to_json(), indent=1))
        return 0
    if not args.watch:
        snap = trio.run(lambda: status.snapshot(record, rtt=not args.no_rtt))
        out.print(matrix(snap, title=f"lab {record.name}"))
        out.print(summary(snap))
        return 0

    async def watch() -> None:
        with Live(Text("..."), console=out, auto_refresh=False) as live:
            while True:
                current = load(Path(record.root), record.name)
                snap = await status.snapshot(current, rtt=not args.no_rtt)
                table = matrix(snap, title=f"lab {record.name}   {time.strftime('%H:%M:%S')}")
                live.update(_group(table, summary(snap)), refresh=True)
                await trio.sleep(1.0)

    try:
        trio.run(watch)
    except KeyboardInterrupt:
        return 0
    return 0


def _group(table: Table, text: str) -> Group:
    return Group(table, Text(text))


def ping_command(args: argparse.Namespace) -> int:
    record = _record(args)

    async def main() -> status.Snapshot:
        snap = await status.snapshot(record)
        await status.ping_all(record, snap, count=args.count)
        return snap

    snap = trio.run(main)
    failed = [p for p in snap.pairs.values() if p.rtt_ms is None]
    if args.output == "json":
        print(json.dumps(snap.ping_json(), indent=1))
    else:
        out = console()
        out.print(ping_matrix(snap, args.count))
        out.print(f"{len(snap.pairs) - len(failed)}/{len(snap.pairs)} pairs answered")
    return 1 if failed else 0


def ping_matrix(snap: status.Snapshot, count: int) -> Group:
    """The average RTTs, under a heading of its own line (as the table's title, rich
    wrapped it to the width of a 3-node table: "...mesh (3" / "each), average RTT")."""
    table = Table()
    table.add_column("from \\ to", style="bold")
    for view in snap.nodes:
        table.add_column(view.name)
    for view in snap.nodes:
        row: list[Text | str] = [view.name]
        for other in snap.nodes:
            if other is view:
                row.append("")
                continue
            rtt = snap.pairs[(view.name, other.name)].rtt_ms
            row.append(Text(f"{rtt:.2f}ms", style="green") if rtt is not None
                       else Text("fail", style="red"))
        table.add_row(*row)
    return Group(Text(f"lab {snap.lab}: ping over the mesh ({count} each), average RTT"), table)


def list_command(args: argparse.Namespace) -> int:
    root = _root(args)
    rows: list[dict[str, Any]] = []
    for name in names(root):
        try:
            record = load(root, name)
        except LabError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        rows.append({"name": name, "nodes": len(record.nodes), "running": _running(record),
                     "networks": record.networks, "discovery": procs.alive(record.discovery),
                     "created": time.strftime("%Y-%m-%d %H:%M",
                                              time.localtime(record.created)),
                     "readySeconds": record.ready_seconds, "dir": str(record.dir)})
    if args.output == "json":
        print(json.dumps(rows, indent=1))
        return 0
    out = console()
    if not rows:
        out.print(f"no labs in {root}")
        return 0
    table = Table()
    for column in ("NAME", "NODES", "RUNNING", "NETWORKS", "DISCOVERY", "CREATED", "UP IN",
                   "DIRECTORY"):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], Text(row["error"], style="red"))
            continue
        ready = row["readySeconds"]
        table.add_row(row["name"], str(row["nodes"]), str(row["running"]),
                      str(row["networks"]), "running" if row["discovery"] else "stopped",
                      row["created"], "-" if ready is None else f"{ready:.1f}s", row["dir"])
    out.print(table)
    return 0


# exec, logs, bench -------------------------------------------------------------------------

_EXEC = ('if [ -d /run/wireguard ]; then mount --bind "$1/wireguard" /run/wireguard; '
         'else mount --bind "$1" /run; fi; '
         # a fresh machine has no /var/lib/uspan to mount over: make it (root's, 0700)
         'mkdir -p -m 0700 /var/lib/uspan 2>/dev/null; '
         'if [ -d /var/lib/uspan ]; then mount --bind "$2" /var/lib/uspan; fi; '
         'shift 2; exec "$@"')


def exec_command(args: argparse.Namespace) -> int:
    privileges.require_root("exec")
    record = _record(args)
    node = record.node(args.node)
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = [os.environ.get("SHELL", "/bin/sh")]
    # In the node's namespace, with its UAPI socket directory over /run/wireguard and
    # its state directory over /var/lib/uspan: `wg show` and `uspan get` see this node.
    # The shell's $0 names us in its errors ("exec: foo: not found").
    full = ["ip", "netns", "exec", node.namespace, "sh", "-c", _EXEC, "uspan lab exec",
            str(record.run_dir(node)), str(record.state_dir(node)), *argv]
    # `uspan` there is this lab's own, also where the venv is not on PATH (README's
    # `.venv/bin/uspan lab exec n1 -- uspan get members`).
    env = {**os.environ, "PATH": os.pathsep.join(
        [str(Path(procs.uspan_program()).parent), os.environ.get("PATH", os.defpath)])}
    sys.stdout.flush()
    os.execvpe(full[0], full, env)


def _log_path(record: LabRecord, name: str) -> Path:
    if name in ("discovery", "agent"):
        return record.dir / f"{name}.log"
    return record.log_path(record.node(name))


def logs_command(args: argparse.Namespace) -> int:
    record = _record(args)
    path = _log_path(record, args.node)
    if args.follow:
        sys.stdout.flush()
        os.execvp("tail", ["tail", "-n", "+1", "-f", str(path)])
    try:
        with path.open("rb") as log:
            shutil.copyfileobj(log, sys.stdout.buffer)
    except FileNotFoundError:
        raise LabError(f"no log yet at {path}") from None
    return 0


def bench_command(args: argparse.Namespace) -> int:
    privileges.require_root("bench")
    privileges.require_tools("iperf3")
    record = _record(args)
    a, b = record.node(args.a), record.node(args.b)
    snap = trio.run(status.snapshot, record)
    views = {v.name: v for v in snap.nodes}
    target = views[b.name].address
    if target is None or not views[a.name].running:
        raise LabError(f"{a.name} and {b.name} must both be running")
    server = subprocess.Popen(["ip", "netns", "exec", b.namespace, "iperf3", "-s", "-1",
                               "-B", target], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        poll(lambda: bool(build.in_ns(b.namespace, "ss", "-Htln", "sport = :5201",
                                      check=False).strip()), what="iperf3 server", timeout=10)
        cpu_before = {n.name: procs.cpu_seconds(n.proc) for n in (a, b)}
        began = time.monotonic()
        done = subprocess.run(["ip", "netns", "exec", a.namespace, "iperf3", "-c", target,
                               "-t", str(args.seconds), "-J"], capture_output=True, text=True,
                              timeout=args.seconds + 30)
        wall = time.monotonic() - began
        cpu_after = {n.name: procs.cpu_seconds(n.proc) for n in (a, b)}
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    try:
        result = json.loads(done.stdout)
        sent = result["end"]["sum_sent"]
        received = result["end"]["sum_received"]
    except (ValueError, KeyError):
        raise LabError(f"iperf3 failed: {done.stdout[-300:]}{done.stderr[-300:]}") from None
    cpu = {}
    for name in (a.name, b.name):
        before, after = cpu_before[name], cpu_after[name]
        cpu[name] = None if before is None or after is None else 100 * (after - before) / wall
    out = console()
    out.print(f"{a.name} -> {b.name} over the mesh ({target}), TCP, {args.seconds:g}s:")
    out.print(f"  {received['bits_per_second'] / 1e6:.0f} Mbit/s received, "
              f"{sent.get('retransmits', 0)} retransmits")
    for name, value in cpu.items():
        shown = "n/a" if value is None else f"{value:.0f}% of one core"
        out.print(f"  {name} CPU: {shown}")
    return 0


# down, faults, kill/start, discovery -------------------------------------------------------


def down_command(args: argparse.Namespace) -> int:
    privileges.require_root("down")
    root = _root(args)
    targets = names(root) if args.all else [_record(args).name]
    code = 0
    for name in targets:
        record = load(root, name)
        problems = build.down(record)
        if problems:
            print(f"uspan lab down: {name}: " + "; ".join(problems), file=sys.stderr)
            code = 1
        else:
            print(f"lab {name} removed")
    return code


def cut_command(args: argparse.Namespace) -> int:
    privileges.require_root("cut")
    record = _record(args)
    with locked(record) as record:
        chosen = faults.cut(record, args.a, args.b, args.network)
    print(f"cut {args.a} <-> {args.b} on network{'s' if len(chosen) > 1 else ''} "
          + ", ".join(map(str, chosen)))
    return 0


def heal_command(args: argparse.Namespace) -> int:
    privileges.require_root("heal")
    record = _record(args)
    with locked(record) as record:
        healed = faults.heal(record, args.a, args.b, args.network)
    if not healed:
        print(f"no cut between {args.a} and {args.b} to heal")
    else:
        print(f"healed {args.a} <-> {args.b} on network{'s' if len(healed) > 1 else ''} "
              + ", ".join(map(str, sorted(set(healed)))))
    return 0


def netem_command(args: argparse.Namespace) -> int:
    privileges.require_root("netem")
    record = _record(args)
    netem_args = [] if args.clear else faults.netem_args(args.delay, args.jitter, args.loss)
    with locked(record) as record:
        chosen = faults.netem(record, args.node, args.network, netem_args)
    what = " ".join(netem_args) if netem_args else "cleared"
    print(f"netem on {args.node}, network{'s' if len(chosen) > 1 else ''} "
          f"{', '.join(map(str, chosen))}: {what}")
    return 0


def kill_command(args: argparse.Namespace) -> int:
    privileges.require_root("kill")
    record = _record(args)
    with locked(record) as record:
        node = record.node(args.node)
        build.stop_node(record, node, getattr(signal, f"SIG{args.signal}"))
    print(f"{node.name} stopped (SIG{args.signal})")
    return 0


def start_command(args: argparse.Namespace) -> int:
    privileges.require_root("start")
    record = _record(args)
    with locked(record) as record:
        node = record.node(args.node)
        build.start_node(record, node)
    if not node.wgo:
        from uspan.mesh.resources import KUBESPAN_IDENTITY
        from uspan.node.api import ApiClient, ApiError

        client = ApiClient(str(record.state_dir(node) / SOCKET_NAME))

        def ready() -> bool:
            if not procs.alive(node.proc):
                raise LabError(f"{node.name} exited; its log ends:\n"
                               + _tail(record.log_path(node), 10))
            try:
                _, found = trio.run(lambda: client.get(KUBESPAN_IDENTITY, None,
                                                       secrets=False))
                return bool(found)
            except ApiError:
                return False

        poll(ready, what=f"{node.name} to answer", timeout=30, interval=0.2)
    print(f"{node.name} started (pid {node.proc.pid if node.proc else '?'})")
    return 0


def discovery_command(args: argparse.Namespace) -> int:
    privileges.require_root("discovery")
    record = _record(args)
    with locked(record) as record:
        if args.action == "stop":
            if not procs.alive(record.discovery):
                raise LabError("the discovery service is not running")
            build.stop_discovery(record)
            print("discovery service stopped (its in-memory state is gone)")
        else:
            if procs.alive(record.discovery):
                raise LabError("the discovery service is already running")
            build.start_discovery(record)
            print("discovery service started")
    return 0


def agent_command(args: argparse.Namespace) -> int:
    record = _record(args)
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(wgo.run_agent, record)
    return 0
