"""What every target shares: seeds written to a corpus directory, libFuzzer started, and the
properties checked after each input (the failures raise ``PropertyFailure``, which atheris
reports as a crash with the input saved)."""

from __future__ import annotations

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


def main(test_one: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Fuzz ``test_one`` from ``seeds`` (written to a temporary corpus directory added to
    those given; the first directory given, if any, collects what the run discovers).

    Flags that matter: ``-runs=N`` (inputs), ``-timeout=S`` (a hang is an input taking
    longer; libFuzzer then reports and exits), ``-rss_limit_mb=M`` (memory growth).
    """
    seed_dir = Path(tempfile.mkdtemp(prefix="uspan-fuzz-seeds-"))
    for i, seed in enumerate(seeds):
        (seed_dir / f"seed{i}").write_bytes(seed)
    atheris.Setup([*sys.argv, str(seed_dir)], test_one)
    atheris.Fuzz()
