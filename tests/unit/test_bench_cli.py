"""The benchmarks are not run in CI, so at least their modules must import and their
command lines parse: a renamed helper in bench/common.py once broke bench/control."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "common")


def test_every_benchmark_is_covered() -> None:
    assert {"throughput", "handshakes", "control", "flood", "discovery", "soak"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_imports_and_prints_usage(name: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_throughput_shows_only_the_rows_it_measured() -> None:
    """``--ping-only`` leaves the iperf3 rows empty: the report leaves them out."""
    from bench.throughput import Results, render

    results = Results(1)
    for pair, median, cpu in (("uspan-uspan", 0.9, 500.0), ("wgo-wgo", 0.45, 250.0)):
        results.record(pair, 0, "ping_median", median)
        results.record(pair, 0, "ping_cpu_A", cpu)
    report = render(results, {}, {}, False, ["uspan-uspan", "wgo-wgo"], "wgo-wgo")
    assert "ping RTT median (ms)" in report and "ping CPU per ping, A (us)" in report
    assert "TCP" not in report and "ping RTT p99" not in report
    assert "2.00" in report  # the ratios of what was measured


@pytest.mark.parametrize("tunnel", [False, True], ids=["first-ping", "tunnel"])
def test_flood_report_renders_each_mode(tunnel: bool) -> None:
    """bench/flood's report from made-up rounds (one missing), without root."""
    from bench import flood

    rows = flood.TUNNEL_ROWS if tunnel else flood.ROWS
    case = ("spoof", "unknown")
    values = {(impl, case): {key: [1.5, None] for key, *_ in rows}
              for impl in ("uspan", "wgo")}
    text = flood.render(values, ["uspan", "wgo"], [case], {}, {}, tunnel, markdown=True)
    assert all(label in text for _, label, _ in rows)
    each, first = ("TCP during the flood per round", "2") if tunnel else (
        "first reply per round", "1.5")
    assert f"{each} (" in text
    assert f"| uspan | {first} - |" in text


def test_cpu_seconds_sees_a_few_milliseconds() -> None:
    """A ping costs the daemons a few hundred microseconds: the probe must resolve far
    below the 10 ms clock tick of ``/proc/PID/stat``."""
    from bench.common import cpu_seconds

    spin = ("import sys, time\nprint(flush=True)\nsys.stdin.readline()\n"
            "t = time.thread_time()\nwhile time.thread_time() - t < 0.003: pass\n"
            "print(flush=True)\nsys.stdin.readline()\n")
    with subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        assert child.stdin and child.stdout
        child.stdout.readline()  # started
        before = cpu_seconds(child.pid)
        child.stdin.write("\n")
        child.stdin.flush()
        child.stdout.readline()  # spun
        used = cpu_seconds(child.pid) - before
        child.stdin.write("\n")
        child.stdin.flush()
    assert 0.0029 <= used < 0.006, used


def test_control_counts_no_ping_in_flight_at_the_interrupt_as_lost() -> None:
    """``ping`` stops at SIGINT without waiting for the replies in flight: the ping sent
    just before it counted as lost (1 of ~100 in a quick case, one run in ten)."""
    from bench.control import Pinger

    pinger = Pinger(None)  # type: ignore[arg-type]
    pinger.sent, pinger.rtts = 100, [1.0] * 98
    pinger.answered = set(range(1, 100)) - {40}
    summary = pinger.summary()
    assert summary["loss %"] == pytest.approx(100 / 90)  # seq 40 of the 90 counted
    assert summary["unanswered at the interrupt"] == 1  # seq 100
