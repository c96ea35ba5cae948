"""The installed ``uspan-wg`` and ``uspan``: a compiled launcher that blocks SIGINT and
SIGTERM and execs ``NAME-python`` beside itself, wherever it was installed (built into a
wheel, it must hold no path of the machine or the environment that built it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCHER = Path(sys.executable).parent / "uspan-wg"
USPAN = Path(sys.executable).parent / "uspan"
STOP_MASK = 1 << 1 | 1 << 14  # SIGINT (2) and SIGTERM (15), as /proc shows SigBlk


def compiled() -> bool:
    return LAUNCHER.is_file() and LAUNCHER.read_bytes()[:4] == b"\x7fELF"


def test_the_launcher_is_compiled_where_ci_requires_it() -> None:
    """CI sets USPAN_REQUIRE_COMPILED=1 (scripts/test): a silent fallback fails here."""
    if os.environ.get("USPAN_REQUIRE_COMPILED") != "1":
        pytest.skip("USPAN_REQUIRE_COMPILED is not set")
    assert compiled(), f"{LAUNCHER} is not the compiled launcher"
    assert USPAN.read_bytes() == LAUNCHER.read_bytes()


@pytest.mark.parametrize("name", ["uspan-wg", "uspan"])
def test_the_launcher_runs_the_script_beside_it_with_stop_signals_blocked(
        tmp_path: Path, name: str) -> None:
    """Copied elsewhere (as an installed wheel is), it runs the NAME-python of its new
    place, with its arguments, and with both stop signals blocked."""
    if not compiled():
        pytest.skip("uspan-wg is the Python fallback here (no C compiler at install)")
    launcher = tmp_path / name
    shutil.copy2(LAUNCHER, launcher)
    script = tmp_path / f"{name}-python"
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


def _signalled_at_once(argv: list[str], signum: int) -> subprocess.CompletedProcess[str]:
    """``argv`` with ``signum`` sent as soon as the launcher has blocked it: before
    Python has started, so the signal waits for the program's own handling."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        status = Path(f"/proc/{process.pid}/status")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the launcher's main() runs in a millisecond
            blocked = next(line for line in status.read_text().splitlines()
                           if line.startswith("SigBlk"))
            if int(blocked.split()[1], 16) & STOP_MASK == STOP_MASK:
                break
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_tool_signalled_during_start_up_ends_quietly(signum: int,
                                                      default_stop_actions: None) -> None:
    """``uspan stats`` is a tool, not a service: a stop signal during its start-up ends
    it with the shell's status for that signal and no traceback."""
    if not compiled():
        pytest.skip("uspan is the Python fallback here (no C compiler at install)")
    done = _signalled_at_once([str(USPAN), "stats", "uspan-no-such-if"], signum)
    assert (done.returncode, done.stderr) == (128 + signum, "")


def test_a_service_signalled_during_start_up_starts_and_stops_cleanly(
        tmp_path: Path) -> None:
    """``uspan discovery-service`` keeps a SIGTERM sent during Python's start-up and acts
    on it once it runs: a clean stop (status 0), no traceback."""
    if not compiled():
        pytest.skip("uspan is the Python fallback here (no C compiler at install)")
    done = _signalled_at_once([str(USPAN), "discovery-service", "--listen", "127.0.0.1:0",
                               "--probe-port", "0"], signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
