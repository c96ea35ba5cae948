"""The installed ``uspan-wg``: a compiled launcher that blocks SIGINT and SIGTERM and
execs ``uspan-wg-python`` beside itself, wherever it was installed (built into a wheel,
it must hold no path of the machine or the environment that built it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHER = Path(sys.executable).parent / "uspan-wg"
STOP_MASK = 1 << 1 | 1 << 14  # SIGINT (2) and SIGTERM (15), as /proc shows SigBlk


def compiled() -> bool:
    return LAUNCHER.is_file() and LAUNCHER.read_bytes()[:4] == b"\x7fELF"


def test_the_launcher_is_compiled_where_ci_requires_it() -> None:
    """CI sets USPAN_REQUIRE_COMPILED=1 (scripts/test): a silent fallback fails here."""
    if os.environ.get("USPAN_REQUIRE_COMPILED") != "1":
        pytest.skip("USPAN_REQUIRE_COMPILED is not set")
    assert compiled(), f"{LAUNCHER} is not the compiled launcher"


def test_the_launcher_runs_the_script_beside_it_with_stop_signals_blocked(
        tmp_path: Path) -> None:
    """Copied elsewhere (as an installed wheel is), it runs the uspan-wg-python of its
    new place, with its arguments, and with both stop signals blocked."""
    if not compiled():
        pytest.skip("uspan-wg is the Python fallback here (no C compiler at install)")
    launcher = tmp_path / "uspan-wg"
    shutil.copy2(LAUNCHER, launcher)
    script = tmp_path / "uspan-wg-python"
    script.write_text(f"#!{sys.executable}\n"  # (a shell would unblock them)
                      "import sys\n"
                      "print(*(line for line in open('/proc/self/status')\n"
                      "        if line.startswith('SigBlk')), end='')\n"
                      "print(sys.argv[0] + '|' + ' '.join(sys.argv[1:]))\n")
    script.chmod(0o755)
    done = subprocess.run([str(launcher), "-f", "wg 0"], capture_output=True, text=True,
                          timeout=10, check=True)
    blocked, argv = done.stdout.splitlines()
    assert int(blocked.split()[1], 16) & STOP_MASK == STOP_MASK
    assert argv == f"{script}|-f wg 0"


def test_without_the_script_the_launcher_says_so(tmp_path: Path) -> None:
    if not compiled():
        pytest.skip("uspan-wg is the Python fallback here (no C compiler at install)")
    launcher = tmp_path / "uspan-wg"
    shutil.copy2(LAUNCHER, launcher)
    done = subprocess.run([str(launcher)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 127
    assert f"cannot run {tmp_path}/uspan-wg-python" in done.stderr
