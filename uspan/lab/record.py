"""The lab's persistent record and its directory.

Everything a lab creates is written to ``lab.json`` *before* it is created (an intent
log), so ``down`` removes all of it even after a crash halfway through ``up``, and only
that: a namespace, process or file is ours only if the record names it (processes by PID
and kernel start time, so a reused PID is never killed). Writes are atomic (temp file,
fsync, rename) and serialized by ``flock`` on the lab directory's ``lock`` file.

Layout of ``ROOT/NAME`` (mode 0700)::

    lab.json  lock  cluster.yaml  discovery.log  agent.log
    nodes/nI/config.yaml  nodes/nI/node.log  nodes/nI/state/  nodes/nI/run/wireguard/
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uspan import atomicfile, userpaths
from uspan.lab.plan import check_name

RECORD = "lab.json"
DEFAULT_NAME = "lab"


class LabError(RuntimeError):
    """A lab command cannot do what was asked; the message is one line for the user."""


def default_root() -> Path:
    """``$USPAN_LAB_ROOT``, else /var/lib/uspan/labs for root, or the user's own."""
    return userpaths.lab_root()


@dataclass
class Proc:
    """A process the lab started: killed only while PID and start time still match."""

    pid: int
    start: str | None
    argv: list[str]


@dataclass
class NodeRecord:
    name: str
    index: int
    kind: str  # "uspan" or "wireguard-go"
    nat: str | None  # behind its own router: "easy" or "hard" (plan.NAT_KINDS); None: not
    interface: str
    namespace: str
    router: str | None = None
    proc: Proc | None = None
    block_udp: bool = False  # its router drops every UDP datagram it would forward
    node_id: str | None = None  # wireguard-go nodes: the affiliate the agent publishes
    address: str | None = None  # wireguard-go nodes: their KubeSpan address

    @property
    def wgo(self) -> bool:
        return self.kind == "wireguard-go"


@dataclass
class LabRecord:
    name: str
    root: str
    networks: int
    mtu: int
    created: float = field(default_factory=time.time)
    namespaces: list[str] = field(default_factory=list)  # in creation order
    nodes: list[NodeRecord] = field(default_factory=list)
    discovery: Proc | None = None
    agent: Proc | None = None
    cuts: list[list[Any]] = field(default_factory=list)  # [a, b, network or None]
    netem: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> net -> args
    ready_seconds: float | None = None

    # Paths --------------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    def node_dir(self, node: NodeRecord) -> Path:
        return self.dir / "nodes" / node.name

    def state_dir(self, node: NodeRecord) -> Path:
        return self.node_dir(node) / "state"

    def config_path(self, node: NodeRecord) -> Path:
        return self.node_dir(node) / "config.yaml"

    def log_path(self, node: NodeRecord) -> Path:
        return self.node_dir(node) / "node.log"

    def run_dir(self, node: NodeRecord) -> Path:
        """Mounted over /run for the node's wireguard-go and ``lab exec``."""
        return self.node_dir(node) / "run"

    def uapi_path(self, node: NodeRecord) -> Path:
        return self.run_dir(node) / "wireguard" / f"{node.interface}.sock"

    # Lookup -------------------------------------------------------------------------------

    def node(self, name: str) -> NodeRecord:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise LabError(f"lab {self.name} has no node {name!r} (nodes: {known})")

    # Persistence --------------------------------------------------------------------------

    def save(self) -> None:
        atomicfile.write(self.dir / RECORD, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabRecord:
        nodes = [NodeRecord(**{**n, "proc": _proc(n.get("proc"))}) for n in data["nodes"]]
        return cls(**{**data, "nodes": nodes, "discovery": _proc(data.get("discovery")),
                      "agent": _proc(data.get("agent"))})


def _proc(value: dict[str, Any] | None) -> Proc | None:
    return None if value is None else Proc(**value)


def load(root: Path, name: str) -> LabRecord:
    check_name(name)
    path = root / name / RECORD
    try:
        record = LabRecord.from_json(json.loads(path.read_text()))
        _check_types(record)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise LabError(f"no lab named {name!r} in {root} (see `uspan lab list`)") from None
        raise LabError(f"{path}: unreadable lab record ({str(exc)[:200]!r})") from None
    record.root = str(root)  # the directory may have been moved with its root
    return record


def _check_types(record: LabRecord) -> None:
    """TypeError unless the fields every command relies on have their types (a record
    damaged by hand must give one line, not a traceback later; found by fuzz/labrecord.py)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise TypeError(f"{what} has the wrong type")

    def proc(value: Proc | None, what: str) -> None:
        need(value is None or (isinstance(value.pid, int) and isinstance(value.argv, list)
                               and isinstance(value.start, str | None)), what)

    need(isinstance(record.name, str) and isinstance(record.networks, int)
         and isinstance(record.mtu, int) and isinstance(record.created, int | float), "the lab")
    need(all(isinstance(n, str) for n in record.namespaces), "namespaces")
    need(isinstance(record.cuts, list) and isinstance(record.netem, dict), "faults")
    proc(record.discovery, "discovery")
    proc(record.agent, "agent")
    for node in record.nodes:
        need(all(isinstance(v, str) for v in (node.name, node.kind, node.interface,
                                              node.namespace))
             and isinstance(node.index, int) and isinstance(node.block_udp, bool)
             and all(isinstance(v, str | None) for v in (node.nat, node.router)),
             f"node {node.name!r}")
        proc(node.proc, f"node {node.name!r}")


def names(root: Path) -> list[str]:
    """The labs under ``root`` (directories holding a record), sorted."""
    try:
        return sorted(p.parent.name for p in root.glob(f"*/{RECORD}"))
    except OSError:
        return []


def resolve(root: Path, name: str | None) -> LabRecord:
    """The named lab, or the only one there is."""
    if name is not None:
        return load(root, name)
    found = names(root)
    if not found:
        raise LabError(f"no lab in {root}: start one with `uspan lab up`")
    if len(found) > 1:
        raise LabError(f"{len(found)} labs ({', '.join(found)}): choose one with --name")
    return load(root, found[0])


@contextlib.contextmanager
def locked(record: LabRecord) -> Iterator[LabRecord]:
    """Serialize changes to one lab (its record, its faults) between commands; yields the
    record as it is now, read under the lock, for a read-modify-write."""
    with (record.dir / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield load(Path(record.root), record.name)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
