"""kill -9 without loss: the discovery service (with its state file), a node, and both at
once, at random moments and inside state writes.

To land kills inside writes on purpose, the process runs under ``strace`` injecting a
delay into every fsync (``-e inject=fsync:delay_enter=...``): the real syscall, made slow,
so a state write (a log append, a snapshot, an identity file) is in progress for most of
the process's life; strace's own log then shows which kills interrupted an fsync. (kill -9
cannot tear a ``write`` on Linux; torn files from power cuts are tested byte by byte in
tests/unit/test_discovery_persist.py.)
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system.meshnet import SERVICE, SERVICE_PORT, USPAN, Mesh, MeshNode
from uspan.testbed import Lab, Namespace, poll

pytestmark = pytest.mark.system

CONVERGENCE = 30.0  # seconds from restart to every pair up (the mesh tests' target)
FSYNC_DELAY_US = 40_000


def _strace(log: Path, delay_us: int = FSYNC_DELAY_US) -> list[str]:
    return ["strace", "-f", "-qq", "-e", "signal=none", "-o", str(log), "-e",
            "trace=fsync,fdatasync", "-e", f"inject=fsync,fdatasync:delay_enter={delay_us}"]


def _traced_child(tracer: subprocess.Popen[bytes]) -> int:
    """The uspan process strace runs (strace forks probes of its own first)."""

    def child() -> int | None:
        proc = Path(f"/proc/{tracer.pid}")
        try:
            for pid in proc.joinpath("task", str(tracer.pid), "children").read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "uspan":
                    return int(pid)
        except OSError:
            pass
        return None

    pid = poll(child, what="strace's child", timeout=10, interval=0.01)
    assert pid is not None
    return pid


# fsync and fdatasync, as /proc/PID/task/TID/syscall numbers them.
_FSYNC_CALLS = {"x86_64": ("74", "75"), "aarch64": ("82", "83")}.get(platform.machine(), ())


def _in_fsync(pid: int) -> bool:
    """Is a thread of ``pid`` inside fsync or fdatasync now (held at its entry by strace's
    delay)? Seeing the temporary file is not enough: a node descheduled between creating
    it and its fsync was killed before the fsync under CI load."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            number = task.joinpath("syscall").read_text().split(maxsplit=1)[0]
        except (OSError, IndexError):
            continue
        if number in _FSYNC_CALLS:
            return True
    return False


def _killed_in_fsync(log: Path) -> bool:
    """Did the kill land while a thread was inside fsync? strace shows a call that never
    returned as ``= ?`` (or ``<unfinished ...>`` never resumed)."""
    inside: dict[str, bool] = {}
    for line in log.read_text(errors="replace").splitlines():
        tid, _, call = line.partition(" ")
        if "fsync(" in call or "resumed>" in call:
            inside[tid] = call.rstrip().endswith(("= ?", "<unfinished ...>"))
    return any(inside.values())


# --- the discovery service -----------------------------------------------------------------

# Updates from 8 tasks at once, each a new affiliate; prints the IDs the service acknowledged.
UPDATER = r"""
import sys, trio
from uspan.discovery.client import DiscoveryClient, DiscoveryError
service, out = sys.argv[1:]
async def writer(task, log):
    i = 0
    async with DiscoveryClient([service], "kill9", bytes(range(32)), attempts=1,
                               backoff_max=0.2) as client:
        while True:
            aid = f"t{task}-{i}"
            try:
                await client.update_blobs(aid, b"data of " + aid.encode(), [b"e" * 28], 1800)
            except DiscoveryError:
                await trio.sleep(0.05)
                continue
            log.write(aid + "\n")
            log.flush()
            i += 1
async def main():
    with open(out, "a") as log:
        async with trio.open_nursery() as nursery:
            for task in range(8):
                nursery.start_soon(writer, task, log)
trio.run(main)
"""

LISTER = r"""
import json, sys, trio
from uspan.discovery.client import DiscoveryClient
async def main():
    async with DiscoveryClient([sys.argv[1]], "kill9", bytes(range(32))) as client:
        print(json.dumps({r["id"]: r["data"].decode() for r in await client.list_raw()}))
trio.run(main)
"""


class Service:
    def __init__(self, ns: Namespace, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.state = tmp / "state" / "discovery.state"
        self.state.parent.mkdir(mode=0o700)
        self.log = tmp / "discovery.log"
        self.runs = 0
        self.tracer: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self) -> None:
        self.runs += 1
        trace = self.tmp / f"strace.{self.runs}"
        with self.log.open("ab") as log:
            self.tracer = self.ns.spawn(
                *_strace(trace), USPAN, "discovery-service", "--listen",
                f"{SERVICE}:{SERVICE_PORT}", "--state-file", str(self.state),
                "--rate-limit", "100000/100000", stdout=log.fileno(), stderr=subprocess.STDOUT)
        self.pid = _traced_child(self.tracer)
        self.ns.wait_listening(SERVICE_PORT, timeout=20)

    def kill9(self) -> bool:
        """SIGKILL the service itself; True if it was inside an fsync."""
        assert self.tracer is not None
        os.kill(self.pid, signal.SIGKILL)
        self.tracer.wait(10)
        return _killed_in_fsync(self.tmp / f"strace.{self.runs}")


