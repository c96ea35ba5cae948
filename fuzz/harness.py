"""What every target shares: seeds written to a corpus directory, libFuzzer started, and the
properties checked after each input (the failures raise ``PropertyFailure``, which atheris
reports as a crash with the input saved)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris


class PropertyFailure(AssertionError):
    """The parser broke a property: state changed on rejected input, or memory grew."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise PropertyFailure(what)


SCRATCH = "USPAN_FUZZ_SCRATCH"


def scratch(name: str) -> Path:
    """A directory for a target's files: under ``$USPAN_FUZZ_SCRATCH`` (``fuzz.run`` sets
    it inside its output directory), else a fresh temporary one. libFuzzer ends the process
    without Python's exit handlers, so a target cannot remove its own."""
    base = os.environ.get(SCRATCH)
    if not base:
        return Path(tempfile.mkdtemp(prefix=f"uspan-fuzz-{name}-"))
    path = Path(base) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(test_one: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Fuzz ``test_one`` from ``seeds``, written into the first corpus directory given
    (which also collects what the run discovers), or into a fresh temporary one.

    Flags that matter: ``-runs=N`` (inputs), ``-timeout=S`` (a hang is an input taking
    longer; libFuzzer then reports and exits), ``-rss_limit_mb=M`` (memory growth).
    """
    argv = list(sys.argv)
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    if not dirs:
        dirs.append(tempfile.mkdtemp(prefix="uspan-fuzz-"))
        argv.append(dirs[0])
    for i, seed in enumerate(seeds):
        (Path(dirs[0]) / f"seed{i}").write_bytes(seed)
    atheris.Setup(argv, test_one)
    atheris.Fuzz()
