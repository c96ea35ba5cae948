"""Control work against the tunnel: uspan-wg next to wireguard-go builds (issue 14's table).

Every case starts fresh daemons in namespaces ``a`` and ``b`` joined by a veth: the
program under test in ``a``, Debian's wireguard-go in ``b`` as the constant far end, and
a tunnel between them (10.78.0.1 -> 10.78.0.2). The case loads ``a``'s control plane
(huge sets and gets, many peers, many clients, signals, file-descriptor exhaustion)
while a ping runs through the tunnel every 10 ms, and reports how long the operation
took, what the ping saw and what the daemon said. Programs alternate within each round
so drifts of a shared machine hit them alike; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    DEFAULT_WGO,
    USPAN,
    BenchError,
    check_environment,
    cpu_seconds,
    machine,
    machine_lines,
    peak_rss_mib,
    percentile,
    run_rounds,
    table,
    terminate_as_interrupt,
    uspan_tree,
    wgo_label,
)
from uspan.testbed import Lab, Namespace, PeerConfig, WireGuard, genkey

OUTER = ("192.0.2.1", "192.0.2.2")
INNER = ("10.78.0.1", "10.78.0.2")
PORTS = (51820, 51821)
SILENT_NET = "198.18.0.0/16"  # endpoints here are routed to b, which drops them


# --- UAPI and prefixes ---------------------------------------------------------------------


def uapi(wg: WireGuard, request: bytes, timeout: float = 300.0) -> tuple[str, float]:
    """Send one request on the UAPI socket; (reply, seconds until the reply ended)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(wg.socket))
        start = time.monotonic()
        reply = bytearray()
        try:
            sock.sendall(request)
            while not reply.endswith(b"\n\n"):
                data = sock.recv(1 << 20)
                if not data:
                    break
                reply += data
        except (BrokenPipeError, ConnectionResetError):  # closed while we wrote: refused
            with contextlib.suppress(OSError):
                reply += sock.recv(1 << 16)
        return reply.decode(errors="replace") or "closed", time.monotonic() - start


def errno_of(reply: str) -> int | None:
    for line in reply.splitlines():
        if line.startswith("errno="):
            return int(line[6:])
    return None


def prefixes(count: int, offset: int = 0) -> Iterator[str]:
    """``count`` distinct IPv4 /32s in 100.64.0.0/10 and then 11.0.0.0/8 and up."""
    for i in range(offset, offset + count):
        yield f"{11 + (i >> 24)}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32"


def bulk_set(peer: str, add: Iterable[str] = (), remove: Iterable[str] = (),
             extra: str = "") -> bytes:
    lines = [f"set=1\npublic_key={peer}\n{extra}"]
    lines += [f"allowed_ip={p}\n" for p in add]
    lines += [f"allowed_ip=-{p}\n" for p in remove]
    lines.append("\n")
    return "".join(lines).encode()


def hexkey(b64: str) -> str:
    return base64.b64decode(b64).hex()


# --- pings ------------------------------------------------------------------------------------


class Pinger:
    """``ping -i 0.01`` through the tunnel for as long as the ``with`` body runs."""

    TAIL = 10  # pings: those of the last 0.1 s (or more, if ping was late) before SIGINT

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.rtts: list[float] = []
        self.answered: set[int] = set()  # icmp_seq of the replies
        self.sent = 0

    def __enter__(self) -> Pinger:
        self._proc = self.ns.spawn("ping", "-n", "-i", "0.01", "-W", "5", INNER[1],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)
        self._proc.send_signal(signal.SIGINT)
        out, _ = self._proc.communicate(timeout=10)
        for line in (out or b"").decode().splitlines():
            for word in line.split():
                if word.startswith("time="):
                    self.rtts.append(float(word[5:]))
                elif word.startswith("icmp_seq="):
                    self.answered.add(int(word[9:]))
            if "packets transmitted" in line:
                self.sent = int(line.split()[0])

    def summary(self) -> dict[str, float]:
        """RTT percentiles and loss. ``ping`` stops at SIGINT without waiting for the
        replies in flight: the last pings (sent less than TAIL ago) count as neither sent
        nor lost, and how many of them went unanswered is a row of its own (one in
        about ten runs at a 1 ms RTT: the ping sent just before the interrupt)."""
        rtts = sorted(self.rtts)
        if not rtts:
            return {"loss %": 100.0}
        counted = max(self.sent - self.TAIL, 1)
        lost = sum(seq not in self.answered for seq in range(1, counted + 1))
        in_tail = sum(seq not in self.answered for seq in range(counted + 1, self.sent + 1))
        return {"ping median ms": statistics.median(rtts), "ping p99 ms": percentile(rtts, 0.99),
                "ping max ms": rtts[-1], "loss %": 100.0 * lost / counted,
                "unanswered at the interrupt": in_tail}


