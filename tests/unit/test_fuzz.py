"""A short run of every fuzz target (fuzz/): each must run its inputs with no crash, hang,
state change from rejected input or memory growth (the properties live in the targets;
the long runs are in the README's "Hardening")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A target's run stops after MAX_SECONDS (libFuzzer's -max_total_time) short of its RUNS,
# having run at least MIN_INPUTS: segment's inputs take microseconds to ~0.1 s (a 64 KiB
# super-segment cut a few bytes a segment), and libFuzzer's random seed decides how many
# of the slow kind it makes: its 2,000 took 3-25 s alone, 58-76 s in the suite.
MAX_SECONDS = 10
MIN_INPUTS = 100
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
    "plane": 2000,  # the normal build: libFuzzer sees the harness, not the C (scripts/fuzz-plane)
}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_target_smoke(target: str, tmp_path: Path) -> None:
    temp = tmp_path / "tmp"  # the target's TMPDIR: nothing may be left in it
    temp.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--runs", str(RUNS[target]), "--max-time",
         str(MAX_SECONDS), "--out", str(tmp_path / "out"), target],
        cwd=REPO, capture_output=True, text=True, timeout=100,
        env={**os.environ, "TMPDIR": str(temp)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(temp.iterdir()), "left in the temporary directory"
    assert f"{target} " in done.stdout and " ok" in done.stdout, done.stdout
    inputs = re.search(rf"^{target} +(\d+) ", done.stdout, re.M)
    assert inputs and int(inputs[1]) >= min(RUNS[target], MIN_INPUTS), done.stdout


def test_fuzz_targets_cover_every_parser() -> None:
    """Every target module is run here, and fuzz.run knows each."""
    from fuzz.run import TARGETS

    modules = {p.stem for p in (REPO / "fuzz").glob("*.py")} - {"__init__", "harness", "run"}
    assert modules == set(TARGETS) == set(RUNS)


def test_an_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    """A misspelt target gets usage and the list, runs nothing and makes no directory
    (it ran as a target that 'FAIL exit'ed, with a temp directory left behind)."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "fuzz.run", "--out", str(out), "labrecod"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith("usage: fuzz.run"), done.stderr
    assert "unknown target labrecod (targets: device, " in done.stderr, done.stderr
    assert not out.exists()
