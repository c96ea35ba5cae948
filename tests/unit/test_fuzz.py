"""A short run of every fuzz target (fuzz/): each must run its inputs with no crash, hang,
state change from rejected input or memory growth (the properties live in the targets;
the long runs are in the README's "Hardening")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNS = {  # a few seconds each: the targets differ in speed by 100x
    "device": 2000,
    "uapi": 200,
    "discovery_server": 200,
    "discovery_client": 40,
    "config": 200,
    "labrecord": 500,
    "nodeapi": 200,
    "gate": 2000,
    "segment": 2000,
}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_target_smoke(target: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--runs", str(RUNS[target]), "--out", str(tmp_path),
         target], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{target} " in done.stdout and " ok" in done.stdout, done.stdout


def test_fuzz_targets_cover_every_parser() -> None:
    """Every target module is run here, and fuzz.run knows each."""
    from fuzz.run import TARGETS

    modules = {p.stem for p in (REPO / "fuzz").glob("*.py")} - {"__init__", "harness", "run"}
    assert modules == set(TARGETS) == set(RUNS)