def idle_ping(ns: Namespace, seconds: float = 3.0) -> dict[str, float]:
    with Pinger(ns) as pinger:
        time.sleep(seconds)
    return {f"idle {k}": v for k, v in pinger.summary().items()
            if k not in ("loss %", "unanswered at the interrupt")}


# --- the tunnel -------------------------------------------------------------------------------


@dataclass
class Bed:
    lab: Lab
    a: Namespace
    b: Namespace
    wa: WireGuard
    wb: WireGuard


def bed(lab: Lab, program: str, reference: str, env: dict[str, str] | None = None) -> Bed:
    a, b = lab.namespace("a"), lab.namespace("b")
    lab.veth(a, b, [f"{OUTER[0]}/24"], [f"{OUTER[1]}/24"])
    a.ip("route", "add", SILENT_NET, "via", OUTER[1])
    wa = lab.start_wireguard(a, program, env=env, timeout=30)
    wb = lab.start_wireguard(b, reference, timeout=30)
    wa.configure(listen_port=PORTS[0],
                 peers=[PeerConfig(wb.keys.public, [f"{INNER[1]}/32"], f"{OUTER[1]}:{PORTS[1]}")])
    wb.configure(listen_port=PORTS[1],
                 peers=[PeerConfig(wa.keys.public, [f"{INNER[0]}/32"], f"{OUTER[0]}:{PORTS[0]}")])
    for wg, inner in ((wa, INNER[0]), (wb, INNER[1])):
        wg.add_address(f"{inner}/24")
        wg.up()
    warm = a.run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "3", INNER[1], check=False)
    if warm.returncode != 0:
        raise BenchError(f"no ping through the tunnel:\n{lab.daemon_logs()}")
    return Bed(lab, a, b, wa, wb)


