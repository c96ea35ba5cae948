"""Faults on demand: cut and heal the underlay between two nodes (iptables DROP rules in
their namespaces, or in their NAT routers, on the links to one network or all, tagged
so ``heal`` removes exactly them) and tc netem on a node's underlay links."""

from __future__ import annotations

from dataclasses import dataclass

from uspan.lab import plan
from uspan.lab.record import LabError, LabRecord, NodeRecord
from uspan.testbed.process import run


@dataclass(frozen=True)
class Underlay:
    """Where a node's traffic to network ``k`` can be filtered: its namespace (or its
    router's), the chains, and the device facing that network."""

    namespace: str
    out_chain: str
    in_chain: str
    device: str
    v6: bool


def underlay(node: NodeRecord, k: int) -> Underlay:
    if node.router is not None:
        return Underlay(node.router, "FORWARD", "FORWARD", f"out{k}", False)
    return Underlay(node.namespace, "OUTPUT", "INPUT", f"eth{k}", True)


def networks(record: LabRecord, network: int | None) -> list[int]:
    if network is None:
        return list(range(record.networks))
    if not 0 <= network < record.networks:
        raise LabError(f"--network {network}: lab {record.name} has networks 0.."
                       f"{record.networks - 1}")
    return [network]


def _tag(a: str, b: str, k: int) -> str:
    return f"uspan-lab-cut-{a}-{b}-{k}"


def _iptables(namespace: str, v6: bool, *args: str, check: bool = True) -> str:
    tool = "ip6tables" if v6 else "iptables"
    return run(["ip", "netns", "exec", namespace, tool, "-w", *args], check=check).stdout


def _pair(record: LabRecord, a: str, b: str) -> tuple[NodeRecord, NodeRecord]:
    first, second = record.node(a), record.node(b)
    if first is second:
        raise LabError(f"cut {a} {b}: two different nodes, please")
    return first, second


def cut(record: LabRecord, a: str, b: str, network: int | None) -> list[int]:
    """Drop underlay traffic between ``a`` and ``b`` on one network or all of them."""
    first, second = _pair(record, a, b)
    chosen = networks(record, network)
    for k in chosen:
        if [a, b, k] in record.cuts or [b, a, k] in record.cuts:
            continue
        for node, other in ((first, second), (second, first)):
            where = underlay(node, k)
            seen = plan.visible(other.index, k, other.nat is not None)
            tag = _tag(a, b, k)
            targets = [(False, seen.v4)]
            if where.v6 and seen.v6 is not None:
                targets.append((True, seen.v6))
            for v6, address in targets:
                # Dropped where it arrives (each end drops what comes from the other), as
                # a network would lose it: a DROP in OUTPUT would fail the sender's
                # sendmsg with EPERM, which no real cut does. A router forwards, so it
                # drops in both directions in FORWARD.
                if where.out_chain == "FORWARD":
                    _iptables(where.namespace, v6, "-I", where.out_chain, "-o", where.device,
                              "-d", address, "-m", "comment", "--comment", tag, "-j", "DROP")
                _iptables(where.namespace, v6, "-I", where.in_chain, "-i", where.device,
                          "-s", address, "-m", "comment", "--comment", tag, "-j", "DROP")
        record.cuts.append([a, b, k])
    record.save()
    return chosen


def heal(record: LabRecord, a: str, b: str, network: int | None) -> list[int]:
    """Remove the cuts between ``a`` and ``b`` (on one network or all)."""
    first, second = _pair(record, a, b)
    healed = []
    for k in networks(record, network):
        for x, y in ((a, b), (b, a)):
            if [x, y, k] not in record.cuts:
                continue
            tag = _tag(x, y, k)
            for node in (first, second):
                where = underlay(node, k)
                for v6 in (False, True) if where.v6 else (False,):
                    rules = _iptables(where.namespace, v6, "-S", check=False).splitlines()
                    for rule in rules:
                        if f'"{tag}"' in rule or f" {tag} " in f"{rule} ":
                            _iptables(where.namespace, v6, "-D", *rule.split()[1:],
                                      check=False)
            record.cuts.remove([x, y, k])
            healed.append(k)
    record.save()
    return healed


def netem(record: LabRecord, name: str, network: int | None, args: list[str]) -> list[int]:
    """``tc netem ARGS`` on what ``name`` sends to each chosen network; [] clears.

    Kernels without ``sch_netem`` (some VM kernels) get loss alone through an iptables
    ``statistic`` rule that drops that share of what the node receives there; delay and
    jitter then fail with a one-line error."""
    node = record.node(name)
    chosen = networks(record, network)
    settings = record.netem.setdefault(name, {})
    for k in chosen:
        where = underlay(node, k)
        tag = f"uspan-lab-netem-{name}-{k}"
        _clear_loss_rules(where, tag)
        run(["ip", "netns", "exec", where.namespace, "tc", "qdisc", "del", "dev",
             where.device, "root"], check=False)
        settings.pop(str(k), None)
        if not args:
            continue
        done = run(["ip", "netns", "exec", where.namespace, "tc", "qdisc", "replace", "dev",
                    where.device, "root", "netem", *args], check=False)
        if done.returncode == 0:
            settings[str(k)] = " ".join(args)
            continue
        if "unknown" not in done.stderr or args[0] != "loss" or len(args) != 2:
            raise LabError(f"tc netem: {done.stderr.strip() or 'failed'}"
                           + (" (this kernel has no sch_netem: only --loss works here)"
                              if "unknown" in done.stderr else ""))
        probability = float(args[1].rstrip("%")) / 100
        for v6 in (False, True) if where.v6 else (False,):
            _iptables(where.namespace, v6, "-I", where.in_chain, "-i", where.device, "-m",
                      "statistic", "--mode", "random", "--probability", f"{probability:.4f}",
                      "-m", "comment", "--comment", tag, "-j", "DROP")
        settings[str(k)] = f"loss {args[1]} (iptables, on receipt)"
    if not settings:
        record.netem.pop(name, None)
    record.save()
    return chosen


def _clear_loss_rules(where: Underlay, tag: str) -> None:
    for v6 in (False, True) if where.v6 else (False,):
        for rule in _iptables(where.namespace, v6, "-S", check=False).splitlines():
            if f" {tag} " in f"{rule} " or f'"{tag}"' in rule:
                _iptables(where.namespace, v6, "-D", *rule.split()[1:], check=False)


def netem_args(delay: str | None, jitter: str | None, loss: str | None) -> list[str]:
    args: list[str] = []
    if delay is not None:
        args += ["delay", delay]
        if jitter is not None:
            args.append(jitter)
    elif jitter is not None:
        raise LabError("--jitter needs --delay")
    if loss is not None:
        args += ["loss", loss]
    if not args:
        raise LabError("netem: give --delay, --loss (and --jitter), or --clear")
    return args
