"""The transport AEAD: the compiled batch module when it was built, else pyca's.

``Sealer(key).seal(index, counter, packets, mtu)``, ``Opener(key).open(datagrams)``,
``strip(plaintexts)``, and the batch sorting ``inner_runs(packets)`` and
``transport_runs(datagrams)`` that keep Device.send and receive's Python per run, not per
packet (``uspan/wg/_aead.pyi``). ``COMPILED`` says which one runs; the tests set
USPAN_REQUIRE_COMPILED=1 so a build that silently fell back fails there.
"""

from __future__ import annotations

try:
    from uspan.wg._aead import Opener, Sealer, inner_runs, strip, transport_runs
    COMPILED = True
except ImportError:  # built without a compiler or OpenSSL headers
    from uspan.wg.aead_py import (  # type: ignore[assignment]
        Opener,
        Sealer,
        inner_runs,
        strip,
        transport_runs,
    )
    COMPILED = False

__all__ = ["COMPILED", "Opener", "Sealer", "inner_runs", "strip", "transport_runs"]