def in_background(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    box: list[object] = []

    def run() -> None:
        try:
            box.append(work())
        except Exception as exc:  # reported by the case
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# --- the cases --------------------------------------------------------------------------------

Result = dict[str, float | str]


def case_removes(bed_: Bed, scale: float) -> Result:
    n = int(100_000 * scale)
    peer = hexkey(genkey().public)
    uapi(bed_.wa, bulk_set(peer, prefixes(n)))
    pid = bed_.wa.process.pid
    with Pinger(bed_.a) as pinger:
        cpu = cpu_seconds(pid)
        reply, took = uapi(bed_.wa, bulk_set(peer, prefixes(n, n), prefixes(n)))
        cpu = cpu_seconds(pid) - cpu
    code = errno_of(reply)
    if code != 0:
        return {"set s": f"refused ({code or 'closed'})", **pinger.summary()}
    return {"set s": took, "daemon CPU s": cpu, **pinger.summary()}


def case_set(bed_: Bed, count: int, *, tool: bool = False) -> Result:
    peer = genkey().public
    if tool:
        conf = bed_.lab.secret_file("[Peer]\nPublicKey = " + peer + "\nAllowedIPs = "
                                    + ", ".join(prefixes(count)) + "\n")
        with Pinger(bed_.a) as pinger:
            start = time.monotonic()
            done = subprocess.run(["wg", "addconf", bed_.wa.name, str(conf)],
                                  capture_output=True, text=True)
            took = time.monotonic() - start
        conf.unlink()
        if done.returncode != 0:
            return {"set s": f"wg exit {done.returncode}: {done.stderr.strip()[:60]}",
                    **pinger.summary()}
        return {"set s": took, **pinger.summary()}
    request = bulk_set(hexkey(peer), prefixes(count))
    with Pinger(bed_.a) as pinger:
        reply, took = uapi(bed_.wa, request)
    code = errno_of(reply)
    return {"set s": took if code == 0 else f"errno {code}", **pinger.summary()}


def case_big_setconf(bed_: Bed, scale: float) -> Result:
    """``wg setconf`` of a request over 64 MiB: is it applied, and what does ``wg`` say."""
    count = int(2_600_000 * scale)
    lines = ["[Interface]", f"PrivateKey = {bed_.wa.keys.private}", f"ListenPort = {PORTS[0]}",
             "", "[Peer]", f"PublicKey = {bed_.wb.keys.public}",
             f"AllowedIPs = {INNER[1]}/32", f"Endpoint = {OUTER[1]}:{PORTS[1]}",
             "", "[Peer]", f"PublicKey = {genkey().public}",
             "AllowedIPs = " + ", ".join(prefixes(count))]
    conf = bed_.lab.secret_file("\n".join(lines) + "\n")
    start = time.monotonic()
    done = subprocess.run(["wg", "setconf", bed_.wa.name, str(conf)], capture_output=True,
                          text=True)
    took = time.monotonic() - start
    conf.unlink()
    rss = peak_rss_mib(bed_.wa.process.pid)
    if done.returncode != 0:
        return {"setconf": f"wg exit {done.returncode} {done.stderr.strip()[:50]!r}",
                "peak RSS MiB": rss}
    return {"setconf": f"applied in {took:.1f}s", "peak RSS MiB": rss}


def case_show_loop(bed_: Bed, scale: float, seconds: float) -> Result:
    peer = hexkey(genkey().public)
    uapi(bed_.wa, bulk_set(peer, prefixes(int(1_000_000 * scale))))
    gets = 0
    with Pinger(bed_.a) as pinger:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            subprocess.run(["wg", "show", bed_.wa.name, "dump"], stdout=subprocess.DEVNULL,
                           check=True)
            gets += 1
    return {"gets": gets, **pinger.summary()}


def case_sigterm(bed_: Bed, scale: float) -> Result:
    request = bulk_set(hexkey(genkey().public), prefixes(int(1_000_000 * scale)))
    thread, _ = in_background(lambda: uapi(bed_.wa, request, timeout=60))
    time.sleep(2.0)  # the request is sent and being parsed or applied
    start = time.monotonic()
    os.kill(bed_.wa.process.pid, signal.SIGTERM)
    while bed_.wa.process.alive() and time.monotonic() - start < 60:
        time.sleep(0.005)
    took = time.monotonic() - start
    thread.join(60)
    return {"exit after SIGTERM s": took}


def case_many_peers(bed_: Bed, scale: float, seconds: float) -> Result:
    count = int(20_000 * scale)
    request = silent_peers(count, lambda i: f"allowed_ip=10.200.{i >> 8 & 255}.{i & 255}/32\n")
    bed_.b.run("iptables", "-t", "raw", "-I", "PREROUTING", *_SILENT_INITIATIONS)
    reply, took = uapi(bed_.wa, request)
    if errno_of(reply) != 0:
        raise BenchError(f"setting {count} peers: {reply.strip()}")
    time.sleep(5)  # first keepalives and handshakes go out
    pid = bed_.wa.process.pid
    cpu0, t0, sent0 = cpu_seconds(pid), time.monotonic(), silent_initiations(bed_.b)
    get_times = []
    with Pinger(bed_.a) as pinger:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            _, got = uapi(bed_.wa, b"get=1\n\n")
            get_times.append(got)
            time.sleep(1)
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(pid) - cpu0) / elapsed * 100
    rate = (silent_initiations(bed_.b) - sent0) / elapsed
    return {"set s": took, **pinger.summary(), "get max s": max(get_times), "CPU %": cpu,
            "initiations/s on the wire": rate}


# Handshake initiations to the silent endpoints, as b receives them (20 + 8 + 148 bytes).
_SILENT_INITIATIONS = ("-d", SILENT_NET, "-p", "udp", "-m", "length", "--length", "176",
                       "-m", "comment", "--comment", "silent-initiations")


def silent_initiations(ns: Namespace) -> int:
    """Packets counted so far by the ``_SILENT_INITIATIONS`` rule in ``ns``."""
    listing = ns.run("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n").stdout
    for line in listing.splitlines():
        if "silent-initiations" in line:
            return int(line.split()[0])
    raise BenchError("the initiation counter is gone")


def case_clients(bed_: Bed, clients: int, seconds: float) -> Result:
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    sets = [0]
    lock = threading.Lock()

    def getter() -> None:
        while time.monotonic() < stop:
            try:
                _, took = uapi(bed_.wa, b"get=1\n\n", timeout=30)
            except OSError:
                continue
            with lock:
                latencies.append(took)

    def setter() -> None:
        peer = hexkey(genkey().public)
        i = 0
        while time.monotonic() < stop:
            uapi(bed_.wa, bulk_set(peer, prefixes(100, i * 100), extra=""), timeout=30)
            sets[0] += 1
            i += 1

    threads = [threading.Thread(target=getter) for _ in range(clients)]
    threads.append(threading.Thread(target=setter))
    with Pinger(bed_.a) as pinger:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    latencies.sort()
    return {"gets": len(latencies), "sets": sets[0],
            "get p99 ms": percentile(latencies, 0.99) * 1000 if latencies else "none",
            **pinger.summary()}


