"""Making permitted capabilities effective, for runtimes that grant them no other way.

Docker, containerd and CRI-O start a non-root container's process with an added
capability (``--cap-add NET_ADMIN``, Kubernetes ``capabilities: {add: [NET_ADMIN]}``) in
its bounding set but not in its ambient set, so it is lost at the entrypoint's execve.
The image therefore gives its interpreter the file capability ``cap_net_admin+p``
(permitted only: a program that does not ask for it never uses it, and where the bounding
set lacks it, it is simply not there); the programs then ask for it here, at start.
"""

from __future__ import annotations

import ctypes

_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def raise_permitted() -> None:
    """Make every permitted capability effective; nothing happens when none is."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    header = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return
    if all(word.effective == word.permitted for word in data):
        return
    for word in data:
        word.effective = word.permitted
    libc.capset(ctypes.byref(header), data)  # refused: the program reports what it lacks
