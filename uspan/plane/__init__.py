"""The data plane: established sessions carried by a C thread that never takes the GIL.

Why: the trio shell's wake per packet batch, not the protocol work, is what an
established tunnel costs (branch ``plane``'s prototype: 0.52x current wireguard-go's ping
RTT in C against 1.97x in trio). ``_plane.Plane`` owns the per-packet state of the
keypairs the core installs and hands up what it does not handle; the contract with the
core (``uspan.wg``) is ``docs/dataplane.md``. Optional like the other extensions: without
a compiler the trio data path carries every packet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uspan.plane._plane import Plane as _Compiled
    from uspan.wg.plane import Plane

    def _conforms(plane: _Compiled) -> Plane:
        """Checked by mypy only: the compiled plane is what the core's Protocol asks for."""
        return plane
