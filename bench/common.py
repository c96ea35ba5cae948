"""What both benchmarks share: programs, machine description, process probes, statistics.

Daemon CPU time and peak memory are read from /proc for the daemon (the process serving
the UAPI socket, found by ``uspan.testbed``) and every live descendant of it, so a daemon
that forks workers is charged for them too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from uspan.testbed import Namespace, NetnsError

USPAN = str(Path(sys.executable).parent / "uspan-wg")
# wireguard-go builds compared when no --wgo is given, those present, in this order: the
# current release as ../shared/anchors builds it (the baseline), then Debian's package.
DEFAULT_WGO = ("/work/anchors/wireguard-go-current", "/usr/bin/wireguard-go")
_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark cannot run or a measurement failed; the message says which."""


def check_environment(programs: dict[str, str], tools: Sequence[str]) -> None:
    """Refuse to start without root, /dev/net/tun, the daemons or the tools."""
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, TUN devices)")
    if not os.path.exists("/dev/net/tun"):
        raise BenchError("/dev/net/tun is missing")
    for name, path in programs.items():
        if not os.access(path, os.X_OK):
            raise BenchError(f"{name}: {path} is not an executable file")
    for tool in tools:
        if not any(os.access(Path(d) / tool, os.X_OK) for d in os.environ["PATH"].split(":")):
            raise BenchError(f"{tool}: not found on PATH")


def terminate_as_interrupt() -> None:
    """Make SIGTERM/SIGHUP raise KeyboardInterrupt so the labs' cleanup runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def uspan_tree(program: str) -> str:
    """The uspan package a ``uspan-wg`` launcher runs: it execs the ``python`` beside
    it, and no PYTHONPATH reaches the daemons, so that interpreter's import decides."""
    python = Path(program).resolve().parent / "python"
    return _first_line([str(python), "-I", "-c", "import uspan; print(uspan.__path__[0])"])


def machine(programs: dict[str, str]) -> dict[str, str]:
    """CPU, cores, kernel and tool versions, to publish with the results."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    info = {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load average (1/5/15 min) at the start": load_average(),
    }
    for name, path in programs.items():
        info[name] = f"{path}: {_first_line([path, '--version'])}"
    info["iperf3"] = _first_line(["iperf3", "--version"])
    info["wg"] = _first_line(["wg", "--version"])
    return info


def load_average() -> str:
    """The machine's load averages as ``uptime`` shows them (a busy machine widens spreads)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- /proc probes -----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _family(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    family, todo = [], [pid]
    while todo:
        current = todo.pop()
        family.append(current)
        todo.extend(children.get(current, []))
    return family


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants, to the nanosecond: every live thread's
    run time (``/proc/PID/task/TID/schedstat``, user and system alike) plus the reaped
    children's user+system (clock ticks, all ``stat`` has). Ticks alone (10 ms) made a
    per-ping figure over 200 pings move in 50 us steps. A thread that exited while
    measured is not counted: the daemons' threads live as long as they do."""
    nanoseconds, ticks = 0, 0
    for member in _family(pid):
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for task in tasks:
            try:
                nanoseconds += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
        if member == pid and (fields := _stat_fields(pid)):
            ticks += int(fields[13]) + int(fields[14])
    if nanoseconds == 0 and _stat_fields(pid) is None:
        raise BenchError(f"daemon pid {pid} is gone")
    return nanoseconds / 1e9 + ticks / _TICK


