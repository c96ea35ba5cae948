"""Soak: a 3-node lab mesh under steady traffic for an hour (``--minutes``), across
rekeys (every 120 s per link), with the discovery service restarted and one node
restarted along the way. It checks what only time shows:

- no stall: no gap over 1 s between two packets of a stream, except while the soak
  itself paused the traffic or a stream's node was down (that outage is reported);
- RSS flat after warm-up, and no file descriptor growth, per node process;
- both ends of every link agree: between two quiet checkpoints (traffic paused, nothing
  in flight) what A's WireGuard counted as sent to B is what B counted as received from A.

It drives ``uspan lab`` exactly as a user would (its own lab name and root, removed at
the end, also on Ctrl-C), prints a summary and plots throughput and RSS to a PNG.
Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchError, terminate_as_interrupt
from uspan.daemon.uapi_client import UapiClientError, request
from uspan.lab.record import LabRecord, load

USPAN = str(Path(sys.executable).parent / "uspan")
REPO = Path(__file__).resolve().parent.parent
QUIET = 3.0  # seconds of paused traffic before a counter checkpoint
RSS_GROWTH_MIB = 8.0  # allowed RSS growth of a process after its warm-up
STALL = 1.0


@dataclass
class Sample:
    t: float
    node: str
    pid: int
    rss_mib: float
    fds: int


@dataclass
class Run:
    lab: str
    root: Path
    start: float = field(default_factory=time.time)
    events: list[tuple[float, str]] = field(default_factory=list)
    pauses: list[tuple[float, float]] = field(default_factory=list)
    down: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    handshakes: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    checkpoints: list[tuple[float, dict[tuple[str, str], tuple[int, int]]]] = field(
        default_factory=list)

    def lab_cmd(self, *argv: str) -> str:
        done = subprocess.run([USPAN, "lab", *argv, "--name", self.lab, "--root",
                               str(self.root)], capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise BenchError(f"uspan lab {' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def record(self) -> LabRecord:
        return load(self.root, self.lab)

    def event(self, text: str) -> None:
        self.events.append((time.time(), text))
        print(f"[{time.time() - self.start:7.0f}s] {text}", flush=True)


def _uapi(record: LabRecord, name: str) -> dict[str, tuple[int, int, int]]:
    """Peer public key (hex) -> (last handshake s, rx bytes, tx bytes) of node ``name``."""
    fields: dict[str, dict[str, int]] = {}
    current: dict[str, int] = {}
    for line in request(record.uapi_path(record.node(name)), "get=1\n\n"):
        k, _, v = line.partition("=")
        if k == "public_key":
            current = fields.setdefault(v, {})
        elif k in ("last_handshake_time_sec", "rx_bytes", "tx_bytes"):
            current[k] = int(v)
    peers = {key: (f.get("last_handshake_time_sec", 0), f.get("rx_bytes", 0),
                   f.get("tx_bytes", 0)) for key, f in fields.items()}
    return peers


def _keys(run: Run) -> dict[str, str]:
    """Hex public key -> node name, from the nodes' status."""
    status = json.loads(run.lab_cmd("status", "-o", "json", "--no-rtt"))
    return {base64.b64decode(n["publicKey"]).hex(): n["name"] for n in status["nodes"]}


def _proc_sample(run: Run, record: LabRecord) -> None:
    for node in record.nodes:
        if node.proc is None:
            continue
        pid = node.proc.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        rss = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS"))
        run.samples.append(Sample(time.time(), node.name, pid, rss / 1024, fds))


def _poll(run: Run, keys: dict[str, str]) -> dict[tuple[str, str], tuple[int, int]]:
    """Sample RSS/fds and handshakes; (node, peer) -> (rx, tx) now."""
    record = run.record()
    _proc_sample(run, record)
    counters = {}
    for node in record.nodes:
        try:
            peers = _uapi(record, node.name)
        except UapiClientError:
            continue  # restarting
        for key, (hs, rx, tx) in peers.items():
            pair = (node.name, keys.get(key, key[:8]))
            if hs:
                run.handshakes.setdefault(tuple(sorted(pair)), set()).add(hs)  # type: ignore[arg-type]
            counters[pair] = (rx, tx)
    return counters


def _checkpoint(run: Run, keys: dict[str, str], pause: Path) -> None:
    began = time.time()
    pause.touch()
    time.sleep(QUIET)
    run.checkpoints.append((time.time(), _poll(run, keys)))
    pause.unlink()
    run.pauses.append((began, time.time()))


def _wait(run: Run, keys: dict[str, str], until: float, every: float) -> None:
    while time.time() < until:
        _poll(run, keys)
        time.sleep(max(0.0, min(every, until - time.time())))


