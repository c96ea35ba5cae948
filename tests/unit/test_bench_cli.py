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
