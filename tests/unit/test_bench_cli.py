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
