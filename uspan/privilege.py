"""One-line explanations of a missing privilege: what was refused, and what grants it.

A program that fails for want of a capability, a device or a writable directory says
which, and how to get it, instead of printing EPERM (or a traceback).
"""

from __future__ import annotations

import errno
import os

NET_ADMIN = ("CAP_NET_ADMIN: run as root, or grant only it with `setpriv --inh-caps "
             "+net_admin --ambient-caps +net_admin ...`, `--cap-add NET_ADMIN` (docker, "
             "podman) or Kubernetes `capabilities: {add: [NET_ADMIN]}`")
PRECREATED_TUN = ("or, for uspan-wg alone, a TUN made for this user needs no capability: "
                  f"`ip tuntap add mode tun user {os.getuid()} name IFACE` as root")
TUN_DEVICE = ("/dev/net/tun: on a host `modprobe tun`, in a container `--device "
              "/dev/net/tun` or, in Kubernetes, a hostPath volume of /dev/net/tun")


def tun_hint(code: int | None) -> str:
    """Why opening or creating a TUN failed (by errno), and the fix."""
    if code == errno.EPERM:
        return f"creating a TUN device needs {NET_ADMIN}; {PRECREATED_TUN}"
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return f"no TUN device node: needs {TUN_DEVICE}"
    if code == errno.EACCES:
        return "cannot open /dev/net/tun: it must be readable and writable by this user (0666)"
    if code == errno.EBUSY:
        return "the TUN is in use by another process, or was made for another user"
    return ""


def net_admin_hint(code: int | None, what: str) -> str:
    """For netlink, SO_MARK and the like: CAP_NET_ADMIN is the missing privilege."""
    if code in (errno.EPERM, errno.EACCES):
        return f"{what} needs {NET_ADMIN}"
    return ""


def dir_hint(code: int | None, path: object, option: str) -> str:
    """A directory we could not create or write: name the option that moves it."""
    if code in (errno.EPERM, errno.EACCES, errno.EROFS):
        return f"{path} is not writable by user {os.geteuid()}: choose another with {option}"
    return ""


def with_hint(message: str, hint: str) -> str:
    return f"{message} ({hint})" if hint else message
