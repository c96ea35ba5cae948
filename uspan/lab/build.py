"""``uspan lab up`` and ``down``: the namespaces, links, NAT routers, the discovery
service and the nodes, each recorded before it is made; and their removal."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from uspan.lab import plan, procs, wgo
from uspan.lab.record import LabError, LabRecord, NodeRecord, locked
from uspan.mesh.config import render_config
from uspan.testbed.process import NetnsError, poll, run

Say = Callable[[str], None]


def existing_namespaces() -> set[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ip_batch(namespace: str, lines: list[str]) -> None:
    run(["ip", "-n", namespace, "-batch", "-"], input="\n".join(lines) + "\n")


def in_ns(namespace: str, *argv: str, check: bool = True) -> str:
    return run(["ip", "netns", "exec", namespace, *argv], check=check).stdout


def add_namespace(record: LabRecord, name: str) -> None:
    record.namespaces.append(name)
    record.save()  # recorded first: `down` deletes it even if we die right now
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


# up ----------------------------------------------------------------------------------------


def create(root: Path, name: str, nodes: int, networks: int, nat: dict[str, str],
           wgo_count: int, mtu: int, block_udp: list[str] | None = None) -> LabRecord:
    """Check the request and make the lab's directory and record (nothing else yet).

    ``nat``: node -> NAT kind (``plan.NAT_KINDS``); ``block_udp``: nodes whose router
    drops all UDP (behind an easy NAT unless ``nat`` says otherwise)."""
    plan.check_name(name)
    plan.check_size(nodes, networks)
    if not 0 <= wgo_count <= nodes:
        raise LabError(f"--with-wireguard-go {wgo_count}: between 0 and --nodes ({nodes})")
    if mtu < 1280:
        raise LabError(f"--mtu {mtu}: at least 1280")
    valid = {plan.node_name(i) for i in range(1, nodes + 1)}
    block = set(block_udp or ())
    for flag, chosen in (("--nat", nat), ("--block-udp", block)):
        for node in chosen:
            if node not in valid:
                raise LabError(f"{flag} {node}: no such node (nodes are n1..n{nodes})")
    nat = {**dict.fromkeys(block, "easy"), **nat}
    exists = LabError(f"lab {name} exists in {root} (`uspan lab down --name {name}`, "
                      "or choose another --name)")
    # The lab itself first: its own namespaces are no stranger's.
    if (root / name).exists():
        raise exists
    prefix = plan.namespace_prefix(name)
    clash = sorted(n for n in existing_namespaces() if n.startswith(prefix))
    if clash:
        raise LabError(f"name clash: namespace {clash[0]} exists and is not lab {name}'s "
                       "(choose another --name)")
    root.mkdir(parents=True, exist_ok=True)
    try:
        (root / name).mkdir(mode=0o700)
    except FileExistsError:
        raise exists from None
    record = LabRecord(name=name, root=str(root), networks=networks, mtu=mtu)
    for i in range(1, nodes + 1):
        node_name = plan.node_name(i)
        kind = "wireguard-go" if i > nodes - wgo_count else "uspan"
        behind = node_name in nat
        record.nodes.append(NodeRecord(
            name=node_name, index=i, kind=kind, nat=nat.get(node_name),
            block_udp=node_name in block,
            interface=plan.interface(name, i), namespace=plan.namespace(name, node_name),
            router=plan.namespace(name, f"r{i}") if behind else None,
            node_id=wgo.new_node_id() if kind == "wireguard-go" else None))
    record.save()
    return record


def build(record: LabRecord, say: Say) -> None:
    """The switch, every node's namespace and links, the service, configs; no nodes yet."""
    sw = plan.namespace(record.name, "sw")
    add_namespace(record, sw)
    lines = []
    for k in range(record.networks):
        lines += [f"link add br{k} type bridge", f"link set br{k} up",
                  f"addr add {plan.v4(k, plan.SWITCH_HOST)}/24 dev br{k}"]
    ip_batch(sw, lines)
    for node in record.nodes:
        _node_links(record, node, sw)
    say(f"namespaces: {sw} and {len(record.nodes)} nodes on {record.networks} "
        f"network{'s' if record.networks > 1 else ''}")
    start_discovery(record)
    _write_configs(record)


