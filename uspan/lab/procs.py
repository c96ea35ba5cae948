"""Background processes of a lab: started detached (a session of their own, ``setsid``),
so they outlive the command that started them, and recorded by PID and kernel start
time, so later commands stop exactly them and never a process that reused the PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from uspan import userpaths
from uspan.lab.record import LabError, Proc
from uspan.testbed.process import start_time


def uspan_program() -> str:
    """The ``uspan`` console script next to this Python (the venv), else on PATH."""
    found = userpaths.program("uspan")
    if not Path(found).exists():
        raise LabError("cannot find the uspan program (install the project: scripts/setup)")
    return found


def spawn(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start ``argv`` detached, stdout and stderr appended to ``log``."""
    with log.open("ab") as out:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env, close_fds=True)
    proc = Proc(process.pid, start_time(process.pid), list(argv))
    # Nobody waits for it once we exit (init reaps it then); until then, reap it when it
    # dies so that `alive` does not see a zombie of ours as running.
    _children.append(process)
    return proc


_children: list[subprocess.Popen[bytes]] = []


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(proc: Proc | None) -> bool:
    if proc is None:
        return False
    for child in _children:
        if child.pid == proc.pid:
            child.poll()
    fields = _stat(proc.pid)
    return fields is not None and fields[0] != "Z" and fields[19] == proc.start


def stop(proc: Proc | None, sig: signal.Signals = signal.SIGTERM, grace: float = 5.0) -> None:
    """Send ``sig`` (then SIGKILL after ``grace``) while the process is still ours."""
    if proc is None:
        return
    for signum in (sig, signal.SIGKILL):
        if not alive(proc):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)
        deadline = time.monotonic() + grace
        while alive(proc) and time.monotonic() < deadline:
            time.sleep(0.02)
    if alive(proc):
        raise LabError(f"pid {proc.pid} survived SIGKILL")


def cpu_seconds(proc: Proc | None) -> float | None:
    """User + system CPU time of a live process of ours."""
    if not alive(proc):
        return None
    assert proc is not None
    fields = _stat(proc.pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
