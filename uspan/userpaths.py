"""Where uspan writes, by default, for root and for everyone else.

Root keeps the system paths (``/var/run/wireguard``, ``/var/lib/uspan``) that ``wg`` and
wireguard-go users expect. Any other user gets paths of their own (XDG base directories,
else ``/tmp/uspan-UID``), so a program with only CAP_NET_ADMIN, or none, never needs to
write where only root may. Every one of them is also an option or environment variable.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

SYSTEM_UAPI_DIR = "/var/run/wireguard"
SYSTEM_STATE_DIR = Path("/var/lib/uspan")
UAPI_DIR_ENV = "USPAN_UAPI_DIR"
LAB_ROOT_ENV = "USPAN_LAB_ROOT"


class UserPathError(OSError):
    """A per-user directory exists but is not safely ours."""


def program(name: str) -> str:
    """An installed uspan program (``uspan``, ``uspan-wg``): the one beside this Python
    (the venv's), else the first on PATH, else the venv's path (for an error to name)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or str(beside))


def is_root() -> bool:
    return os.geteuid() == 0


SESSION_RUNTIME_DIR = "/run/user/{uid}"  # what systemd-logind makes for a user's session


def runtime_dir() -> Path:
    """Sockets and other things that end with the session: ``$XDG_RUNTIME_DIR`` when it
    is set; else the session's own ``/run/user/UID`` if it is there (ours, 0700), so a
    daemon started with a reset environment (``setpriv --reset-env``, a systemd unit)
    puts its socket where the user's login shell looks; else ``/tmp/uspan-UID`` (0700,
    checked to be ours: /tmp is shared)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base)
    uid = os.geteuid()
    session = Path(SESSION_RUNTIME_DIR.format(uid=uid))
    try:
        found = session.lstat()
    except OSError:
        found = None
    if (found is not None and stat.S_ISDIR(found.st_mode) and found.st_uid == uid
            and stat.S_IMODE(found.st_mode) == 0o700):
        return session
    return Path(f"/tmp/uspan-{uid}")


def state_home() -> Path:
    """``$XDG_STATE_HOME/uspan``, else ``~/.local/state/uspan``; ``/tmp/uspan-UID/state``
    for a user without a home directory (``nobody``, a container's user)."""
    base = os.environ.get("XDG_STATE_HOME")
    if base:
        return Path(base) / "uspan"
    home = Path(os.path.expanduser("~"))
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".local" / "state" / "uspan"
    return runtime_dir() / "state"


def uapi_dir() -> str:
    """The UAPI socket directory: ``$USPAN_UAPI_DIR``, else ``/var/run/wireguard`` for
    root and ``RUNTIME_DIR/wireguard`` for others."""
    chosen = os.environ.get(UAPI_DIR_ENV)
    if chosen:
        return chosen
    return SYSTEM_UAPI_DIR if is_root() else str(runtime_dir() / "wireguard")


def state_dir() -> Path:
    """A node's state directory: ``/var/lib/uspan`` for root, else ``state_home()``."""
    return SYSTEM_STATE_DIR if is_root() else state_home()


def lab_root() -> Path:
    """Where labs live: ``$USPAN_LAB_ROOT``, else ``/var/lib/uspan/labs`` for root and
    ``state_home()/labs`` for others."""
    chosen = os.environ.get(LAB_ROOT_ENV)
    if chosen:
        return Path(chosen)
    return SYSTEM_STATE_DIR / "labs" if is_root() else state_home() / "labs"


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents as 0700, and check that it and every
    ancestor up to the first root-owned one belong to us: in a shared place like /tmp a
    directory of that name could have been made by someone else, to watch or swap it."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # whatever the umask
    uid = os.geteuid()
    for directory in [path, *path.parents]:
        info = directory.lstat()
        if info.st_uid == 0 and directory != path:
            break
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            raise UserPathError(f"{directory} is not a directory of user {uid} (remove it, "
                                "or choose another path)")
    return path