def _node_links(record: LabRecord, node: NodeRecord, sw: str) -> None:
    add_namespace(record, node.namespace)
    i = node.index
    sw_lines, node_lines = [], []
    if node.router is None:
        for k in range(record.networks):
            port = plan.switch_port(i, k)
            sw_lines += [f"link add {port} type veth peer name eth{k} netns {node.namespace}",
                         f"link set {port} master br{k}", f"link set {port} up"]
            node_lines += [f"addr add {plan.v4(k, i)}/24 dev eth{k}",
                           f"addr add {plan.v6(k, i)}/64 dev eth{k} nodad",
                           f"link set eth{k} up"]
        ip_batch(sw, sw_lines)
        ip_batch(node.namespace, node_lines)
        return
    router = node.router
    add_namespace(record, router)
    router_lines = []
    for k in range(record.networks):
        port = plan.switch_port(i, k)
        sw_lines += [f"link add {port} type veth peer name out{k} netns {router}",
                     f"link set {port} master br{k}", f"link set {port} up"]
        router_lines += [f"addr add {plan.v4(k, i)}/24 dev out{k}", f"link set out{k} up"]
    router_lines += [f"link add in0 type veth peer name eth0 netns {node.namespace}",
                     f"addr add {plan.nat_inner(i, 1)}/24 dev in0", "link set in0 up"]
    ip_batch(sw, sw_lines)
    ip_batch(router, router_lines)
    ip_batch(node.namespace, [f"addr add {plan.nat_inner(i, 2)}/24 dev eth0",
                              "link set eth0 up",
                              f"route add default via {plan.nat_inner(i, 1)}"])
    in_ns(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    for k in range(record.networks):
        in_ns(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", f"out{k}",
              "-j", "MASQUERADE", *plan.NAT_KINDS[node.nat or "easy"])
        # What nobody inside asked for is dropped before conntrack keeps it, as a home
        # router's firewall does: kept, a peer's unanswered packet to the node's mapped
        # port would hold that port's tuple and push the node's own packets to that peer
        # onto another port, which the peer's NAT then refuses.
        in_ns(router, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", f"out{k}",
              "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
    if node.block_udp:
        in_ns(router, "iptables", "-A", "FORWARD", "-p", "udp", "-j", "DROP")


def discovery_endpoints(record: LabRecord) -> list[str]:
    return [f"{plan.v4(k, plan.SWITCH_HOST)}:{plan.DISCOVERY_PORT}"
            for k in range(record.networks)]


def relay_endpoint() -> str:
    """Where the lab's nodes meet when no direct path works (the discovery service on the
    switch, network 0; it always relays, the nodes use it when the lab needs it)."""
    return f"{plan.v4(0, plan.SWITCH_HOST)}:{plan.RELAY_PORT}"


def _write_configs(record: LabRecord) -> None:
    text = render_config(with_kubespan=True, discovery_endpoints=discovery_endpoints(record))
    _write_private(record.dir / "cluster.yaml", text)
    base = yaml.safe_load(text)
    # Only a node behind a hard NAT or without UDP needs the relay; the other labs keep
    # the paths they test (direct, punched) free of it.
    needs_relay = any(node.nat == "hard" or node.block_udp for node in record.nodes)
    for node in record.nodes:
        directory = record.node_dir(node)
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        record.state_dir(node).mkdir(mode=0o700, exist_ok=True)
        (record.run_dir(node) / "wireguard").mkdir(parents=True, mode=0o700, exist_ok=True)
        config = dict(base)
        config["kubespan"] = {**base["kubespan"], "interface": node.interface,
                              "mtu": record.mtu}
        if needs_relay:
            config["kubespan"]["relay"] = relay_endpoint()
        _write_private(record.config_path(node), yaml.safe_dump(config, sort_keys=False))
        if node.wgo:
            wgo.private_key(record, node)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


# processes ---------------------------------------------------------------------------------


def start_discovery(record: LabRecord) -> None:
    if procs.alive(record.discovery):
        return
    sw = plan.namespace(record.name, "sw")
    argv = ["ip", "netns", "exec", sw, procs.uspan_program(), "discovery-service",
            "--listen", f"0.0.0.0:{plan.DISCOVERY_PORT}", "--relay", relay_endpoint()]
    record.discovery = procs.spawn(argv, record.dir / "discovery.log")
    record.save()

    def listening() -> bool:
        if not procs.alive(record.discovery):
            raise LabError(f"the discovery service exited; see {record.dir}/discovery.log")
        out = in_ns(sw, "ss", "-Htln", f"sport = :{plan.DISCOVERY_PORT}", check=False)
        return bool(out.strip())

    poll(listening, what="the discovery service", timeout=20, interval=0.1)


def stop_discovery(record: LabRecord) -> None:
    procs.stop(record.discovery)
    record.discovery = None
    record.save()


def start_node(record: LabRecord, node: NodeRecord) -> None:
    """Start a node in the background (not waiting for it to be ready)."""
    if procs.alive(node.proc):
        raise LabError(f"{node.name} is already running (pid {node.proc.pid if node.proc else 0})")
    log = record.log_path(node)
    with log.open("a") as out:
        out.write(f"--- uspan lab: starting {node.name} at {time.strftime('%H:%M:%S')} ---\n")
    if node.wgo:
        program = wgo.require_wireguard_go()
        record.uapi_path(node).unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", node.namespace, "sh", "-c",
                'mount --bind "$0" /run && exec "$1" -f "$2"', str(record.run_dir(node)),
                program, node.interface]
        node.proc = procs.spawn(argv, log, env={**os.environ, "LOG_LEVEL": "info"})
        record.save()
        _configure_wgo(record, node)
        return
    argv = ["ip", "netns", "exec", node.namespace, procs.uspan_program(), "run",
            "--config", str(record.config_path(node)), "--state-dir",
            str(record.state_dir(node)), "--hostname", node.name,
            "--uapi-socket", str(record.uapi_path(node)), "--log-level", "info"]
    node.proc = procs.spawn(argv, log)
    record.save()


def _configure_wgo(record: LabRecord, node: NodeRecord) -> None:
    path = record.uapi_path(node)

    def ready() -> bool:
        if not procs.alive(node.proc):
            raise LabError(f"{node.name}: wireguard-go exited; see {record.log_path(node)}")
        return path.exists()

    poll(ready, what=f"{node.name}'s UAPI socket", timeout=10, interval=0.05)
    wgo.configure_device(record, node)
    config = wgo.cluster_config(record)
    address = wgo.kubespan_address(config, wgo.public_key(wgo.private_key(record, node)))
    node.address = str(address)
    record.save()
    ip_batch(node.namespace, [f"addr add {address}/64 dev {node.interface} nodad",
                              f"link set {node.interface} mtu {record.mtu} up"])


def start_agent(record: LabRecord) -> None:
    if not any(n.wgo for n in record.nodes) or procs.alive(record.agent):
        return
    sw = plan.namespace(record.name, "sw")
    argv = ["ip", "netns", "exec", sw, procs.uspan_program(), "lab", "agent", "--root",
            record.root, "--name", record.name]
    record.agent = procs.spawn(argv, record.dir / "agent.log")
    record.save()


def stop_node(record: LabRecord, node: NodeRecord, sig: signal.Signals) -> None:
    if not procs.alive(node.proc):
        raise LabError(f"{node.name} is not running")
    procs.stop(node.proc, sig)
    node.proc = None
    record.save()


# down --------------------------------------------------------------------------------------


def down(record: LabRecord) -> list[str]:
    """Stop our processes, delete our namespaces, remove the lab directory; problems."""
    problems: list[str] = []
    with locked(record):
        running = [p for p in [record.agent, *[n.proc for n in record.nodes],
                               record.discovery] if procs.alive(p)]
        for proc in running:  # all at once: they stop in parallel
            with contextlib.suppress(ProcessLookupError):
                assert proc is not None
                os.kill(proc.pid, signal.SIGTERM)
        for proc in running:
            try:
                procs.stop(proc)
            except LabError as exc:
                problems.append(str(exc))
        present = existing_namespaces()
        ours = [n for n in record.namespaces if n in present]
        for namespace in ours:  # whatever still runs inside our namespaces is ours
            out = run(["ip", "netns", "pids", namespace], check=False).stdout
            for pid in out.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for namespace in reversed(ours):
            try:
                run(["ip", "netns", "del", namespace])
            except NetnsError as exc:
                problems.append(str(exc))
    if not problems:
        shutil.rmtree(record.dir, ignore_errors=True)
    return problems
