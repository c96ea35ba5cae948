"""Rootless labs: a non-root user's labs live inside a user namespace that user owns.

As rootless container tools do it, a long-lived *holder* process is started with
``unshare --user --map-root-user --mount --net``: in its user namespace the user is root
(with every capability, over namespaces it owns only), its mount namespace has a private
tmpfs over ``/run`` (so ``ip netns add`` needs no ``/run/netns`` on the host), and its
own empty network namespace (``ip netns`` returns there after each command, which it
could not do to the host's). Every ``uspan lab`` command of that user then runs inside
it through ``nsenter --preserve-credentials``, with the code that root runs, unchanged.
Files it creates belong to the user; traffic stays in the lab's namespaces.

One holder per lab root, recorded in ``ROOT/userns.json`` by PID and kernel start time.
It is stopped once the root holds no lab and no other process is in its namespace; if it
dies, the lab's namespaces go with its last process and ``down`` still clears the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from uspan import atomicfile, privilege, userpaths
from uspan.lab import procs
from uspan.lab.record import LabError, Proc, names
from uspan.testbed.process import poll

HOLDER_RECORD = "userns.json"
_LOCK = "userns.lock"
_LOG = "userns.log"
_READY = "ready"
# In the new namespaces: a private /run, then wait forever without holding our pipe.
_HOLDER_SCRIPT = (f"mount -t tmpfs -o mode=0755 uspan-lab /run && mkdir /run/netns "
                  f"&& echo {_READY} && exec sleep infinity </dev/null >/dev/null 2>&1")
DISABLED = ("not root, and this user cannot create a user namespace (enable unprivileged "
            "user namespaces: sysctl user.max_user_namespaces=15000, and on Debian/Ubuntu "
            "kernel.unprivileged_userns_clone=1 or "
            "kernel.apparmor_restrict_unprivileged_userns=0), or run as root")


def wanted(root: Path, command: str) -> bool:
    """Whether ``uspan lab COMMAND`` must run in the user's namespace: not as root (inside
    the namespace, as for real root, the effective UID is 0), and for a command other than
    ``up`` only while it has something to act on there (else it answers on the host:
    ``list``, or that there is no lab)."""
    if userpaths.is_root():
        return False
    return command == "up" or holder_pid(root) is not None or bool(names(root))


def run_inside(root: Path, argv: list[str], announce: bool) -> int:
    """Run ``uspan ARGV`` inside the holder of ``root`` (started if need be); its code."""
    try:
        root = userpaths.private_dir(root.absolute())
    except OSError as exc:
        hint = privilege.dir_hint(exc.errno, root, f"--root or ${userpaths.LAB_ROOT_ENV}")
        raise LabError(privilege.with_hint(f"lab root {root}: {exc.strerror or exc}",
                                           hint)) from None
    with _locked(root):
        holder = _holder(root)
        started = holder is None
        if holder is None:
            holder = _start(root)
    if announce:
        how = "started" if started else "using"
        print(f"not root: the lab runs rootless, in a user namespace of user {os.getuid()} "
              f"({how} its holder, pid {holder.pid}); its network namespaces are not in "
              "the host's /run/netns: reach them with `uspan lab exec`", flush=True)
    command = ["nsenter", f"--target={holder.pid}", "--user", "--mount", "--net",
               "--preserve-credentials", f"--wd={os.getcwd()}", procs.uspan_program(), *argv]
    env = {**os.environ, userpaths.LAB_ROOT_ENV: str(root)}
    # Ctrl-C is the inner one's: a handler that does nothing, not SIG_IGN, which the inner
    # uspan would inherit (a handler becomes the default action across exec).
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        code = subprocess.run(command, env=env, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    with _locked(root):
        stop_if_idle(root)
    return 128 - code if code < 0 else code


def stop_if_idle(root: Path) -> bool:
    """Stop the holder of ``root`` when no lab remains and nothing else runs in its
    namespace; True if it is gone."""
    holder = _holder(root)
    if holder is None:
        return True
    if names(root) or _others_inside(holder.pid):
        return False
    procs.stop(holder, signal.SIGKILL)
    for leftover in (HOLDER_RECORD, _LOG):
        (root / leftover).unlink(missing_ok=True)
    return True


def holder_pid(root: Path) -> int | None:
    """The live holder's PID (for tests and ``nsenter`` by hand), or None."""
    holder = _holder(root)
    return None if holder is None else holder.pid


def _holder(root: Path) -> Proc | None:
    try:
        holder = Proc(**json.loads((root / HOLDER_RECORD).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return holder if procs.alive(holder) else None


def _start(root: Path) -> Proc:
    argv = ["unshare", "--user", "--map-root-user", "--mount", "--net",
            "--propagation", "private", "--", "sh", "-c", _HOLDER_SCRIPT]
    log = root / _LOG
    log.unlink(missing_ok=True)
    try:
        holder = procs.spawn(argv, log)
    except FileNotFoundError:
        raise LabError("unshare is missing (apt-get install util-linux)") from None

    def settled() -> bool:
        return _READY in log.read_text() or not procs.alive(holder)

    poll(settled, what="the user namespace", timeout=10)
    if not procs.alive(holder):
        lines = log.read_text(errors="replace").strip().splitlines()
        raise LabError(DISABLED + (f" ({lines[-1]})" if lines else ""))
    atomicfile.write(root / HOLDER_RECORD, json.dumps(asdict(holder)).encode())
    return holder


def _others_inside(pid: int) -> bool:
    """Whether any live process (not a zombie) but ``pid`` is in ``pid``'s user namespace."""
    try:
        ours = os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        with contextlib.suppress(OSError, IndexError):
            if (os.readlink(entry / "ns" / "user") == ours
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                return True
    return False


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One command at a time starts or stops the holder of a root."""
    with (root / _LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