def peak_rss_mib(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over ``pid`` and its descendants, in MiB."""
    total_kib = 0
    for member in _family(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def iperf3(ns: Namespace, argv: Sequence[str], seconds: float) -> dict[str, Any]:
    """The ``end`` section of an ``iperf3 -J`` client run (``argv`` after ``iperf3``)."""
    done = ns.run("iperf3", "-J", *argv, timeout=seconds + 30, check=False)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise BenchError(f"iperf3 printed no JSON (exit {done.returncode}): {done.stderr}") from e
    if "error" in report:
        raise BenchError(f"iperf3: {report['error']}")
    end: dict[str, Any] = report["end"]
    return end


# --- statistics and tables --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spread:
    """Minimum, median and maximum of the rounds that produced a number."""

    low: float
    median: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        got = [v for v in values if v is not None]
        if not got:
            return None
        return cls(min(got), statistics.median(got), max(got), len(got))

    def format(self, digits: int) -> str:
        med = f"{self.median:.{digits}f}"
        if self.count == 1:
            return med
        return f"{med} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


def ratios(numer: Sequence[float | None], denom: Sequence[float | None]) -> Spread | None:
    """Round-by-round ratios numer[i]/denom[i] (rounds where both exist, denom > 0)."""
    return Spread.of(
        [
            n / d
            for n, d in zip(numer, denom, strict=True)
            if n is not None and d is not None and d > 0
        ]
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise BenchError("percentile of no values")
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[int(rank) - 1]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A plain aligned table, or a markdown one."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def machine_lines(info: dict[str, str], markdown: bool = False) -> str:
    bullet = "- " if markdown else "  "
    return "\n".join(f"{bullet}{key}: {value}" for key, value in info.items())


def report_failure(what: str, error: Exception) -> None:
    """Print a failed measurement and carry on with the others."""
    print(f"  ! {what}: {error}", file=sys.stderr)


MEASUREMENT_ERRORS = (BenchError, NetnsError, TimeoutError, ValueError, KeyError, OSError)


def run_rounds(rounds: int, trials: Sequence[tuple[str, Callable[[int], None]]]) -> int:
    """Run every (name, trial) once per round, in turn, so machine drift hits all alike.

    A trial gets the round index. Returns how many trials failed; Ctrl-C stops early and
    counts as a failure, keeping what was measured so far.
    """
    failures = 0
    try:
        for round_ in range(rounds):
            for name, trial in trials:
                print(f"round {round_ + 1}/{rounds}: {name}", flush=True)
                try:
                    trial(round_)
                except MEASUREMENT_ERRORS as e:
                    failures += 1
                    report_failure(f"{name} round {round_ + 1}", e)
    except KeyboardInterrupt:
        print("interrupted: reporting the rounds done so far", file=sys.stderr)
        failures += 1
    return failures


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both benchmarks take: which programs, where the markdown report goes."""
    parser.add_argument("--uspan", default=USPAN, help="uspan-wg executable")
    parser.add_argument(
        "--wgo", action="append", metavar="PATH",
        help="a wireguard-go executable; repeat to compare several builds, the first is the "
        f"baseline (default: those of {', '.join(DEFAULT_WGO)} that exist)")
    parser.add_argument("--markdown", type=Path, help="also write the report as markdown here")


def wgo_label(version_line: str, taken: Sequence[str]) -> str:
    """A short name for a wireguard-go build: ``wgo`` and its version's date part
    (``wireguard-go v0.0.20250522`` -> ``wgo20250522``), numbered if already taken."""
    word = version_line.split()[-1] if version_line.split() else ""
    date = word.rsplit(".", 1)[-1]
    base = f"wgo{date}" if date.isdigit() else "wgo"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}_{n}", n + 1
    return label


def start_benchmark(
    name: str, args: argparse.Namespace, tools: Sequence[str]
) -> dict[str, str] | None:
    """Check the machine, let SIGTERM stop a run like Ctrl-C, describe the machine.

    Sets ``args.programs`` (name -> path: ``uspan`` and one ``wgoDATE`` per wireguard-go
    build) and ``args.wgo_names`` (those names, the baseline first). None (after saying
    why on stderr) if the benchmark cannot run.
    """
    paths = args.wgo or [p for p in DEFAULT_WGO if os.access(p, os.X_OK)] or [DEFAULT_WGO[-1]]
    args.programs = {"uspan": args.uspan}
    args.wgo_names = []
    for path in paths:
        name = wgo_label(_first_line([path, "--version"]), args.wgo_names)
        args.wgo_names.append(name)
        args.programs[name] = path
    try:
        check_environment(args.programs, tools)
    except BenchError as e:
        print(f"bench/{name}: {e}", file=sys.stderr)
        return None
    terminate_as_interrupt()
    return machine(args.programs)


def publish(title: str, render: Callable[[bool], str], markdown: Path | None) -> None:
    """Print the report as text; also write it as markdown if asked."""
    print()
    print(render(False))
    if markdown:
        markdown.write_text(f"# uspan-wg vs wireguard-go: {title}\n\n" + render(True))