def soak(args: argparse.Namespace) -> int:
    run = Run(args.lab or f"soak{os.getpid()}", Path(tempfile.mkdtemp(prefix="uspan-soak-")))
    duration = args.minutes * 60
    agents: list[subprocess.Popen[bytes]] = []
    work = run.root / "traffic"
    work.mkdir()
    pause = work / "PAUSE"
    try:
        run.event("lab up")
        run.lab_cmd("up", "--nodes", "3")
        record = run.record()
        keys = _keys(run)
        status = json.loads(run.lab_cmd("status", "-o", "json", "--no-rtt"))
        address = {n["name"]: n["address"] for n in status["nodes"]}
        for node in record.nodes:
            peers = [f"--peer={n}={a}" for n, a in address.items() if n != node.name]
            agents.append(subprocess.Popen(
                ["ip", "netns", "exec", node.namespace, sys.executable, "-m",
                 "bench.soaktraffic", "--name", node.name, "--out",
                 str(work / f"{node.name}.jsonl"), "--rate", str(args.rate), *peers],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}))
        run.start = time.time()
        run.event(f"traffic started: {args.rate:g} packets/s of 1200 bytes per direction")
        plan = [(0.3, "discovery"), (0.55, "node")]
        checkpoints = [0.15, 0.45, 0.7, 0.85, 1.0]
        for at in sorted({*checkpoints, *(p for p, _ in plan)}):
            _wait(run, keys, run.start + at * duration, args.every)
            if at in checkpoints:
                _checkpoint(run, keys, pause)
            for _, what in (p for p in plan if p[0] == at):
                if what == "discovery":
                    run.event("discovery service stop")
                    run.lab_cmd("discovery", "stop")
                    time.sleep(5)
                    run.lab_cmd("discovery", "start")
                    run.event("discovery service started")
                else:
                    down = time.time()
                    run.event("n3 stop (SIGTERM)")
                    run.lab_cmd("kill", "n3")
                    time.sleep(2)
                    run.lab_cmd("start", "n3")
                    run.down["n3"] = [(down, time.time())]
                    run.event("n3 started")
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=10)
        subprocess.run([USPAN, "lab", "down", "--name", run.lab, "--root", str(run.root)],
                       capture_output=True, timeout=120)
    run.event("lab down")
    return report(run, work, args)


