"""Commands run as an ordinary user holding exactly the capabilities a test names.

``setpriv`` (util-linux) switches to the user, clears supplementary groups and sets the
inheritable, ambient and bounding sets, so the program and everything it starts holds
those capabilities and nothing else: what a container started with ``--cap-drop ALL
--cap-add NET_ADMIN`` gets. With no capabilities the bounding set is left as an
ordinary login has it, so a user namespace still gives that user its own root.

A checkout in a directory other users cannot enter (a clone under /root, a venv made
from pyenv's Python there) is made reachable for those programs alone: they run in a
private mount namespace where a 0755 tmpfs covers the closed directory and the checkout
and the Python are bound back at their own paths (``reach``); nothing changes outside.
"""

from __future__ import annotations

import functools
import os
import pwd
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

USER = "nobody"
CHECKOUT = Path(__file__).resolve().parents[2]


def ids(user: str = USER) -> tuple[int, int]:
    """(UID, GID) of a user name, or of ``UID:GID`` as a Containerfile's USER gives it."""
    uid, colon, gid = user.partition(":")
    if uid.isdigit():
        return int(uid), int(gid) if colon else int(uid)
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def as_user(argv: Sequence[str], caps: Sequence[str] = (), user: str = USER,
            env: dict[str, str] | None = None, ambient: bool = True,
            no_new_privs: bool = False) -> list[str]:
    """``argv`` as ``user`` with only ``caps`` (e.g. ``["net_admin"]``), under ``env``
    (added to a minimal environment: PATH and HOME of no one). Without ``ambient`` the
    caps are only in the bounding set, as Docker and containerd leave a non-root
    container: the program gets them only through a file capability. ``no_new_privs``:
    as ``--security-opt no-new-privileges`` or ``allowPrivilegeEscalation: false``."""
    uid, gid = ids(user)
    wanted = "".join(f",+{cap}" for cap in caps)
    inheritable = wanted if ambient else ""
    command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               f"--inh-caps=-all{inheritable}", *(["--no-new-privs"] if no_new_privs else [])]
    if caps:
        command.append(f"--bounding-set=-all{wanted}")
    if caps and ambient:
        command.append(f"--ambient-caps={wanted[1:]}")
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                   "HOME": "/nonexistent", **(env or {})}
    return [*reach(), *command, "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
            *argv]


@functools.cache
def reach() -> list[str]:
    """A prefix (run as root) that lets other users reach this checkout and its Python,
    or nothing when they already can (see the module docstring)."""
    groups: dict[Path, list[Path]] = {}
    for needed in (CHECKOUT, Path(sys.base_prefix).resolve()):
        closed = next((d for d in reversed(needed.parents) if not d.stat().st_mode & 0o001),
                      None)
        if closed is not None:
            groups.setdefault(closed, []).append(needed)
    if not groups:
        return []
    lines = ["set -e", "stage=$(mktemp -d -p /dev/shm uspan-reach.XXXXXX)"]
    for index, (closed, paths) in enumerate(groups.items()):
        staged = [f"$stage/{index}.{n}" for n in range(len(paths))]
        for path, stage in zip(paths, staged, strict=True):
            lines += [f"mkdir {stage}", f"mount --bind {shlex.quote(str(path))} {stage}"]
        lines.append(f"mount -t tmpfs -o mode=0755 uspan-reach {shlex.quote(str(closed))}")
        for path, stage in zip(paths, staged, strict=True):
            quoted = shlex.quote(str(path))
            lines += [f"mkdir -p {quoted}", f"mount --bind {stage} {quoted}",
                      f"umount {stage}", f"rmdir {stage}"]
    lines += ['rmdir "$stage"', 'exec "$@"']
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines),
            "sh"]


def blocker(user: str = USER) -> str | None:
    """Why ``user`` cannot run this checkout's Python (None: it can). A checkout under
    /root, or a venv made from a Python there (pyenv), is out of other users' reach."""
    probe = subprocess.run(as_user([sys.executable, "-c", "import uspan"], user=user),
                           capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        return None
    return (f"user {user} cannot run {sys.executable} with {CHECKOUT}, even through a "
            f"private view of it ({probe.stderr.strip()}): put the checkout where other "
            "users can read it")


def private_dir_for(path: Path, user: str = USER) -> Path:
    """Create ``path`` as a 0700 directory of ``user`` (a place the test lets it write)."""
    uid, gid = ids(user)
    path.mkdir(mode=0o700)
    os.chown(path, uid, gid)
    return path