def case_connects(bed_: Bed) -> Result:
    failed = 0
    for _ in range(3):
        socks = []
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(bed_.wa.socket))
            except BlockingIOError:
                failed += 1
            except OSError:
                failed += 1
            socks.append(sock)
        time.sleep(0.2)
        for sock in socks:
            sock.close()
    return {"failed connects of 300": failed}


def case_emfile(bed_: Bed) -> Result:
    pid = bed_.wa.process.pid
    subprocess.run(["prlimit", f"--pid={pid}", "--nofile=64:64"], check=True)
    log = bed_.wa.log_path
    size0 = log.stat().st_size if log else 0
    socks = []
    for _ in range(100):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(bed_.wa.socket))
        except OSError:
            sock.close()
            break
        socks.append(sock)
    with Pinger(bed_.a) as pinger:
        time.sleep(3)
    for sock in socks:
        sock.close()
    text = log.read_text(errors="replace")[size0:] if log else ""
    alive = bed_.wa.process.alive()
    answers = "no"
    if alive:
        with contextlib.suppress(OSError):
            reply, _ = uapi(bed_.wa, b"get=1\n\n", timeout=10)
            answers = "yes" if errno_of(reply) == 0 else "no"
    return {"daemon alive": "yes" if alive else "no", "UAPI answers after": answers,
            "log lines in 3 s": len(text.splitlines()),
            "tracebacks": text.count("Traceback"), **pinger.summary()}


def case_sigint_start(lab: Lab, program: str) -> Result:
    """SIGINT 0-200 ms after exec: how many ended unclean (a traceback or no exit), and
    of those how many before any program code ran (Python's start-up)."""
    unclean = early = 0
    tries = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
    ns = lab.namespace("s")
    for delay in tries:
        code, err = lab.interrupt_at_start(ns, program, delay)
        if code is None or "Traceback" in err or "panic" in err:
            unclean += 1
            early += code is not None and lab.interrupted_before_handler(err)
    return {"unclean of 8": unclean, "of which in Python start-up": early}


def silent_peers(count: int, extra: Callable[[int], str]) -> bytes:
    """A set of ``count`` new peers with keepalive 25 and endpoints that never answer."""
    lines = [f"public_key={os.urandom(32).hex()}\n"
             f"endpoint=198.18.{i >> 8 & 255}.{i & 255}:51820\n"
             f"persistent_keepalive_interval=25\n{extra(i)}" for i in range(count)]
    return ("set=1\n" + "".join(lines) + "\n").encode()


def case_mesh_change(bed_: Bed, scale: float) -> Result:
    """A change for 1,000 new peers as the node applies it from discovery (endpoint,
    preshared key, keepalive 25, a /128), while traffic flows to the existing peer."""
    request = silent_peers(int(1000 * scale), lambda i: (
        f"preshared_key={os.urandom(32).hex()}\nallowed_ip=fd00:78::{i:x}/128\n"))
    with Pinger(bed_.a) as pinger:
        reply, took = uapi(bed_.wa, request)
        time.sleep(2)
    return {"set s": took if errno_of(reply) == 0 else f"errno {errno_of(reply)}",
            **pinger.summary()}


# --- driver ---------------------------------------------------------------------------------

CASES = ("idle", "removes", "set1m", "set130k", "addconf300k", "show", "sigterm", "peers",
         "clients", "connects", "setconf64m", "emfile", "sigint", "mesh")


@dataclass
class Results:
    values: dict[str, dict[str, dict[str, list[float | str]]]] = field(default_factory=dict)

    def add(self, case: str, program: str, result: Result) -> None:
        for key, value in result.items():
            self.values.setdefault(case, {}).setdefault(key, {}).setdefault(
                program, []).append(value)