def _reports(work: Path) -> list[dict[str, object]]:
    lines = []
    for path in sorted(work.glob("*.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


def report(run: Run, work: Path, args: argparse.Namespace) -> int:
    """Print the summary, draw the PNG; 1 if a check failed."""
    lines = _reports(work)
    failed: list[str] = []
    span = run.events[-1][0] - run.start

    # Stalls: gaps not inside a pause, and not on a stream of a node that was down (the
    # node's outage: from its stop to the first packet after its start, reported).
    def overlaps(a: float, b: float, windows: list[tuple[float, float]]) -> bool:
        return any(a < y + STALL and b > x - STALL for x, y in windows)

    stalls, outages = [], []
    for line in lines:
        for src, a, b in line["gaps"]:  # type: ignore[attr-defined]
            dst = str(line["node"])
            down = [(x, y + 30) for n in (src, dst) for x, y in run.down.get(n, [])]
            if overlaps(a, b, run.pauses):
                continue
            (outages if overlaps(a, b, down) else stalls).append((src, dst, a, b))
    # Loss per stream over the run.
    last: dict[str, dict[str, dict[str, int]]] = {}
    for line in lines:
        last[line["node"]] = {"sent": line["sent"], "received": line["received"]}  # type: ignore[index,dict-item]
    streams = []
    for dst, v in last.items():
        for src, got in v["received"].items():
            sent = last.get(src, {}).get("sent", {}).get(dst, 0)
            streams.append((src, dst, sent, got))
    # Handshakes (rekeys) per link.
    rekeys = {"-".join(k): len(v) for k, v in sorted(run.handshakes.items())}
    # Counters between consecutive checkpoints, both ends of each link.
    mismatches = []
    for (t0, c0), (t1, c1) in zip(run.checkpoints, run.checkpoints[1:], strict=False):
        for (a, b), (_rx, tx0) in c0.items():
            if any(t0 <= x <= t1 for n in (a, b) for x, _ in run.down.get(n, [])):
                continue  # a restarted node's counters start again from zero
            if (b, a) not in c0 or (a, b) not in c1 or (b, a) not in c1:
                continue
            sent = c1[(a, b)][1] - tx0
            got = c1[(b, a)][0] - c0[(b, a)][0]
            if abs(sent - got) > 256:  # a keepalive may cross between the two reads
                mismatches.append(f"{a}->{b}: sent {sent} B, received {got} B")
    # RSS and fds per process after warm-up.
    warm = args.warmup * 60
    growth = []
    for node in sorted({s.node for s in run.samples}):
        for pid in sorted({s.pid for s in run.samples if s.node == node}):
            series = [s for s in run.samples if s.pid == pid]
            after = [s for s in series if s.t >= series[0].t + warm]
            if len(after) < 4:
                continue
            q = max(1, len(after) // 10)
            rss0 = sorted(s.rss_mib for s in after[:q])[q // 2]
            rss1 = sorted(s.rss_mib for s in after[-q:])[q // 2]
            fd0, fd1 = after[0].fds, max(s.fds for s in after[-q:])
            growth.append((node, pid, rss0, rss1, fd0, fd1,
                           (after[-1].t - after[0].t) / 60))
    print()
    print(f"soak {run.lab}: {span / 60:.1f} min of traffic, 3 nodes, "
          f"{args.rate:g} packets/s per direction per link")
    for when, what in run.events:
        print(f"  {when - run.start:7.0f}s  {what}")
    print("handshakes seen per link (rekeys + restart handshakes): "
          + ", ".join(f"{k} {v}" for k, v in rekeys.items())
          + f"; total {sum(rekeys.values())}")
    print(f"stalls > {STALL:g}s: {len(stalls)}")
    for src, dst, a, b in stalls[:20]:
        print(f"  ! {src}->{dst}: {b - a:.2f}s at {a - run.start:.0f}s")
    if stalls:
        failed.append(f"{len(stalls)} stalls")
    for src, dst, a, b in outages:
        print(f"  restart outage {src}->{dst}: {b - a:.2f}s at {a - run.start:.0f}s")
    for src, dst, sent, got in sorted(streams):
        print(f"  stream {src}->{dst}: {sent} sent, {got} received "
              f"({100 * (sent - got) / max(sent, 1):.3f}% lost)")
    print(f"counter checkpoints: {len(run.checkpoints)}, mismatches: {len(mismatches)}")
    for m in mismatches:
        print(f"  ! {m}")
    if mismatches:
        failed.append("counter mismatch")
    for node, pid, rss0, rss1, fd0, fd1, minutes in growth:
        verdict = ""
        if rss1 - rss0 > RSS_GROWTH_MIB:
            verdict += " RSS GROWTH"
            failed.append(f"{node} RSS growth")
        if fd1 > fd0:
            verdict += " FD GROWTH"
            failed.append(f"{node} fd growth")
        print(f"  {node} pid {pid}: RSS {rss0:.1f} -> {rss1:.1f} MiB, fds {fd0} -> {fd1} "
              f"over {minutes:.0f} min after warm-up{verdict}")
    if not growth:
        failed.append("no process ran past its warm-up")
    if args.png:
        plot(run, lines, args.png)
        print(f"plot: {args.png}")
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")
    return 1 if failed else 0


def plot(run: Run, lines: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_second: dict[int, int] = {}
    for line in lines:
        sec = int(float(line["t"]) - run.start)  # type: ignore[arg-type]
        per_second[sec] = per_second.get(sec, 0) + sum(line["rx"].values())  # type: ignore[attr-defined]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    xs = sorted(per_second)
    ax1.plot([x / 60 for x in xs], [per_second[x] * 8 / 1e6 for x in xs], lw=0.6)
    ax1.set_ylabel("received over the mesh\n(Mbit/s, all links)")
    for node in sorted({s.node for s in run.samples}):
        pts = [s for s in run.samples if s.node == node]
        ax2.plot([(s.t - run.start) / 60 for s in pts], [s.rss_mib for s in pts], label=node)
    ax2.set_ylabel("RSS (MiB)")
    ax2.set_ylim(0, max(s.rss_mib for s in run.samples) * 1.25)
    for i, (a, b) in enumerate(run.pauses):  # the soak's own pauses, for the checkpoints
        ax1.axvspan((a - run.start) / 60, (b - run.start) / 60, color="grey", alpha=0.2,
                    label=None if i else "traffic paused: counter checkpoint")
    if run.pauses:
        ax1.legend(loc="lower left")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="lower right")
    for when, what in run.events:
        if "stop" in what:
            for ax in (ax1, ax2):
                ax.axvline((when - run.start) / 60, color="grey", ls=":", lw=1)
            ax1.annotate(what.split(" (")[0], ((when - run.start) / 60, 0), fontsize=8,
                         rotation=90, va="bottom", ha="right")
    fig.suptitle(f"uspan soak: 3-node mesh, {(run.events[-1][0] - run.start) / 60:.0f} min")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="traffic time (60)")
    parser.add_argument("--warmup", type=float, default=5.0, metavar="MIN",
                        help="RSS/fd baseline taken this long after a process starts (5)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="packets/s per direction of every link (100)")
    parser.add_argument("--every", type=float, default=5.0, help="sampling interval (5 s)")
    parser.add_argument("--png", type=Path, default=None, help="plot to this PNG")
    parser.add_argument("--lab", default=None, help="lab name (soakPID)")
    args = parser.parse_args()
    if args.png and importlib.util.find_spec("matplotlib") is None:
        parser.error("--png needs matplotlib: pip install -e '.[bench]'")
    if os.geteuid() != 0:
        print("bench/soak: needs root (uspan lab)", file=sys.stderr)
        return 2
    terminate_as_interrupt()
    try:
        return soak(args)
    except BenchError as exc:
        print(f"bench/soak: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
