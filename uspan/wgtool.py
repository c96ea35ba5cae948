"""``uspan wg ARGS``: the ``wg`` tool for UAPI sockets outside ``/var/run/wireguard``.

``wg`` looks for sockets only in ``/var/run/wireguard``, a directory an ordinary user
cannot write. A ``uspan-wg`` (or ``uspan run``) of such a user keeps its socket in the
user's own directory (``uspan.userpaths.uapi_dir``); this runs ``wg`` in a private view
where that directory *is* ``/run/wireguard``: a user and mount namespace of the user's own
(no privilege needed), a tmpfs over ``/run``, the directory bound into it. For root with
the system directory it simply runs ``wg``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from uspan import userpaths

# $0: the socket directory; the rest: wg's arguments.
_VIEW = ('mount -t tmpfs -o mode=0755 uspan-wg /run && mkdir /run/wireguard '
         '&& mount --bind "$0" /run/wireguard && exec wg "$@"')


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    wg = commands.add_parser(
        "wg", help="the wg tool, for sockets in the user's own UAPI directory",
        description="Run `wg ARGS` where the UAPI sockets are in DIR "
        f"(--uapi-dir, ${userpaths.UAPI_DIR_ENV}, default {userpaths.uapi_dir()}) instead "
        "of /var/run/wireguard, e.g. `uspan wg show` for a uspan-wg of this user.")
    wg.add_argument("--uapi-dir", metavar="DIR", default=None)
    wg.add_argument("wg_args", nargs=argparse.REMAINDER, metavar="ARGS")
    wg.set_defaults(handler=wg_command)


def wg_command(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.uapi_dir or userpaths.uapi_dir())
    wg_args = [a for a in args.wg_args[:1] if a != "--"] + args.wg_args[1:]
    if shutil.which("wg") is None:
        print("uspan wg: the wg tool is missing (apt-get install wireguard-tools)",
              file=sys.stderr)
        return 1
    if not os.path.isdir(directory):
        print(f"uspan wg: no UAPI directory {directory} (is the daemon running? choose "
              f"another with --uapi-dir or ${userpaths.UAPI_DIR_ENV})", file=sys.stderr)
        return 1
    sys.stdout.flush()
    if os.path.realpath(directory) == os.path.realpath(userpaths.SYSTEM_UAPI_DIR):
        os.execvp("wg", ["wg", *wg_args])
    os.execvp("unshare", ["unshare", "--user", "--map-root-user", "--mount",
                          "--propagation", "private", "--", "sh", "-c", _VIEW, directory,
                          *wg_args])
