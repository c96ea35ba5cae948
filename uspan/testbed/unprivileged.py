"""Commands run as an ordinary user holding exactly the capabilities a test names.

``setpriv`` (util-linux) switches to the user, clears supplementary groups and sets the
inheritable, ambient and bounding sets, so the program and everything it starts holds
those capabilities and nothing else: what a container started with ``--cap-drop ALL
--cap-add NET_ADMIN`` gets. With no capabilities the bounding set is left as an
ordinary login has it, so a user namespace still gives that user its own root.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

USER = "nobody"


def ids(user: str = USER) -> tuple[int, int]:
    """(UID, GID) of a user name, or of ``UID:GID`` as a Containerfile's USER gives it."""
    uid, colon, gid = user.partition(":")
    if uid.isdigit():
        return int(uid), int(gid) if colon else int(uid)
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def as_user(argv: Sequence[str], caps: Sequence[str] = (), user: str = USER,
            env: dict[str, str] | None = None, ambient: bool = True) -> list[str]:
    """``argv`` as ``user`` with only ``caps`` (e.g. ``["net_admin"]``), under ``env``
    (added to a minimal environment: PATH and HOME of no one). Without ``ambient`` the
    caps are only in the bounding set, as Docker and containerd leave a non-root
    container: the program gets them only through a file capability."""
    uid, gid = ids(user)
    wanted = "".join(f",+{cap}" for cap in caps)
    inheritable = wanted if ambient else ""
    command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               f"--inh-caps=-all{inheritable}"]
    if caps:
        command.append(f"--bounding-set=-all{wanted}")
    if caps and ambient:
        command.append(f"--ambient-caps={wanted[1:]}")
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                   "HOME": "/nonexistent", **(env or {})}
    return [*command, "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]


def blocker(user: str = USER) -> str | None:
    """Why ``user`` cannot run this checkout's Python (None: it can). A checkout under
    /root, or a venv made from a Python there (pyenv), is out of other users' reach."""
    probe = subprocess.run(as_user([sys.executable, "-c", "import uspan"], user=user),
                           capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        return None
    where = Path(__file__).resolve().parents[2]
    return (f"user {user} cannot run {sys.executable} with {where} ({probe.stderr.strip()}"
            "): make the venv with /usr/bin/python3 (scripts/setup does) in a checkout "
            "that other users can read")


def private_dir_for(path: Path, user: str = USER) -> Path:
    """Create ``path`` as a 0700 directory of ``user`` (a place the test lets it write)."""
    uid, gid = ids(user)
    path.mkdir(mode=0o700)
    os.chown(path, uid, gid)
    return path
