"""What the lab needs of the machine, in one place: root for ``ip netns``, veths, TUN
devices, iptables; a non-root user gets it inside a user namespace of its own
(uspan.lab.userns), where its lab commands run as that namespace's root."""

from __future__ import annotations

import os
import shutil

from uspan.lab.record import LabError

TOOLS = {"ip": "iproute2", "tc": "iproute2", "iptables": "iptables", "ping": "iputils-ping",
         "setsid": "util-linux", "mount": "mount"}


def require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"`uspan lab {command}` needs root: network namespaces, veths, TUN "
                       "devices and iptables need CAP_SYS_ADMIN and CAP_NET_ADMIN (try sudo)")


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            package = TOOLS.get(tool, tool)
            raise LabError(f"{tool} is missing (apt-get install {package}, or scripts/setup)")