def test_discovery_service_kill9_loses_nothing_it_acknowledged(lab: Lab, tmp_path: Path) -> None:
    """Writers keep updating while the service is killed 15 times at random moments: every
    update it acknowledged (``ok`` comes after the log record's fsync) is there after."""
    ns = lab.namespace("disc")
    ns.ip("link", "set", "lo", "up")
    ns.ip("addr", "add", f"{SERVICE}/32", "dev", "lo")
    service = Service(ns, tmp_path)
    service.start()
    acked = tmp_path / "acked.txt"
    writer = ns.spawn(sys.executable, "-c", UPDATER, f"{SERVICE}:{SERVICE_PORT}", str(acked))
    rng = random.Random()
    in_fsync = 0
    kills = 15
    for _ in range(kills):
        time.sleep(rng.uniform(0.1, 1.2))
        in_fsync += service.kill9()
        service.start()
    time.sleep(1.0)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    service.kill9()  # once more, with writes surely done: then what is on disk is all
    service.start()
    stored = json.loads(ns.run(sys.executable, "-c", LISTER, f"{SERVICE}:{SERVICE_PORT}",
                               timeout=60).stdout)
    ids = acked.read_text().split()
    assert len(ids) > 50, f"only {len(ids)} updates acknowledged: the test did not load"
    lost = [aid for aid in ids if stored.get(aid) != f"data of {aid}"]
    assert not lost, f"{len(lost)} of {len(ids)} acknowledged updates lost: {lost[:10]}"
    # The kills were meant to land inside state writes: most do, with fsync made slow.
    assert in_fsync >= kills // 3, f"only {in_fsync} of {kills} kills landed in an fsync"
    print(f"{len(ids)} acknowledged updates, all kept; {in_fsync}/{kills} kills inside fsync")


# --- a node ------------------------------------------------------------------------------


def test_node_kill9_while_writing_its_identity(lab: Lab, tmp_path: Path) -> None:
    """A node killed while it writes each identity file (first start) starts again, and a
    node killed at random moments keeps its identity: the files are whole or absent."""
    if not _FSYNC_CALLS:  # else the wait for the fsync would time out, saying nothing
        pytest.skip(f"fsync's syscall number on {platform.machine()} is not listed here")
    mesh = Mesh(lab, tmp_path, 1)
    node = mesh.nodes[0]
    trace = tmp_path / "node.strace"
    for temp_prefix in (".node-identity.yaml.", ".kubespan-identity.yaml."):
        with node.log_path.open("ab") as log:
            tracer = node.ns.spawn(
                *_strace(trace, 1_000_000), USPAN, "run", "--config", str(node.config_path),
                "--state-dir", str(node.state_dir), "--hostname", node.name,
                stdout=log.fileno(), stderr=subprocess.STDOUT)
        pid = _traced_child(tracer)

        def writing(prefix: str = temp_prefix, pid: int = pid) -> bool:
            return (any(p.name.startswith(prefix) for p in node.state_dir.iterdir())
                    and _in_fsync(pid))

        poll(writing, what=f"{temp_prefix}* in its fsync (an identity write)", timeout=30,
             interval=0.01)
        os.kill(pid, signal.SIGKILL)
        tracer.wait(10)
        assert _killed_in_fsync(trace), "the kill missed the identity's fsync"
    node.start()
    first = node.identity()
    for identity_file in ("node-identity.yaml", "kubespan-identity.yaml"):
        assert (node.state_dir / identity_file).read_text().count("\n") == 1
    rng = random.Random()
    for _ in range(5):
        time.sleep(rng.uniform(0.0, 1.5))
        node.stop("KILL")
        node.start()
        assert node.identity()["publicKey"] == first["publicKey"]
        assert node.identity()["address"] == first["address"]


# --- the mesh ------------------------------------------------------------------------------


def _kill9_and_back(mesh: Mesh, nodes: list[MeshNode], service: bool) -> float:
    for node in nodes:
        node.stop("KILL")
    if service:
        mesh.stop_service()  # SIGKILL (Popen.kill)
        mesh.start_service("--state-file", str(mesh.tmp / "state" / "discovery.state"))
    started = time.monotonic()
    for node in nodes:
        node.start()
    mesh.wait_full_mesh(timeout=CONVERGENCE)
    return time.monotonic() - started


def test_mesh_back_after_kill9_of_a_node_the_service_and_both(lab: Lab, tmp_path: Path) -> None:
    """Three nodes and a service with a state file: kill -9 of n1, of the service, and of
    both at once; each time the mesh is whole again within CONVERGENCE, with the same
    identities, and the service remembers every affiliate it had."""
    (tmp_path / "state").mkdir(mode=0o700)
    mesh = Mesh(lab, tmp_path, 3)
    mesh.stop_service()
    state = tmp_path / "state" / "discovery.state"
    mesh.start_service("--state-file", str(state))
    for node in mesh.nodes:
        node.start()
    mesh.wait_full_mesh(timeout=CONVERGENCE)
    keys = {n.name: n.identity()["publicKey"] for n in mesh.nodes}
    n1 = mesh.nodes[0]
    times = {
        "n1": _kill9_and_back(mesh, [n1], service=False),
        "service": _kill9_and_back(mesh, [], service=True),
        "both": _kill9_and_back(mesh, [n1], service=True),
    }
    assert {n.name: n.identity()["publicKey"] for n in mesh.nodes} == keys
    # The service, killed with the nodes' affiliates on disk, lists them all after restart.
    mesh.stop_service()
    for node in mesh.nodes:
        node.stop("KILL")  # nobody republishes: what the service lists, it kept
    mesh.start_service("--state-file", str(state))
    loaded = mesh.service_log.read_text().rsplit("state loaded from", 1)[1].splitlines()[0]
    assert ": 1 clusters, 3 affiliates" in loaded, loaded
    print("back within (s):", {k: round(v, 1) for k, v in times.items()})
