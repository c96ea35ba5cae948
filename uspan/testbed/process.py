"""Commands and processes of a testbed: run a command, poll for a condition, and stop a
process only while it is still the one we started (PIDs are reused)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A lab operation failed; the message names the command or object involved."""


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = 20.0,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; on failure raise ``NetnsError`` naming the command and its stderr."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)}: no exit within {timeout}s") from e
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def poll(
    probe: Callable[[], T | None],
    *,
    what: str,
    timeout: float = 5.0,
    interval: float = 0.02,
) -> T:
    """Call ``probe`` until it returns something other than None/False; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def start_time(pid: int) -> str | None:
    """The kernel start time of ``pid`` (to tell it apart from a reused PID), or None."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, start: str | None) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and start in (None, fields[19])


@dataclass(slots=True)
class OwnedProcess:
    """A process the lab started or adopted; killed only while its identity holds."""

    pid: int
    start: str | None
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _alive(self.pid, self.start)

    def stop(self, grace: float = 3.0) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(grace)
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _alive(self.pid, self.start):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + grace
            while _alive(self.pid, self.start) and time.monotonic() < deadline:
                time.sleep(0.02)
        if _alive(self.pid, self.start):
            raise NetnsError(f"pid {self.pid} survived SIGKILL for {grace}s")


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"