def run_case(args: argparse.Namespace, case: str, label: str, program: str,
             results: Results) -> None:
    scale = args.scale
    reference = args.reference
    env = None
    with Lab("bc") as lab:
        if case == "sigint":
            results.add(case, label, case_sigint_start(lab, program))
            return
        if case == "emfile":
            env = {"LOG_LEVEL": "error"}  # every line it prints reaches the log
        bed_ = bed(lab, program, reference, env)
        if case == "idle":
            result: Result = idle_ping(bed_.a, 5)
        elif case == "removes":
            result = case_removes(bed_, scale)
        elif case == "set1m":
            result = case_set(bed_, int(1_000_000 * scale))
        elif case == "set130k":
            result = case_set(bed_, int(130_000 * scale))
        elif case == "addconf300k":
            result = case_set(bed_, int(300_000 * scale), tool=True)
        elif case == "show":
            result = case_show_loop(bed_, scale, args.seconds)
        elif case == "sigterm":
            result = case_sigterm(bed_, scale)
        elif case == "peers":
            result = case_many_peers(bed_, scale, args.seconds)
        elif case == "clients":
            result = case_clients(bed_, args.clients, args.seconds)
        elif case == "connects":
            result = case_connects(bed_)
        elif case == "setconf64m":
            result = case_big_setconf(bed_, scale)
        elif case == "emfile":
            result = case_emfile(bed_)
        elif case == "mesh":
            result = case_mesh_change(bed_, scale)
        else:
            raise BenchError(f"unknown case {case}")
        if case not in ("sigterm", "emfile") and not bed_.wa.process.alive():
            result["daemon"] = "died"
        results.add(case, label, result)


def fmt(values: Sequence[float | str]) -> str:
    numbers = [v for v in values if isinstance(v, (int, float))]
    words = [v for v in values if isinstance(v, str)]
    if numbers and not words:
        med = statistics.median(numbers)
        digits = 0 if abs(med) >= 100 else 1 if abs(med) >= 10 else 2
        if len(numbers) == 1:
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} [{min(numbers):.{digits}f}-{max(numbers):.{digits}f}]"
    return " / ".join(dict.fromkeys(str(v) for v in values))


def render(results: Results, labels: Sequence[str], info: dict[str, str],
           markdown: bool) -> str:
    rows = []
    for case in CASES:
        for key, per_program in results.values.get(case, {}).items():
            rows.append([f"{case}: {key}", *(fmt(per_program.get(label, [])) or "-"
                                             for label in labels)])
    body = table(["case: measure", *labels], rows, markdown)
    return f"{body}\n\n{machine_lines(info, markdown)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/control", description=__doc__)
    parser.add_argument("--uspan", action="append", metavar="[LABEL=]PATH",
                        help="uspan-wg executable (repeatable; default: the venv's)")
    parser.add_argument("--wgo", action="append", metavar="[LABEL=]PATH",
                        help="wireguard-go executable (repeatable; default: those of "
                             f"{', '.join(DEFAULT_WGO)} present)")
    parser.add_argument("--reference", default=DEFAULT_WGO[-1],
                        help="the far end of the tunnel (default Debian's wireguard-go)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every size (1 = the issue's sizes)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    programs: dict[str, str] = {}
    uspans: list[str] = []
    for kind, given, default in (
        ("uspan", args.uspan, [USPAN]),
        ("wgo", args.wgo, [p for p in DEFAULT_WGO if os.access(p, os.X_OK)]),
    ):
        for spec in given or default:
            label, sep, path = spec.partition("=")
            if not sep:
                path, label = spec, kind if kind == "uspan" else _wgo_label(spec, programs)
            programs[label] = path
            if kind == "uspan":
                uspans.append(label)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    try:
        check_environment({**programs, "reference": args.reference},
                          ["ip", "wg", "ping", "iptables"])
    except BenchError as e:
        print(f"bench/control: {e}", file=sys.stderr)
        return 1
    # bench/control puts this tree first on the path and the daemons inherit the
    # environment: without this, a --uspan of another install ran this tree's code.
    os.environ.pop("PYTHONPATH", None)
    terminate_as_interrupt()
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    info = machine({**programs})
    for label in uspans:
        info[f"{label} tree"] = uspan_tree(programs[label])
    info["load average (start)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results = Results()
    trials = [(f"{case} {label}", lambda _r, c=case, lb=label, p=path:
               run_case(args, c, lb, p, results))
              for case in cases for label, path in programs.items()]
    failures = run_rounds(args.rounds, trials)
    info["load average (end)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print()
    print(render(results, list(programs), info, False))
    if args.markdown:
        args.markdown.write_text(render(results, list(programs), info, True) + "\n")
    return 1 if failures else 0


def _wgo_label(path: str, taken: Iterable[str]) -> str:
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return wgo_label(version.strip(), list(taken))


if __name__ == "__main__":
    sys.exit(main())
